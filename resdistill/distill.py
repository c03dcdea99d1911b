"""Resolution distillation: a low-magnification student learns from a frozen high-magnification
teacher on the same regions, without labels (DiPalma et al. 2021, arXiv:2101.04170). Also the
``--supervised`` baseline: the same student trained on labels only, for comparison.

``python -m resdistill.distill --data s3://bucket/ds --teacher s3://bucket/runs/t1/checkpoint_epoch0010
--student-mag 2.5x --storage s3://bucket/runs --name s1`` (or ``resdistill distill ...``, or
``ray job submit -- python -m resdistill.distill ...``).

Distillation. Every sample of ``--train-splits`` (default ``train,unlabeled``) is read with its
student-magnification tile ``x_s`` and its teacher-magnification tile ``x_t`` of the same region,
both transformed by ONE draw of the paired augmentation (flips, 90-degree rotations, colour
jitter; :class:`resdistill.data.PairedAugment`). The teacher (loaded from its checkpoint with
``weights_only=True``, frozen, eval mode, not wrapped in DDP) gives ``(t, f_t) = teacher(x_t)``,
the student ``(s, f_s) = student(x_s)``, and the student minimises::

    L = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))            (batch mean)
      + feature_weight * mean((f_s - resize(f_t, size(f_s)))^2)           (or |.| with l1)

with ``resize`` an adaptive max-pool (or antialiased bicubic) of the teacher's last feature map
to the student's spatial size (:class:`resdistill.losses.DistillLoss`). Labels are never read
on this path: samples with null labels (the ``unlabeled`` split) train the student like any
other. They are used only to score the ``--val-split`` after every epoch (accuracy and macro F1
of the student's own classifier head on its own magnification, summed over all ranks).

Cached teacher targets (``--targets URL``, written once by ``python -m resdistill.teacher_targets``):
the loader reads only the student tile plus the stored teacher logits and pooled feature map of
its key, and the teacher is not run per step (the same loss; flips/rotations are applied to the
stored map too, colour jitter is refused: see :mod:`resdistill.teacher_targets`). Targets of
another teacher checkpoint or dataset version are refused.

Baseline (``--supervised``): ``cross_entropy(student(x_s), label)`` on the labelled samples of
``--train-splits`` (default ``train``), no teacher involved.

Conventions shared with :mod:`resdistill.teacher` (:mod:`resdistill.train_loop`): Ray Train DDP
(gloo on CPU, NCCL + bf16 autocast with ``--gpu``), equal steps on every rank, run storage on a
folder or ``s3://``, a rerun with the same ``--name`` resumes after the latest checkpoint,
worker failures restart from it (``--max-failures``), the best checkpoint by ``val_macro_f1``
and the latest are kept. The student's ``model.pt`` has the teacher checkpoint's layout (arch,
classes, mag, tile_px, normalization, state_dict) plus ``stage`` (``distill`` / ``supervised``),
``teacher`` (the teacher checkpoint it learned from and its arch/mag) and ``loss`` (the
distillation settings), so ``resdistill evaluate`` loads students and teachers alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from resdistill.train_options import ARCH_CHOICES, add_speed_arguments, speed_config

STAGE_DISTILL = "distill"
STAGE_SUPERVISED = "supervised"
#: Keys a teacher checkpoint's ``model.pt`` must hold (written by :mod:`resdistill.teacher`).
TEACHER_KEYS = ("arch", "classes", "state_dict")


class UsageError(ValueError):
    """Options, data or a teacher that cannot work; reported as one line, exit status 2."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the distillation options to ``parser`` (shared by ``resdistill distill``)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    g.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint folder (local or s3://), as printed by `resdistill teacher`; "
        "required unless --supervised (then only its architecture is used, as --arch's default)",
    )
    g.add_argument(
        "--student-mag", required=True, help="the student's magnification, e.g. 5x, 2.5x, 1.25x"
    )
    g.add_argument(
        "--teacher-mag",
        default=None,
        help="magnification fed to the teacher (default: the one it was trained at, which for "
        "`resdistill teacher` is the dataset's highest)",
    )
    g.add_argument(
        "--train-splits",
        default=None,
        help="comma list of splits to learn from (default: train,unlabeled; with --supervised: "
        "train). Distillation uses every sample of them, labelled or not",
    )
    g.add_argument("--val-split", default="val", help="labelled split scored after every epoch")
    g.add_argument(
        "--label-fraction",
        type=float,
        default=1.0,
        help="with --supervised: use the labels of only this share of the training slides (at "
        "least one per class), as the teacher's --label-fraction",
    )
    g.add_argument("--batch-size", type=int, default=64, help="per-worker batch size")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    g.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer")
    g.add_argument(
        "--jitter",
        type=_floats,
        default="0.2,0.2,0.2,0.05",
        help="colour jitter brightness,contrast,saturation,hue, the same draw for the student's "
        "and the teacher's tile (0 disables; paper: 0.5,0.5,0.5,0.2)",
    )
    g.add_argument("--no-flips", action="store_true", help="no random flips / 90-degree rotations")
    g.add_argument(
        "--targets",
        default=None,
        help="cached teacher targets (a root written by `resdistill teacher-targets`): the "
        "student learns from the stored teacher outputs instead of running the teacher; flips "
        "and rotations stay, colour jitter is refused (see resdistill.teacher_targets)",
    )
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="batches per worker per epoch (default: train samples // (workers x batch))",
    )

    g = parser.add_argument_group("distillation")
    g.add_argument(
        "--supervised",
        action="store_true",
        help="the baseline: train the student with cross-entropy on labels only, no teacher",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD term")
    g.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature term")
    g.add_argument("--feature-loss", default="mse", choices=("mse", "l1"))
    g.add_argument(
        "--feature-resize",
        default="maxpool",
        choices=("maxpool", "bicubic"),
        help="how the teacher's feature map is brought to the student's size",
    )
    g.add_argument(
        "--label-smoothing", type=float, default=0.0, help="cross-entropy smoothing (--supervised)"
    )

    g = parser.add_argument_group("model and optimisation")
    g.add_argument(
        "--arch",
        default=None,
        choices=ARCH_CHOICES,
        help="student architecture (default: the teacher's; resnet18 without a teacher)",
    )
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    g.add_argument("--schedule", default="cosine", choices=("cosine", "constant", "linear"))
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("run")
    g.add_argument("--storage", default="runs", help="run storage: a folder or s3://bucket/prefix")
    g.add_argument(
        "--name", default=None, help="run name; rerun with the same name to resume (default: new)"
    )
    g.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    add_speed_arguments(g)
    g.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    g.add_argument("--keep", type=int, default=1, help="best checkpoints kept (plus the latest)")
    g.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    g.add_argument(
        "--no-teacher-eval",
        action="store_true",
        help="skip scoring the teacher once on --val-split (reported as teacher_val_*)",
    )
    g.add_argument("--log-every", type=int, default=0, help="print every N steps (0: per epoch)")
    g.add_argument("--summary-json", default=None, help="also write the final summary here")
    g.add_argument(
        "--trace-dir",
        default=None,
        help="local folder for a JSON-lines trace of worker starts and epochs (debugging)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.distill",
        description="Distill a low-magnification student from a frozen teacher on Ray Train "
        "(or train the supervised low-magnification baseline).",
    )
    return add_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible option values with one line each."""
    for opt in ("batch_size", "epochs", "workers"):
        if getattr(args, opt) < 1:
            raise UsageError(f"--{opt.replace('_', '-')} must be at least 1")
    if args.loader_workers < 0:
        raise UsageError("--loader-workers must be 0 or more")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise UsageError("--steps-per-epoch must be at least 1")
    if args.lr <= 0:
        raise UsageError("--lr must be positive")
    if not args.supervised:
        if not args.teacher:
            raise UsageError(
                "--teacher is required: a teacher checkpoint folder (or pass --supervised for "
                "the labels-only baseline)"
            )
        if not args.temperature > 0:
            raise UsageError("--temperature must be positive")
        if args.kd_weight < 0 or args.feature_weight < 0:
            raise UsageError("--kd-weight and --feature-weight must be 0 or more")
        if args.kd_weight == 0 and args.feature_weight == 0:
            raise UsageError("--kd-weight and --feature-weight are both 0: nothing to learn from")
    if getattr(args, "targets", None):
        _check_targets_args(args)


def _check_targets_args(args: argparse.Namespace) -> None:
    """Options ``--targets`` cannot honour (see :mod:`resdistill.teacher_targets`): one line each.
    The default colour jitter is switched off (the cached targets are of un-jittered tiles)."""
    if args.supervised:
        raise UsageError("--targets is for distillation; --supervised uses no teacher")
    if args.feature_resize != "maxpool":
        raise UsageError(
            "--targets stores max-pooled teacher maps: --feature-resize must be maxpool"
        )
    jitter = tuple(float(v) for v in args.jitter)
    if any(jitter):
        if jitter != _floats("0.2,0.2,0.2,0.05"):
            raise UsageError(
                "--jitter is not allowed with --targets: the teacher's stored outputs are of the "
                "un-jittered tiles (flips and 90-degree rotations are fine); pass --jitter 0"
            )
        print("note: --targets turns the default colour jitter off", file=sys.stderr)
        args.jitter = (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Teacher checkpoints (driver side)
# --------------------------------------------------------------------------------------------------


def absolute_url(url: str) -> str:
    """``s3://`` URLs unchanged; a local path made absolute (workers may run elsewhere)."""
    from sharding.storage import is_remote, local_path

    return url if is_remote(url) else str(local_path(url))


def teacher_meta(url: str, classes: Sequence[str]) -> dict[str, Any]:
    """Read a teacher checkpoint and check it against the dataset's ``classes``.

    Loads ``<url>/model.pt`` with ``weights_only=True`` and builds its network from the stored
    ``arch`` and class count to prove the weights fit. Returns the checkpoint's metadata (all but
    ``state_dict``) plus ``checkpoint`` (the absolute URL) and ``feature_channels``. Raises
    :class:`UsageError` with one line when it is not a classifier checkpoint or when its classes
    (names and order) differ from the dataset's.
    """
    from resdistill import train_loop as T
    from resdistill.models import ARCHITECTURES, build_model

    url = absolute_url(url)
    try:
        ckpt = T.load_checkpoint(url)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except Exception as exc:  # unpickling refused (weights_only) or a corrupt file
        raise UsageError(
            f"{url}: cannot load the teacher checkpoint: {exc}".splitlines()[0]
        ) from None
    missing = [k for k in TEACHER_KEYS if k not in ckpt]
    if missing:
        raise UsageError(
            f"{url}: not a resdistill classifier checkpoint (model.pt lacks {', '.join(missing)})"
        )
    if ckpt["arch"] not in ARCHITECTURES:
        raise UsageError(f"{url}: teacher architecture {ckpt['arch']!r} is not supported")
    t_classes = [str(c) for c in ckpt["classes"]]
    if t_classes != list(classes):
        raise UsageError(
            f"{url}: the teacher's classes {t_classes} differ from the dataset's {list(classes)}; "
            "distill on a dataset with the same classes, or train a teacher on this one"
        )
    try:
        build_model(ckpt["arch"], len(t_classes)).load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UsageError(
            f"{url}: the weights do not fit a {ckpt['arch']} with {len(t_classes)} classes: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta["checkpoint"] = url
    meta["feature_channels"] = ARCHITECTURES[ckpt["arch"]]
    return meta


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _mag_power(name: str) -> float:
    from sharding.magnification import Magnification

    return Magnification.parse(name).power


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the dataset and teacher against the options; the workers' config (plain values)."""
    from resdistill.data import (
        DatasetInfo,
        read_manifest,
        select_labelled_slides,
        shard_keys,
        steps_per_epoch,
    )

    info = DatasetInfo.load(args.data)
    if info.num_classes < 2:
        raise UsageError(f"{args.data}: dataset.json lists {info.num_classes} class(es), need 2+")
    supervised = bool(args.supervised)
    teacher = teacher_meta(args.teacher, info.classes) if args.teacher else None
    student_mag = info.resolve_mag(args.student_mag)
    default_t_mag = (None if supervised else (teacher or {}).get("mag")) or info.highest
    if args.teacher_mag is None and default_t_mag not in info.magnifications:
        raise UsageError(
            f"{args.data}: the teacher was trained at {default_t_mag}, which this dataset lacks "
            f"({', '.join(info.magnifications)}): pass --teacher-mag"
        )
    teacher_mag = info.resolve_mag(args.teacher_mag or default_t_mag)
    if not supervised and _mag_power(student_mag) > _mag_power(teacher_mag):
        raise UsageError(
            f"--student-mag {student_mag} is above the teacher's {teacher_mag}: the student "
            "learns at the lower magnification"
        )
    arch = args.arch or (teacher["arch"] if teacher else "resnet18")
    default_splits = "train" if supervised else "train,unlabeled"
    train_splits = [s.strip() for s in (args.train_splits or default_splits).split(",")]
    train_splits = [s for s in train_splits if s]
    manifest = read_manifest(info.url)
    if args.label_fraction < 1 and not supervised:
        raise UsageError("--label-fraction applies to --supervised: distillation uses no labels")
    try:
        labelled = select_labelled_slides(manifest, train_splits, args.label_fraction, args.seed)
    except ValueError as exc:
        raise UsageError(f"--label-fraction: {exc}") from None
    train_keys = shard_keys(
        manifest, train_splits, labelled_only=supervised, labelled_slides=labelled
    )
    n_train = sum(len(v) for v in train_keys.values())
    n_labelled = sum(
        len(v)
        for v in shard_keys(
            manifest, train_splits, labelled_only=True, labelled_slides=labelled
        ).values()
    )
    val_keys = shard_keys(manifest, [args.val_split], labelled_only=True)
    n_val = sum(len(v) for v in val_keys.values())
    if n_val == 0:
        raise UsageError(f"{args.data}: split {args.val_split!r} has no labelled samples")
    if n_train == 0:
        what = "labelled samples" if supervised else "samples"
        raise UsageError(f"{args.data}: split(s) {', '.join(train_splits)} hold no {what}")
    try:
        steps = args.steps_per_epoch or steps_per_epoch(n_train, args.workers, args.batch_size)
    except ValueError as exc:
        raise UsageError(f"{args.data}: {exc}") from None
    targets = None
    if getattr(args, "targets", None):
        from resdistill.teacher_targets import check_for_distill

        try:
            targets = check_for_distill(
                args.targets,
                teacher_checkpoint=teacher["checkpoint"],
                data=info.url,
                train_shards=list(train_keys),
                student_mag=student_mag,
                teacher_mag=teacher_mag,
            )
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    return {
        "stage": STAGE_SUPERVISED if supervised else STAGE_DISTILL,
        "supervised": supervised,
        "labelled_slides": labelled,
        "data": info.url,
        "dataset": dict(info.raw),
        "student_mag": student_mag,
        "teacher_mag": teacher_mag,
        "teacher": None if supervised else teacher,
        "targets": targets,
        "train_splits": train_splits,
        "val_split": args.val_split,
        "n_train": n_train,
        "n_labelled": n_labelled,
        "n_val": n_val,
        "train_shards": len(train_keys),
        "steps_per_epoch": steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size or args.batch_size,
        "loader_workers": args.loader_workers,
        "shuffle_buffer": args.shuffle_buffer,
        "jitter": list(args.jitter),
        "flips": not args.no_flips,
        "arch": arch,
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs,
        "seed": args.seed,
        "loss": {
            "temperature": args.temperature,
            "kd_weight": args.kd_weight,
            "feature_weight": args.feature_weight,
            "feature_loss": args.feature_loss,
            "feature_resize": args.feature_resize,
            "label_smoothing": args.label_smoothing,
        },
        "teacher_eval": not (supervised or args.no_teacher_eval),
        "log_every": args.log_every,
        "trace_dir": args.trace_dir,
        **speed_config(args),
    }


def describe(config: Mapping[str, Any]) -> str:
    """The run's one-paragraph header (what learns from what, on how much data)."""
    unl = config["n_train"] - config["n_labelled"]
    data = (
        f"{config['n_train']} train samples ({config['n_labelled']} labelled, {unl} unlabeled) "
        f"of {','.join(config['train_splits'])} in {config['train_shards']} shards, "
        f"{config['n_val']} val"
    )
    if config["supervised"]:
        head = (
            f"[bold]supervised baseline[/] {config['arch']} at {config['student_mag']} on "
            f"{config['data']}: {config['n_train']} labelled train samples of "
            f"{','.join(config['train_splits'])} in {config['train_shards']} shards, "
            f"{config['n_val']} val; loss = cross-entropy on labels"
        )
    else:
        t, lo = config["teacher"], config["loss"]
        head = (
            f"[bold]distill[/] {config['arch']} at {config['student_mag']} <- teacher "
            f"{t['arch']} at {config['teacher_mag']} ({t['checkpoint']}) on {config['data']}: "
            f"{data}; loss = {lo['kd_weight']:g} x KD(T={lo['temperature']:g}) + "
            f"{lo['feature_weight']:g} x {lo['feature_loss']}({lo['feature_resize']}); "
            "labels used for validation only"
        )
    return head


def train(args: argparse.Namespace) -> Any:
    """Distil (or train the baseline) as ``args`` say; print progress and a summary; return the
    :class:`resdistill.train_loop.RunSummary`.

    Raises :class:`UsageError` (bad options, dataset or teacher) and Ray's ``TrainingFailedError``.
    """
    from rich.console import Console

    from resdistill import train_loop as T

    check_args(args)
    console = Console(highlight=False)
    config = build_config(args)
    stage = config["stage"]
    name = args.name or f"{stage}-{config['student_mag']}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(describe(config), soft_wrap=True)
    console.print(
        f"{args.workers} workers x batch {args.batch_size} x {config['steps_per_epoch']} "
        f"steps/epoch x {args.epochs} epochs; run {name!r} -> {T.run_url(args.storage, name)}"
    )
    if not config["supervised"]:
        t = config["teacher"]
        if t.get("mag") and t["mag"] != config["teacher_mag"]:
            console.print(
                f"[yellow]note[/]: the teacher was trained at {t['mag']} and is fed "
                f"{config['teacher_mag']} tiles"
            )
        if config.get("targets"):
            console.print(
                f"cached teacher targets {config['targets']['url']}: the teacher is not run "
                "during training"
            )
        if args.val_split in config["train_splits"]:
            console.print(
                f"[yellow]note[/]: the student also distils on {args.val_split!r}, the split it "
                "is scored on (its labels stay unused)"
            )
    T.ray_init(args.address)
    from resdistill.distill_worker import train_worker

    t0 = time.perf_counter()
    result = T.launch(
        train_worker,
        config,
        name=name,
        storage=args.storage,
        workers=args.workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        keep=args.keep,
    )
    summary = T.summarize(
        result, name=name, storage=args.storage, elapsed_s=time.perf_counter() - t0
    )
    title = f"{'supervised baseline' if config['supervised'] else 'distilled student'} {name}"
    T.print_summary(summary, title=title, console=console)
    if args.summary_json:
        from dataclasses import asdict

        with open(args.summary_json, "w") as fh:
            json.dump({**asdict(summary), "stage": stage}, fh, indent=1, default=str)
    return summary


def run(args: argparse.Namespace) -> int:
    """``resdistill distill``: :func:`train`, errors as one line; 0 ok, 1 failed run, 2 bad input."""
    try:
        train(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in ("TrainingFailedError", "ControllerError", "WorkerGroupError"):
            print(f"distill: training failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.distill``; returns the exit status."""
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
