"""``resdistill predict``: classify whole slides and draw heatmaps of tile probabilities."""

from __future__ import annotations

from resdistill.commands.generate import CommandSpec
from resdistill.predict.config import PredictConfig

SPEC = CommandSpec(
    name="predict",
    config=PredictConfig,
    summary="classify slides and draw tile-probability heatmaps, on Ray Data",
    description="""\
CKPT (and TEACHER_CKPT) is a checkpoint folder, its model.pt, a run folder (its best checkpoint),
a run summary JSON (--summary-json) or a tune result JSON, local or s3://. Each SLIDE (a
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
per slide, failed ones with their reason) and tiles.parquet; config.yaml holds the resolved
options (--config on it repeats the run). A rerun skips the slides already done. With
--annotations (QuPath GeoJSON, matched to slides as `resdistill shard --annotations` does) each
slide's outlines are drawn over its heatmaps. With --geojson, <slide>.geojson holds the tiles as
QuPath detections (class and p_<class> measurements) and/or the merged class regions as
annotations, in QuPath's pixels (File > Import objects).

exit codes: 0 all slides predicted; 1 some slides failed or annotation files unusable (listed);
2 unusable checkpoint or options.""",
    examples=(
        "resdistill predict runs/s2p5x/checkpoint_epoch0010 slide.svs --out preds/",
        "resdistill predict s3://b/runs/s2p5x/ckpt s3://b/cohort/ --out s3://b/preds --address auto",
        "resdistill predict STUDENT_CKPT slides/ --cascade TEACHER_CKPT --escalate 0.9 --out p/",
        "resdistill predict runs/s2p5x slides/ --out preds/ --geojson both",
        "resdistill predict --config preds/config.yaml --read native --out preds-native/",
    ),
)


def run(cfg: PredictConfig) -> int:
    """Predict the slides ``cfg`` names: 0 all done, 1 some failed, 2 unusable input."""
    from resdistill.predict.driver import predict_command

    return predict_command(cfg)
