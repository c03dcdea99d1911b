"""Evaluate one or more models on a split of a dataset and compare them in one table.

Each CKPT is a checkpoint folder printed by a run (local or s3://.../checkpoint_epochNNNN), its
model.pt, a tune result JSON {"checkpoint": url, "config": {...}} or a run summary JSON. Every
model reads the split at its own magnification (a teacher at 10x, students at 5x or 2.5x...)
with its own normalization, in eval mode, without augmentation.

Reported per model, each with a 95% bootstrap confidence interval: tile-level and slide-level
(mean tile probability per slide) accuracy, macro F1, precision, recall, per-class AUC; and the
compute cost: parameters, FLOPs per tile (counted) and images/s measured on this machine.

Writes to --out: evaluation.json, predictions-<model>.csv, roc.png, accuracy_vs_flops.png.

With --cascade TEACHER_CKPT, each other CKPT is also scored as the student of a cascade: tiles
whose top student probability is under a threshold go to the teacher (at its magnification), for
every threshold of --thresholds. Adds cascade.json and cascade.png (accuracy against mean FLOPs
per tile, F_student + share escalated * F_teacher) and names the cheapest threshold whose tile
accuracy is within 1 point of the teacher's.

exit codes: 0 done; 2 unusable input (checkpoint not found, magnification or classes that the
dataset lacks, empty split, a cascade teacher with other classes than a student, a threshold
outside [0, 1]).
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
    p.add_argument(
        "--cascade",
        metavar="TEACHER_CKPT",
        help="also compute each CKPT's cascade with this teacher: accuracy vs compute over "
        "--thresholds (cascade.json, cascade.png)",
    )
    p.add_argument(
        "--thresholds",
        metavar="LIST",
        help="comma list in [0, 1] of escalation thresholds on the student's top probability "
        "(default: 0,0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.925,0.95,0.975,0.99; every tile "
        "escalated is always added)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from resdistill.cascade.curve import DEFAULT_THRESHOLDS, parse_thresholds
    from resdistill.errors import UsageError
    from resdistill.eval.cascade_eval import evaluate_cascade, format_cascade_tables
    from resdistill.eval.evaluate import evaluate_models
    from resdistill.eval.report_files import format_table
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
    thresholds = DEFAULT_THRESHOLDS
    if args.thresholds is not None:
        if args.cascade is None:
            print("evaluate: error: --thresholds needs --cascade TEACHER_CKPT", file=sys.stderr)
            return 2
        try:
            thresholds = tuple(parse_thresholds(args.thresholds))
        except ValueError as exc:
            print(f"evaluate: error: --thresholds: {exc}", file=sys.stderr)
            return 2
    kwargs = {
        "out": args.out,
        "names": names,
        "n_boot": args.n_boot,
        "alpha": args.alpha,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "num_workers": max(0, args.loader_workers),
        "device": args.device,
        "bench_batch": args.bench_batch,
        "bench_seconds": args.bench_seconds,
        "plots": not args.no_plots,
        "log": lambda msg: err.print(msg, style="dim", markup=False, soft_wrap=True),
    }
    cascade = None
    try:
        if args.cascade is None:
            report = evaluate_models(args.checkpoints, args.data, args.split, **kwargs)
        else:
            report, cascade = evaluate_cascade(
                args.checkpoints, args.data, args.cascade, args.split, thresholds=thresholds,
                **kwargs,
            )  # fmt: skip
    except (UsageError, StorageError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    console.print(format_table(report))
    if cascade is not None:
        for item in format_cascade_tables(cascade):
            console.print(item)
    for kind, url in report.files.items():
        if not kind.startswith("predictions:"):
            console.print(f"{kind + ':':<19}{url}", soft_wrap=True)
    return 0
