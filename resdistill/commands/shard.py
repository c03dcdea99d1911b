"""Tile whole-slide images at several magnifications into WebDataset shards plus a manifest.

Every sample is one region of tissue at every requested magnification (highest first; the tile at
--tile-px pixels at the highest, proportionally smaller below; --low-mags-from says whether the
lower ones are reduced from the highest one's read or read from the slide's own pyramid levels).
Output goes to a local folder or to s3://bucket/prefix (endpoint and credentials from the standard
AWS environment, e.g. AWS_ENDPOINT_URL). Reruns resume: finished slides are skipped, half-written
shards discarded. One run at a time holds an output (a lease in <out>/_state/lease.json); a second
is refused.

Region annotations (--annotations, QuPath GeoJSON) label each region by the class covering most of
it, drop regions touching an ignored class, and restrict tiling to regions of interest.

exit codes: 0 all slides sharded; 1 some slides, label rows or annotations skipped or repaired
(listed); 2 unusable options.
"""

from __future__ import annotations

import argparse
import sys

from sharding.options import IGNORE_CLASSES, LOW_MAGS_FROM, AnnotationOptions


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--splits takes train,val,test ratios, got {text!r}"
        ) from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"--splits takes three non-negative ratios, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="+", help="slide files, or folders scanned for slide files")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--mags",
        default="10,5,2.5,1.25",
        help="magnifications, highest first (default: %(default)s)",
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=224,
        help="tile edge at the highest magnification (default: %(default)s)",
    )
    p.add_argument(
        "--low-mags-from",
        choices=LOW_MAGS_FROM,
        default="top",
        help="where lower magnifications come from: 'top' reduces each region's read at the "
        "highest magnification (one read per region, the same pixels whatever the slide's "
        "pyramid); 'native' reads each from the slide's best pyramid level at or above it (one "
        "read per magnification), the pixels 'predict --read native' serves a student, so "
        "train on them when the student will be served native reads (default: %(default)s)",
    )
    p.add_argument(
        "--labels",
        help="CSV with columns slide,label[,patient]; a row 'slide,,patient' puts an unlabelled "
        "slide in its patient's split; other slides not labelled go to 'unlabeled'",
    )
    p.add_argument("--classes", help="comma list of allowed labels (rows with others are refused)")
    p.add_argument(
        "--annotations",
        metavar="DIR_OR_URL",
        help="folder or s3:// prefix of QuPath GeoJSON exports, one <slide>.geojson per slide: "
        "their classes label the regions they cover (winning over --labels for those slides' "
        "tiles), unclassified polygons mark regions of interest",
    )
    p.add_argument(
        "--min-label-fraction",
        type=float,
        default=0.5,
        help="a region takes the class covering at least this fraction of it; also the share "
        "of a region that regions of interest must cover (default: %(default)s)",
    )
    p.add_argument(
        "--ignore-classes",
        default=",".join(IGNORE_CLASSES),
        help="comma list of classes (shell patterns, any case) whose polygons remove the "
        "regions they overlap (default: %(default)s)",
    )
    p.add_argument(
        "--annotated-only",
        action="store_true",
        help="keep only regions an annotation class labels; slides without one are skipped",
    )
    p.add_argument(
        "--splits",
        type=_ratios,
        default=(0.7, 0.15, 0.15),
        help="train,val,test ratios by slide/patient (default: 0.7,0.15,0.15)",
    )
    p.add_argument(
        "--mpp", type=float, help="microns per level-0 pixel for slides that do not record it"
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="minimum tissue fraction of a region (default: %(default)s)",
    )
    p.add_argument("--shard-size", default="256MB", help="target shard size (default: %(default)s)")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("jpeg", "png"),
        default="jpeg",
        help="tile encoding (default: %(default)s)",
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (e.g. auto); default starts a local Ray")
    p.add_argument(
        "--workers",
        type=int,
        help="CPUs for a local Ray (default: all); 0 runs in-process without Ray",
    )
    p.add_argument("--resources", help="custom Ray resources each slide task needs, e.g. shard=1")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the split assignment and shard mixing"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def _resources(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        out[name.strip()] = float(value or 1)
    return out


def _annotations(args: argparse.Namespace) -> AnnotationOptions | None:
    """AnnotationOptions from the options, None without --annotations (ShardError if misused)."""
    from sharding.pipeline import ShardError

    if not args.annotations:
        if args.annotated_only:
            raise ShardError("--annotated-only needs --annotations")
        return None
    try:
        return AnnotationOptions(
            source=args.annotations,
            min_label_fraction=args.min_label_fraction,
            ignore=tuple(c.strip() for c in args.ignore_classes.split(",") if c.strip()),
            annotated_only=args.annotated_only,
        )
    except ValueError as exc:
        raise ShardError(str(exc)) from None


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, a scheduler's kill) unwinds like Ctrl-C, so the run releases
    its lease on the output and aborts its unpublished shards."""
    import contextlib
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not the main thread: leave signals to the caller
        signal.signal(signal.SIGTERM, interrupt)


def run(args: argparse.Namespace) -> int:
    from sharding.labels import LabelsError
    from sharding.pipeline import ShardError, run_shard
    from sharding.progress import console, print_summary
    from sharding.storage import StorageError

    _interrupt_on_sigterm()
    try:
        report = run_shard(
            args.slides,
            args.out,
            mags=args.mags,
            tile_px=args.tile_px,
            labels=args.labels,
            classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
            annotations=_annotations(args),
            splits=args.splits,
            mpp=args.mpp,
            min_tissue=args.min_tissue,
            shard_size=args.shard_size,
            fmt=args.fmt,
            quality=args.quality,
            low_mags_from=args.low_mags_from,
            address=args.address,
            workers=args.workers,
            resources=_resources(args.resources),
            overwrite=args.overwrite,
            seed=args.seed,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (ShardError, LabelsError, StorageError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    print_summary(report)
    return 0 if report.ok else 1
