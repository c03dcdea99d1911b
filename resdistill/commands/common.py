"""Options shared by the training commands (teacher, distill, tune), and ``args -> TrainConfig``.

Each ``add_*_options`` factory adds one argument group to a parser and returns it, so a command
can add its own options beside the shared ones; each ``*_config`` builder reads the parsed
arguments back into one typed section of :class:`~resdistill.config.TrainConfig`. No torch or
Ray here: ``resdistill --help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from resdistill.config import (
    AMP_MODES,
    ARCH_CHOICES,
    ATTENTION_MIN_PX,
    DEFAULT_EPOCHS,
    DEFAULT_JITTER,
    DEFAULT_TEMPERATURE,
    FEATURE_LOSSES,
    FEATURE_RESIZES,
    OPTIMIZERS,
    SCHEDULES,
    STAIN_NORMS,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunOptions,
    SpeedConfig,
    TeacherRef,
    TrainConfig,
    hed_pair,
)

Group = Any  # an argparse parser or argument group


def floats(text: str) -> tuple[float, ...]:
    """``"0.2,0.2,0.2,0.05"`` -> ``(0.2, 0.2, 0.2, 0.05)`` (an argparse ``type``)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def split_list(text: str | None) -> list[str] | None:
    """``"a, b,"`` -> ``["a", "b"]``; None for None or an empty text."""
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    return items or None


