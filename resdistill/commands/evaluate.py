"""Evaluate one or more models on a split of a dataset and compare them in one table.

Each CKPT is a checkpoint folder printed by a run (local or s3://.../checkpoint_epochNNNN), its
model.pt, a tune result JSON {"checkpoint": url, "config": {...}} or a run summary JSON. Every
model reads the split at its own magnification (a teacher at 10x, students at 5x or 2.5x...)
with its own normalization, in eval mode, without augmentation.

Reported per model, each with a 95% bootstrap confidence interval: tile-level and slide-level
(mean tile probability per slide) accuracy, macro F1, precision, recall, per-class AUC; and the
compute cost: parameters, FLOPs per tile (counted) and images/s measured on this machine.

Writes to --out: evaluation.json, predictions-<model>.csv, roc.png, accuracy_vs_flops.png.

exit codes: 0 done; 2 unusable input (checkpoint not found, magnification or classes that the
dataset lacks, empty split).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoint folder, model.pt or tune result JSON",
    )
    p.add_argument("--data", required=True, help="dataset root: a folder or s3://bucket/prefix")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="split to score (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--names",
        help="comma list of display names, one per CKPT (default: the checkpoint's stage)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="inference batch size (default: %(default)s)"
    )
    p.add_argument(
        "--loader-workers", type=int, default=2, help="DataLoader processes (default: %(default)s)"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.05, help="1 - confidence level (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument(
        "--bench-batch",
        type=int,
        default=32,
        help="batch of the images/s measurement (default: %(default)s)",
    )
    p.add_argument(
        "--bench-seconds",
        type=float,
        default=2.0,
        help="time spent measuring images/s per model (default: %(default)s)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from resdistill.errors import UsageError
    from resdistill.eval.evaluate import evaluate_models
    from resdistill.eval.report import format_table
    from sharding.storage import StorageError

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: room for the whole table
        console = Console(highlight=False, width=max(console.width, 150))
    err = Console(stderr=True, highlight=False)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    for opt in ("batch_size", "bench_batch", "n_boot"):
        if getattr(args, opt) < 1:
            err.print(f"[red]error:[/red] --{opt.replace('_', '-')} must be at least 1")
            return 2
    if not 0 < args.alpha < 1:
        err.print("[red]error:[/red] --alpha must be between 0 and 1")
        return 2
    try:
        report = evaluate_models(
            args.checkpoints,
            args.data,
            args.split,
            out=args.out,
            names=names,
            n_boot=args.n_boot,
            alpha=args.alpha,
            seed=args.seed,
            batch_size=args.batch_size,
            num_workers=max(0, args.loader_workers),
            device=args.device,
            bench_batch=args.bench_batch,
            bench_seconds=args.bench_seconds,
            plots=not args.no_plots,
            log=lambda msg: err.print(msg, style="dim", markup=False, soft_wrap=True),
        )
    except (UsageError, StorageError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    console.print(format_table(report))
    for kind, url in report.files.items():
        if not kind.startswith("predictions:"):
            console.print(f"{kind + ':':<19}{url}", soft_wrap=True)
    return 0
