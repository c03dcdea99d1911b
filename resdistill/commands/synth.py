"""Write synthetic H&E-like whole-slide images (Aperio SVS and generic tiled TIFF pyramids).

Tissue islands on glass with class-dependent morphology whose cues live at different scales, at
20x and 40x base magnification, plus labels.csv (slide,label,patient) for the labelled slides and
truth.csv with every slide's class. Deterministic for a seed: the embedded demo and test data.
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")
    p.add_argument("--slides", type=int, default=6, help="number of slides (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--labeled-fraction",
        type=float,
        default=1.0,
        help="share of slides listed in labels.csv; the rest are unlabeled (default: %(default)s)",
    )
    p.add_argument("--size-um", help="slide size in micrometres, WxH (default: the generator's)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sharding.progress import console
    from sharding.synthetic import write_synthetic_slides

    if args.slides < 1:
        console.print("[red]error:[/red] --slides must be at least 1")
        return 2
    if not 0.0 <= args.labeled_fraction <= 1.0:
        console.print("[red]error:[/red] --labeled-fraction must be within 0..1")
        return 2
    kwargs = {}
    if args.size_um:
        try:
            w, h = (float(v) for v in args.size_um.lower().split("x"))
        except ValueError:
            console.print(
                f"[red]error:[/red] --size-um takes WxH in micrometres, got {args.size_um!r}"
            )
            return 2
        kwargs["size_um"] = (w, h)
    start = time.monotonic()
    slides = write_synthetic_slides(
        args.out,
        args.slides,
        seed=args.seed,
        labeled_fraction=args.labeled_fraction,
        workers=args.workers or os.cpu_count() or 1,
        **kwargs,
    )
    table = Table(title=f"{len(slides)} synthetic slides in {args.out}", title_justify="left")
    for col in ("slide", "format", "base", "size (px)", "label", "patient"):
        table.add_column(col)
    for s in slides:
        table.add_row(
            s.slide, s.format, f"{s.base_mag:g}x", f"{s.width}x{s.height}", s.label, s.patient
        )
    console.print(table)
    console.print(f"written in {time.monotonic() - start:.1f}s")
    return 0
