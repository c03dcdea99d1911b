"""Teacher pretraining: a supervised ResNet at the dataset's highest magnification, on Ray Train.

``python -m resdistill.teacher --data s3://bucket/dataset --storage s3://bucket/runs --name t1``
(or ``resdistill teacher ...``; or ``ray job submit -- python -m resdistill.teacher ...``).

Each of ``--workers`` Ray Train workers (DDP: gloo on CPU, NCCL + bf16 autocast with ``--gpu``)
streams its own disjoint shards of the ``train`` split, decodes only the teacher's magnification,
and takes the same number of steps per epoch (see :mod:`resdistill.data`). The loss is
``cross_entropy(logits, label)`` (optionally label-smoothed). After every epoch the ``val`` split
is scored on all ranks (accuracy and macro F1 from summed confusion matrices) and a checkpoint is
reported to ``<storage>/<name>``; the best one by ``val_macro_f1`` and the latest are kept.
Rerunning with the same ``--name`` and ``--storage`` resumes after the latest checkpoint, and a
worker that dies is restarted from it (``--max-failures``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from resdistill.train_options import ARCH_CHOICES, add_speed_arguments, speed_config

STAGE = "teacher"


class UsageError(ValueError):
    """Options or data that cannot work; reported as one line, exit status 2."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the teacher's options to ``parser`` (shared by ``resdistill teacher``)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    g.add_argument(
        "--mag", default=None, help="magnification to train at (default: the dataset's highest)"
    )
    g.add_argument("--train-splits", default="train", help="comma list of training splits")
    g.add_argument("--val-split", default="val", help="split scored after every epoch")
    g.add_argument(
        "--label-fraction",
        type=float,
        default=1.0,
        help="use the labels of only this share of the training slides (at least one per class; "
        "a label-scarce experiment)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="per-worker batch size")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes per worker")
    g.add_argument("--shuffle-buffer", type=int, default=1000, help="samples in the shuffle buffer")
    g.add_argument(
        "--jitter",
        type=_floats,
        default="0.2,0.2,0.2,0.05",
        help="colour jitter brightness,contrast,saturation,hue (0 disables; paper: 0.5,0.5,0.5,0.2)",
    )
    g.add_argument("--no-flips", action="store_true", help="no random flips / 90-degree rotations")
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="batches per worker per epoch (default: train samples // (workers x batch))",
    )

    g = parser.add_argument_group("model and optimisation")
    g.add_argument(
        "--arch",
        default="resnet18",
        choices=ARCH_CHOICES,
        help="torchvision ResNet (random init)",
    )
    g.add_argument("--epochs", type=int, default=10, help="total epochs of the run")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay")
    g.add_argument(
        "--optimizer", default="adam", choices=("adam", "adamw", "sgd"), help="sgd: Nesterov 0.9"
    )
    g.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "constant", "linear"),
        help="learning-rate decay over all steps of --epochs",
    )
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy smoothing")
    g.add_argument("--seed", type=int, default=0, help="model init, shuffling and augmentation")

    g = parser.add_argument_group("run")
    g.add_argument("--storage", default="runs", help="run storage: a folder or s3://bucket/prefix")
    g.add_argument(
        "--name", default=None, help="run name; rerun with the same name to resume (default: new)"
    )
    g.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker")
    g.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    add_speed_arguments(g)
    g.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    g.add_argument("--keep", type=int, default=1, help="best checkpoints kept (plus the latest)")
    g.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)"
    )
    g.add_argument("--log-every", type=int, default=0, help="print every N steps (0: per epoch)")
    g.add_argument("--summary-json", default=None, help="also write the final summary here")
    g.add_argument(
        "--trace-dir",
        default=None,
        help="local folder for a JSON-lines trace of worker starts and epochs (debugging)",
    )
    for action in parser._actions:  # show defaults in --help, whichever formatter the parser has
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.help and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.teacher",
        description="Train the high-magnification teacher on Ray Train.",
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


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the dataset against the options and build the workers' config (plain values)."""
    from resdistill.data import (
        DatasetInfo,
        read_manifest,
        select_labelled_slides,
        shard_keys,
        steps_per_epoch,
    )

    info = DatasetInfo.load(args.data)
    mag = info.resolve_mag(args.mag or info.highest)
    if info.num_classes < 2:
        raise UsageError(f"{args.data}: dataset.json lists {info.num_classes} class(es), need 2+")
    train_splits = [s.strip() for s in args.train_splits.split(",") if s.strip()]
    manifest = read_manifest(info.url)
    try:
        labelled = select_labelled_slides(manifest, train_splits, args.label_fraction, args.seed)
    except ValueError as exc:
        raise UsageError(f"--label-fraction: {exc}") from None
    train_keys = shard_keys(manifest, train_splits, labelled_only=True, labelled_slides=labelled)
    val_keys = shard_keys(manifest, [args.val_split], labelled_only=True)
    n_train = sum(len(v) for v in train_keys.values())
    n_val = sum(len(v) for v in val_keys.values())
    if n_val == 0:
        raise UsageError(f"{args.data}: split {args.val_split!r} has no labelled samples")
    try:
        steps = args.steps_per_epoch or steps_per_epoch(n_train, args.workers, args.batch_size)
    except ValueError as exc:
        raise UsageError(f"{args.data}: {exc}") from None
    return {
        "stage": STAGE,
        "data": info.url,
        "dataset": dict(info.raw),
        "mag": mag,
        "train_splits": train_splits,
        "labelled_slides": labelled,
        "val_split": args.val_split,
        "n_train": n_train,
        "n_val": n_val,
        "train_shards": len(train_keys),
        "steps_per_epoch": steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size or args.batch_size,
        "loader_workers": args.loader_workers,
        "shuffle_buffer": args.shuffle_buffer,
        "jitter": list(args.jitter),
        "flips": not args.no_flips,
        "arch": args.arch,
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "warmup_epochs": args.warmup_epochs,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "log_every": args.log_every,
        "trace_dir": args.trace_dir,
        **speed_config(args),
    }