def add_data_options(
    parser: argparse.ArgumentParser,
    *,
    train_splits: str | None = "train",
    splits_help: str = "comma list of training splits",
    fraction_help: str = "use the labels of only this share of the training slides (at least "
    "one per class; a label-scarce experiment)",
    jitter_help: str = "",
    jitter: tuple[float, ...] = DEFAULT_JITTER,
) -> Group:
    """The ``data`` group: dataset, splits, labels, batching, augmentation, steps."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    g.add_argument("--train-splits", default=train_splits, help=splits_help)
    g.add_argument("--val-split", default="val", help="labelled split scored after every epoch")
    g.add_argument("--label-fraction", type=float, default=1.0, help=fraction_help)
    g.add_argument("--batch-size", type=int, default=64, help="per-worker batch size")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    g.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer")
    g.add_argument(
        "--jitter",
        type=floats,
        default=",".join(f"{v:g}" for v in jitter),
        help="colour jitter brightness,contrast,saturation,hue"
        + (f", {jitter_help}" if jitter_help else "")
        + " (0 disables; paper: 0.5,0.5,0.5,0.2)",
    )
    g.add_argument(
        "--hed-jitter",
        type=floats,
        default="0",
        metavar="SIGMA[,BIAS]",
        help="stain jitter in haematoxylin-eosin-DAB space: each stain's amount C becomes "
        "C * U(1-SIGMA, 1+SIGMA) + U(-BIAS, BIAS), one draw per sample for every magnification "
        "(BIAS defaults to SIGMA; 0 disables; Tellez et al. 2019: 0.05 light, 0.2 strong)",
    )
    g.add_argument("--no-flips", action="store_true", help="no random flips / 90-degree rotations")
    g.add_argument(
        "--stain-norm",
        default="none",
        choices=("none", *STAIN_NORMS),
        help="map every tile's colours (every magnification, in training, evaluation and "
        "prediction) onto a reference estimated from the training tiles at the top "
        "magnification: reinhard (LAB mean/std), macenko (stain vectors); a student inherits "
        "its teacher's",
    )
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="batches per worker per epoch (default: train samples // (workers x batch))",
    )
    return g


def add_model_options(
    parser: argparse.ArgumentParser, *, arch: str | None = "resnet18", arch_help: str = ""
) -> Group:
    """The ``model and optimisation`` group: architecture, epochs, optimiser, schedule, seed."""
    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--arch", default=arch, choices=ARCH_CHOICES,
                   help=arch_help or "torchvision ResNet (random init)")  # fmt: skip
    g.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="total epochs of the run")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="sgd: Nesterov 0.9")
    g.add_argument(
        "--schedule",
        default="cosine",
        choices=SCHEDULES,
        help="learning-rate decay over all steps of --epochs",
    )
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    g.add_argument("--seed", type=int, default=0, help="model init, shuffling and augmentation")
    return g


def add_label_smoothing(group: Group, help_text: str = "cross-entropy smoothing") -> None:
    group.add_argument("--label-smoothing", type=float, default=0.0, help=help_text)


def add_kd_options(group: Group) -> None:
    """The distillation loss: KD temperature and weights, feature distance and resize."""
    group.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="KD temperature T (the paper: 1)")  # fmt: skip
    group.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD term")
    group.add_argument(
        "--feature-weight", type=float, default=1.0, help="weight of the feature term"
    )
    group.add_argument("--feature-loss", default="mse", choices=FEATURE_LOSSES,
                       help="distance of the feature maps")  # fmt: skip
    group.add_argument(
        "--feature-resize",
        default="maxpool",
        choices=FEATURE_RESIZES,
        help="how the teacher's feature map is brought to the student's size",
    )
    group.add_argument(
        "--attention-weight",
        type=float,
        default=0.0,
        help="weight of inter-resolution attention transfer (del Amor et al. 2024): the "
        "student's class attention map (Grad-CAM of the teacher's class) matched to the "
        f"teacher's; needs student tiles of {ATTENTION_MIN_PX} px or more (0: off)",
    )


def add_speed_options(group: Group) -> None:
    """``--amp``, ``--channels-last`` and ``--compile``: how a worker runs the model."""
    group.add_argument(
        "--amp",
        default="auto",
        choices=AMP_MODES,
        help="bf16 autocast: auto (on GPU only), bf16 (also on CPU), off",
    )
    group.add_argument(
        "--channels-last", action="store_true", help="NHWC weights and inputs (GPUs, oneDNN)"
    )
    group.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default="",
        metavar="BACKEND",
        help="torch.compile the model (inductor unless a backend is named; default: off)",
    )


def add_cluster_options(group: Group) -> None:
    """Ray Train workers and the cluster: ``--workers`` .. ``--address``."""
    group.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")
    group.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    add_speed_options(group)
    group.add_argument(
        "--max-failures", type=int, default=2, help="worker failures to recover from"
    )
    group.add_argument(
        "--keep", type=int, default=1, help="best checkpoints kept (plus the latest)"
    )
    group.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )


def add_run_options(parser: argparse.ArgumentParser) -> Group:
    """The ``run`` group: storage, name, workers and cluster, logging, summary, trace."""
    g = parser.add_argument_group("run")
    g.add_argument("--storage", default="runs", help="run storage: a folder or s3://bucket/prefix")
    g.add_argument(
        "--name", default=None, help="run name; rerun with the same name to resume (default: new)"
    )
    add_cluster_options(g)
    g.add_argument("--log-every", type=int, default=0, help="print every N steps (0: per epoch)")
    g.add_argument("--summary-json", default=None, help="also write the final summary here")
    g.add_argument(
        "--trace-dir",
        default=None,
        help="local folder for a JSON-lines trace of worker starts and epochs (debugging)",
    )
    return g


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append ``(default: ...)`` to every option's help that has a default worth showing,
    whichever formatter the parser has (``resdistill``'s subparsers use a raw one)."""
    for action in parser._actions:
        shown = action.default not in (None, False, "", argparse.SUPPRESS)
        if shown and action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return parser


# ------------------------------------------------------------------------------ args -> config


