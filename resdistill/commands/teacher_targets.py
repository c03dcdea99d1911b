"""Cached teacher targets: run the frozen teacher once over the shards and store its outputs, so
distillation with ``--targets`` pays for the student alone (see :mod:`resdistill.train.targets`).

``resdistill teacher-targets --data s3://bucket/ds --teacher s3://bucket/runs/t1/ckpt`` (or
``python -m resdistill.teacher_targets ...``).
"""

from __future__ import annotations

import argparse
import sys

from resdistill.commands.common import show_defaults


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``resdistill teacher-targets``."""
    parser.add_argument(
        "--data", required=True, help="dataset root: a folder or s3://bucket/prefix"
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (local or s3)")
    parser.add_argument(
        "--out", default=None, help="targets root (default: <data>/_targets/<teacher sha256[:16]>)"
    )
    parser.add_argument("--splits", default=None, help="comma list (default: every split)")
    parser.add_argument(
        "--student-mags",
        default=None,
        help="comma list of student magnifications to pool maps for (default: all below the "
        "teacher's)",
    )
    parser.add_argument("--teacher-mag", default=None, help="default: the teacher's own")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    return show_defaults(parser)


def run(args: argparse.Namespace) -> int:
    """Compute the targets; print where they are. 0 ok, 2 unusable input."""
    from resdistill.commands.common import split_list as split
    from resdistill.errors import UsageError
    from resdistill.train.targets import write_targets
    from sharding.magnification import display_mag

    try:
        index = write_targets(
            args.data,
            args.teacher,
            out=args.out,
            splits=split(args.splits),
            student_mags=split(args.student_mags),
            teacher_mag=args.teacher_mag,
            batch_size=args.batch_size,
            use_ray=not args.local,
            address=args.address,
            log=print,
        )
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"teacher-targets: error: {exc}", file=sys.stderr)
        return 2
    d = index.doc
    maps = ", ".join(display_mag(m) for m in d["sizes"])
    print(
        f"{d['samples']} samples in {len(d['shards'])} shards, teacher {d['teacher']['arch']} at "
        f"{display_mag(d['teacher_mag'])}, maps for {maps}, {d['seconds']:.1f} s -> {index.url}"
    )
    print(f"distill with: --teacher {d['teacher']['checkpoint']} --targets {index.url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher_targets``."""
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.teacher_targets",
        description="Run the frozen teacher once over the shards and store its targets.",
    )
    return run(add_arguments(parser).parse_args(argv))