def train(args: argparse.Namespace) -> Any:
    """Train a teacher as ``args`` say; print progress and a summary; return the RunSummary.

    Raises :class:`UsageError` (bad options or dataset) and Ray's ``TrainingFailedError``.
    """
    from rich.console import Console

    from resdistill import train_loop as T

    check_args(args)
    console = Console(highlight=False)
    config = build_config(args)
    name = args.name or f"{STAGE}-{config['mag']}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(
        f"[bold]teacher[/] {config['arch']} at {config['mag']} on {config['data']}: "
        f"{config['n_train']} train samples in {config['train_shards']} shards, "
        f"{config['n_val']} val; {args.workers} workers x batch {args.batch_size} x "
        f"{config['steps_per_epoch']} steps/epoch x {args.epochs} epochs"
    )
    console.print(f"run {name!r} -> {T.run_url(args.storage, name)}")
    T.ray_init(args.address)
    from resdistill.teacher import train_worker  # by reference, also under ``python -m``

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
    T.print_summary(summary, title=f"teacher {name}", console=console)
    if args.summary_json:
        from dataclasses import asdict

        with open(args.summary_json, "w") as fh:
            json.dump(asdict(summary), fh, indent=1, default=str)
    return summary


def run(args: argparse.Namespace) -> int:
    """``resdistill teacher``: :func:`train`, errors as one line; 0 ok, 1 failed run, 2 bad input."""
    try:
        train(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"teacher: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ in ("TrainingFailedError", "ControllerError", "WorkerGroupError"):
            print(f"teacher: training failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher``; returns the exit status."""
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------------------------------
# The training function (runs on every Ray Train worker)
# --------------------------------------------------------------------------------------------------


def train_worker(config: dict[str, Any]) -> None:
    """One DDP rank: stream shards, train with cross-entropy, validate, checkpoint each epoch."""
    import torch

    from resdistill import data as D
    from resdistill import train_loop as T
    from resdistill.models import build_model

    env = T.worker_env(config)
    if env.use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed tile sizes: let cuDNN pick its kernels
    torch.manual_seed(config["seed"])  # same init on every rank (DDP also broadcasts rank 0's)
    info = D.DatasetInfo.from_json(config["data"], config["dataset"])
    mag = config["mag"]
    log = T.console_log("[teacher] ")
    tracer = T.Tracer(config.get("trace_dir"), env)

    model = build_model(config["arch"], info.num_classes)
    restored = T.restore()
    state = T.TrainState()
    if restored is not None:
        model.load_state_dict(restored.model["state_dict"])
        state = restored.state
        if env.is_main:
            log(f"resuming after epoch {state.epoch} from {restored.path}")
            if state.epoch >= config["epochs"]:
                log(f"run already has {state.epoch} epochs: raise --epochs to train further")
    tracer.start(state.epoch)
    model = T.prepare_model(model, env)
    optimizer = T.make_optimizer(
        model.parameters(), config["optimizer"], config["lr"], config["weight_decay"]
    )
    if restored is not None:
        optimizer.load_state_dict(restored.trainer["optimizer"])

    manifest = D.read_manifest(info.url)
    train_loader = D.make_loader(
        info,
        config["train_splits"],
        [mag],
        batch_size=config["batch_size"],
        train=True,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=config["loader_workers"],
        shuffle_buffer=config["shuffle_buffer"],
        augment=D.PairedAugment(config["jitter"], flips=config["flips"]),
        seed=config["seed"],
        epoch=state.epoch,
        steps=config["steps_per_epoch"],
        labelled_only=True,
        pin_memory=env.use_cuda,
        manifest=manifest,
        labelled_slides=config.get("labelled_slides"),
    )
    val_loader = D.make_loader(
        info,
        [config["val_split"]],
        [mag],
        batch_size=config["eval_batch_size"],
        train=False,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=config["loader_workers"],
        labelled_only=True,
        pin_memory=env.use_cuda,
        manifest=manifest,
    )
    steps = train_loader.steps or 1
    total_steps = config["epochs"] * steps
    warmup = int(round(config["warmup_epochs"] * steps))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])

    def lr_now() -> float:
        return T.lr_at(
            state.step,
            base_lr=config["lr"],
            total_steps=total_steps,
            schedule=config["schedule"],
            warmup_steps=warmup,
        )

    def train_epoch(epoch: int) -> T.EpochResult:
        model.train()
        loss_sum = torch.zeros((), device=env.device)
        correct = torch.zeros((), device=env.device)
        n = 0
        done = 0
        for batch in train_loader.epoch():
            x = env.input(batch.images[0])
            y = batch.labels.to(env.device, non_blocking=True)
            T.set_lr(optimizer, lr_now())
            with env.autocast():
                logits, _ = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            done += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            n += len(y)
            if config["log_every"] and env.is_main and done % config["log_every"] == 0:
                log(f"epoch {epoch} step {done}/{steps} loss {float(loss):.4f}")
        metrics = T.reduce_means(
            {"train_loss": float(loss_sum), "train_accuracy": float(correct)}, n, env
        )
        metrics["lr"] = lr_now()
        return T.EpochResult(metrics, done, n)

    def validate(epoch: int) -> dict[str, float]:
        return T.evaluate(model, val_loader, env, info.num_classes)

    def model_payload() -> dict[str, Any]:
        mean, std = info.mean_std(mag)
        return {
            "format": T.CHECKPOINT_FORMAT,
            "stage": STAGE,
            "arch": config["arch"],
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "mag": mag,
            "tile_px": int(info.tile_px.get(mag, 0)),
            "normalization": {"mean": list(mean), "std": list(std)},
            "dataset": info.url,
            "state_dict": {k: v.detach().cpu() for k, v in T.unwrap(model).state_dict().items()},
        }

    def trainer_payload(st: T.TrainState) -> dict[str, Any]:
        plain = {k: v for k, v in config.items() if k != "dataset"}
        return {"optimizer": optimizer.state_dict(), "state": st.to_dict(), "config": plain}

    try:
        T.fit(
            env=env,
            state=state,
            epochs=config["epochs"],
            train_epoch=train_epoch,
            validate=validate,
            model_payload=model_payload,
            trainer_payload=trainer_payload,
            tracer=tracer,
            log=log,
        )
    finally:
        train_loader.close()
        val_loader.close()


if __name__ == "__main__":
    sys.exit(main())
