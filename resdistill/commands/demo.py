"""Run the whole pipeline end to end on the embedded default: synthetic slides, local Ray, a local
folder as storage. Each stage is the same code the individual commands run; rerunning resumes.

Stages: synth -> shard (more stages join as they land: teacher, distill, evaluate).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="working folder (default: %(default)s)")
    p.add_argument("--slides", type=int, default=8, help="synthetic slides (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the slides and splits (default: %(default)s)"
    )
    p.add_argument(
        "--mags", default="10,5,2.5,1.25", help="magnifications to shard (default: %(default)s)"
    )
    p.add_argument(
        "--size-um", default="3000x2400", help="slide size in micrometres (default: %(default)s)"
    )
    p.add_argument("--address", help="Ray cluster address; default starts a local Ray on 127.0.0.1")


def run(args: argparse.Namespace) -> int:
    from sharding.pipeline import run_shard
    from sharding.progress import console, print_summary
    from sharding.synth import LABELS_CSV, write_synthetic_slides

    out = Path(args.out)
    slides_dir, dataset = out / "slides", out / "dataset"
    w, h = (float(v) for v in args.size_um.lower().split("x"))
    if not (slides_dir / LABELS_CSV).exists():
        console.rule("[bold]1. synthetic slides")
        written = write_synthetic_slides(slides_dir, args.slides, seed=args.seed, size_um=(w, h))
        console.print(f"{len(written)} slides in {slides_dir}")
    console.rule("[bold]2. shard")
    report = run_shard(
        [slides_dir],
        str(dataset),
        mags=args.mags,
        labels=slides_dir / LABELS_CSV,
        address=args.address,
        seed=args.seed,
        shard_size="64MB",
        progress=console.is_terminal,
    )
    print_summary(report)
    return 0 if report.ok else 1
