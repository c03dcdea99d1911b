"""Predict the class of whole slides and draw heatmaps of tile probabilities.

CKPT is a checkpoint folder (local or s3://), its model.pt or a tune result JSON. Each SLIDE (a
file OpenSlide reads, or a folder scanned for them) is read exactly as the dataset the model was
trained on was sharded (the checkpoint's read chain): the same tissue mask and grid of regions at
the dataset's top magnification, each region reduced to the model's magnification and encoded as
in the shards. A checkpoint without a read chain is read from the slide's pyramid at its
magnification (said once). The slide's class is the argmax of the mean tile probabilities.

Writes to --out, per slide: <slide>.json (class, probabilities, grid, every tile's
probabilities), <slide>.heatmap.npy (rows x cols x classes, NaN off tissue) and
<slide>.heatmap-<class>.png (the thumbnail with the class probability painted over each tile).
With --annotations (QuPath GeoJSON, matched to slides as `resdistill shard --annotations` does),
each slide's outlines are drawn over its heatmaps, a legend strip below: classes solid, one colour
per class on every slide; regions of interest white dashes; ignored areas grey short dashes.

exit codes: 0 all slides predicted; 1 some slides skipped or annotation files unusable (listed);
2 unusable checkpoint or options.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint folder, model.pt or tune result JSON"
    )
    p.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide files, or folders scanned for them"
    )
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--heatmap",
        default="predicted",
        help="heatmap classes: 'predicted' (the slide's class), 'all', or a comma list (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="tiles per inference batch (default: %(default)s)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        help="minimum tissue fraction of a region (default: the one the model's dataset was "
        "sharded with; 0.5 for a checkpoint without a read chain)",
    )
    p.add_argument(
        "--mpp", type=float, help="microns per level-0 pixel for slides that do not record it"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.55,
        help="heatmap opacity over the thumbnail (default: %(default)s)",
    )
    p.add_argument("--cmap", default="viridis", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--annotations",
        metavar="DIR_OR_URL",
        help="folder or s3:// prefix of QuPath GeoJSON exports, one <slide>.geojson per slide "
        "(as for shard): their outlines are drawn over the slide's heatmaps; slides without "
        "a file are predicted without outlines",
    )


def run(args: argparse.Namespace) -> int:
    import matplotlib
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from resdistill.checkpoint import load_model
    from resdistill.errors import UsageError
    from resdistill.eval.annotation_overlay import AnnotationOverlays
    from resdistill.eval.predict import heatmap_classes, predict_slides
    from resdistill.eval.tiling import chain_of
    from sharding.annotation_set import AnnotationSetError
    from sharding.pipeline import find_slides
    from sharding.storage import StorageError

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    if args.batch_size < 1:
        print("predict: error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.cmap not in matplotlib.colormaps:
        print(
            f"predict: error: unknown colormap {args.cmap!r} (try viridis, magma, RdYlBu_r)",
            file=sys.stderr,
        )
        return 2
    try:
        model = load_model(args.checkpoint, device=args.device or "cpu")
        chain = chain_of(model, min_tissue=args.min_tissue, mpp=args.mpp)
        heatmap_classes(args.heatmap, model.classes)
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2

    def skip(message: str) -> None:
        err.print(f"[red]skipped[/red] {escape(message)}", soft_wrap=True)

    found, problems = find_slides(args.slides)
    for problem in problems:
        skip(problem)
    if not found:
        print(
            "predict: error: no slide to predict (no file given, or the folders hold none)",
            file=sys.stderr,
        )
        return 2
    annotations = None
    if args.annotations:
        try:
            annotations = AnnotationOverlays(
                args.annotations,
                found,
                lambda line: err.print(
                    f"[yellow]annotations[/yellow] {escape(line)}", soft_wrap=True
                ),
            )
        except (AnnotationSetError, StorageError) as exc:
            print(f"predict: error: --annotations: {exc}", file=sys.stderr)
            return 2
    for note in chain.notes:  # once, when the options are settled and prediction starts
        err.print(f"[yellow]note[/yellow] {escape(note)}", soft_wrap=True)
    table = Table(
        title=f"{model.name} ({model.meta.get('arch')} at {model.mag}) on {len(found)} slide(s)",
        header_style="bold",
    )
    for col in ("slide", "class", "probability", "tiles", "grid", "seconds"):
        table.add_column(col)
    predicted = 0
    try:
        for pred in predict_slides(
            model, found, args.out, heatmap=args.heatmap, alpha=args.alpha, cmap=args.cmap,
            batch_size=args.batch_size, device=args.device, on_skip=skip,
            annotations=annotations, chain=chain,
        ):  # fmt: skip
            predicted += 1
            table.add_row(
                pred.slide_id, pred.predicted, f"{float(pred.probs.max()):.3f}",
                str(pred.n_tiles), f"{pred.plan.rows}x{pred.plan.cols}", f"{pred.seconds:.1f}",
            )  # fmt: skip
    except StorageError as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    console.print(table)
    console.print(f"output: {args.out}", soft_wrap=True)
    unusable = annotations is not None and annotations.problems > 0
    return 1 if problems or unusable or predicted < len(found) else 0
