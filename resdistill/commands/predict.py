"""Predict the class of whole slides and draw heatmaps of tile probabilities, on Ray Data.

CKPT is a checkpoint folder (local or s3://), its model.pt or a tune result JSON. Each SLIDE (a
file OpenSlide reads, a folder scanned for them, or an s3:// slide or prefix) is read as the
dataset the model was trained on was sharded (--read as-trained: the checkpoint's read chain,
the same tissue mask and grid of regions at the dataset's top magnification, each region reduced
and encoded as in the shards) or from the pyramid level nearest the model's magnification
(--read native: the cheap read). The slide's class is the argmax of its mean tile probabilities.

Runs on a local Ray by default, on a cluster with --address auto (or under `ray job submit`):
slides are planned as Ray tasks, regions read and decoded on CPU tasks and scored in a pool of
--actors inference actors (one GPU each on cuda).

With --cascade TEACHER_CKPT the student scores every tile and the tiles whose top probability is
under --escalate are read again at the teacher's magnification (on the same regions) and scored
by the teacher; the slide aggregates the mix. The summary says the share escalated and the
counted FLOPs against the teacher alone.

Writes to --out, per slide as soon as it is done: <slide>.json (class, probabilities, grid,
status), <slide>.heatmap.npy (rows x cols x classes, NaN off tissue), <slide>.heatmap-<class>.png
and <slide>.heatmap-classes.png, parts/<slide>.tiles.parquet; at the end slides.parquet (one row
per slide, failed ones with their reason) and tiles.parquet. A rerun skips the slides already
done. With --annotations (QuPath GeoJSON, matched to slides as `resdistill shard --annotations`
does) each slide's outlines are drawn over its heatmaps.

exit codes: 0 all slides predicted; 1 some slides failed or annotation files unusable (listed);
2 unusable checkpoint or options.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from resdistill.cascade.rules import DEFAULT_ESCALATE
    from resdistill.predict.heatmaps import DEFAULT_HEATMAP_PX

    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint folder, model.pt or tune result JSON"
    )
    p.add_argument(
        "slides", nargs="+", metavar="SLIDE",
        help="slide files, folders scanned for them, or s3:// slides or prefixes",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--heatmap",
        default="predicted",
        help="heatmap classes: 'predicted' (the slide's class), 'all', a comma list, or 'none' (no "
        "pictures: the tables and the .npy heatmap only, for cohorts) (default: %(default)s)",
    )
    p.add_argument(
        "--heatmap-px", type=int, default=DEFAULT_HEATMAP_PX,
        help="long side in pixels of the slide picture under the heatmaps (default: %(default)s)",
    )  # fmt: skip
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
        "--read", choices=("as-trained", "native"), default="as-trained",
        help="as-trained: the pixels of the model's dataset (its read chain); native: the "
        "model's magnification from the best pyramid level at or above it, the cheap read "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--cascade", metavar="TEACHER_CKPT",
        help="teacher checkpoint: tiles the model is unsure of are scored by the teacher",
    )  # fmt: skip
    p.add_argument(
        "--escalate", type=float, metavar="T",
        help="with --cascade: escalate tiles whose top probability is under T (default: "
        f"{DEFAULT_ESCALATE:g})",
    )  # fmt: skip
    p.add_argument(
        "--alpha", type=float, default=0.55,
        help="heatmap opacity over the slide picture (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--cmap", default="viridis", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when the cluster has GPUs)")
    p.add_argument(
        "--address",
        help="Ray cluster address ('auto' for the cluster this node belongs to; default: the "
        "submitted job's cluster, else a local Ray)",
    )
    p.add_argument(
        "--actors", type=int,
        help="inference actors per model (default: one per GPU on cuda, else a quarter of the "
        "CPUs, at least one)",
    )  # fmt: skip
    p.add_argument(
        "--annotations",
        metavar="DIR_OR_URL",
        help="folder or s3:// prefix of QuPath GeoJSON exports, one <slide>.geojson per slide "
        "(as for shard): their outlines are drawn over the slide's heatmaps; slides without "
        "a file are predicted without outlines",
    )


def run(args: argparse.Namespace) -> int:
    from resdistill.predict.driver import predict_command

    return predict_command(args)
