"""Write synthetic H&E-like whole-slide images (Aperio SVS and generic tiled TIFF pyramids).

Tissue islands on glass with class-dependent morphology whose cues live at different scales, at
20x and 40x base magnification, plus labels.csv (slide,label,patient) for the labelled slides and
truth.csv with every slide's class (and scanning site, when the cohort has several).
Deterministic for a seed: the embedded demo and test data. ``--cohort`` picks a kind of set
that differs the way real cohorts do (scanning sites, subtle cues, many unlabelled slides).
"""

from __future__ import annotations

import argparse
import os
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sharding.synthetic.cohorts import COHORTS

    kinds = "; ".join(
        f"{c.name}: {c.models} ({c.slides} slides, {100 * c.labeled_fraction:.0f}%% labelled)"
        for c in COHORTS.values()
    )
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--cohort",
        default="default",
        help=f"kind of slide set, or several joined by '+' (e.g. sites+subtle): {kinds} "
        "(default: %(default)s)",
    )
    p.add_argument("--slides", type=int, help="number of slides (default: the cohort's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--labeled-fraction",
        type=float,
        help="share of slides listed in labels.csv; the rest are unlabeled (default: the cohort's)",
    )
    p.add_argument("--size-um", help="slide size in micrometres, WxH (default: the generator's)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sharding.progress import console
    from sharding.synthetic import cohort_named, site_name, write_synthetic_slides

    try:
        cohort = cohort_named(args.cohort)
    except ValueError as exc:
        console.print(f"[red]error:[/red] --cohort: {exc}")
        return 2
    n_slides = cohort.slides if args.slides is None else args.slides
    if n_slides < 1:
        console.print("[red]error:[/red] --slides must be at least 1")
        return 2
    if args.labeled_fraction is not None and not 0.0 <= args.labeled_fraction <= 1.0:
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
        n_slides,
        seed=args.seed,
        labeled_fraction=args.labeled_fraction,
        workers=args.workers or os.cpu_count() or 1,
        cohort=cohort,
        **kwargs,
    )
    title = f"{len(slides)} synthetic slides of cohort {cohort.name} in {args.out}"
    table = Table(title=title, title_justify="left")
    cols = ["slide", "format", "base", "size (px)", "label", "patient", "labelled"]
    cols += ["site"] if cohort.sites > 1 else []
    for col in cols:
        table.add_column(col)
    for s in slides:
        row = [s.slide, s.format, f"{s.base_mag:g}x", f"{s.width}x{s.height}", s.label, s.patient]
        row += ["yes" if s.labeled else "no"]
        row += [site_name(s.site)] if cohort.sites > 1 else []
        table.add_row(*row)
    console.print(table)
    console.print(f"written in {time.monotonic() - start:.1f}s")
    return 0