def data_config(args: argparse.Namespace, *, train_splits: str) -> DataConfig:
    """The data section; ``train_splits`` when ``--train-splits`` was not given."""
    splits = split_list(getattr(args, "train_splits", None)) or split_list(train_splits) or []
    return DataConfig(
        url=args.data,
        train_splits=tuple(splits),
        val_split=args.val_split,
        label_fraction=float(args.label_fraction),
        unlabelled_share=float(getattr(args, "unlabelled_share", 1.0)),
        batch_size=int(args.batch_size),
        eval_batch_size=args.eval_batch_size,
        loader_workers=int(args.loader_workers),
        shuffle_buffer=int(args.shuffle_buffer),
        jitter=tuple(float(v) for v in args.jitter),
        flips=not args.no_flips,
        hed_jitter=_hed_jitter(getattr(args, "hed_jitter", ())),
        stain_norm="" if getattr(args, "stain_norm", "none") == "none" else args.stain_norm,
        steps_per_epoch=args.steps_per_epoch,
        targets=getattr(args, "targets", None) or None,
    )


def _hed_jitter(values: tuple[float, ...]) -> tuple[float, float]:
    """``--hed-jitter`` as ``(sigma, bias)``; a bad value is a one-line usage error."""
    from resdistill.errors import UsageError

    try:
        return hed_pair(values)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def optim_config(args: argparse.Namespace) -> OptimConfig:
    return OptimConfig(
        epochs=int(args.epochs),
        lr=float(args.lr),
        weight_decay=float(args.weight_decay),
        optimizer=args.optimizer,
        schedule=args.schedule,
        warmup_epochs=float(args.warmup_epochs),
        seed=int(args.seed),
    )


def loss_config(args: argparse.Namespace) -> LossConfig:
    """Loss settings; the KD ones keep their defaults where the command has no such option."""
    base = LossConfig()
    return LossConfig(
        temperature=float(getattr(args, "temperature", base.temperature)),
        kd_weight=float(getattr(args, "kd_weight", base.kd_weight)),
        feature_weight=float(getattr(args, "feature_weight", base.feature_weight)),
        feature_loss=getattr(args, "feature_loss", base.feature_loss),
        feature_resize=getattr(args, "feature_resize", base.feature_resize),
        attention_weight=float(getattr(args, "attention_weight", base.attention_weight)),
        label_smoothing=float(getattr(args, "label_smoothing", base.label_smoothing)),
    )


def speed_config(args: argparse.Namespace) -> SpeedConfig:
    return SpeedConfig(amp=args.amp, channels_last=bool(args.channels_last), compile=args.compile)


def run_options(args: argparse.Namespace) -> RunOptions:
    base = RunOptions()
    return RunOptions(
        name=args.name or "",
        storage=args.storage,
        workers=int(args.workers),
        cpus_per_worker=float(args.cpus_per_worker),
        gpu=bool(args.gpu),
        max_failures=int(args.max_failures),
        keep=int(args.keep),
        address=args.address,
        metric=getattr(args, "metric", None) or base.metric,
        mode=getattr(args, "mode", None) or base.mode,
        log_every=int(getattr(args, "log_every", 0) or 0),
        trace_dir=getattr(args, "trace_dir", None),
    )


def train_config(
    args: argparse.Namespace,
    stage: str,
    *,
    mag: str | None,
    train_splits: str,
    teacher: TeacherRef | None = None,
) -> TrainConfig:
    """The whole (unplanned) :class:`TrainConfig` of parsed training options: ``mag`` the
    magnification the model reads ("" or None: the stage's default), ``train_splits`` the
    default of ``--train-splits``. ``--arch`` unset means the teacher's (resnet18 without one)."""
    return TrainConfig(
        stage=stage,
        data=data_config(args, train_splits=train_splits),
        model=ModelConfig(arch=getattr(args, "arch", None) or "", mag=mag or ""),
        optim=optim_config(args),
        loss=loss_config(args),
        speed=speed_config(args),
        run=run_options(args),
        teacher=teacher,
    )


def main(
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """``python -m`` entry of a command: parse ``argv``, ``run``; 130 on Ctrl-C."""
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130


def exit_code(prog: str, work: Callable[[], object]) -> int:
    """Run ``work()``; errors as one line on stderr. 0 ok, 1 the run failed, 2 unusable input."""
    import sys

    from resdistill.errors import UsageError

    try:
        work()
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in ("TrainingFailedError", "ControllerError", "WorkerGroupError"):
            print(f"{prog}: training failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
