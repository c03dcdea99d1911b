"""``resdistill evaluate``: score models on a split of a dataset and compare them in one table."""

from __future__ import annotations

import sys

from resdistill.commands.generate import CommandSpec
from resdistill.eval.config import EvaluateConfig

SPEC = CommandSpec(
    name="evaluate",
    config=EvaluateConfig,
    summary="score checkpoints on a split: metrics with CIs, compute table, plots",
    description="""\
Each CKPT (and TEACHER_CKPT) is a checkpoint folder printed by a run (.../checkpoint_epochNNNN),
its model.pt, a run folder (its best checkpoint), a run summary JSON (--summary-json) or a tune
result JSON {"checkpoint": url, "config": {...}}, local or s3://. Every
model reads the split at its own magnification (a teacher at 10x, students at 5x or 2.5x...)
with its own normalization, in eval mode, without augmentation.

Reported per model, each with a 95% bootstrap confidence interval: tile-level and slide-level
(mean tile probability per slide) accuracy, macro F1, precision, recall, per-class AUC; and the
compute cost: parameters, FLOPs per tile (counted) and images/s measured on this machine.

Writes to --out: evaluation.json, predictions-<model>.csv, roc.png, accuracy_vs_flops.png, and
config.yaml (the resolved options and the dataset's fingerprint; --config on it repeats the run).

With --cascade TEACHER_CKPT, each other CKPT is also scored as the student of a cascade: tiles
whose top student probability is under a threshold go to the teacher (at its magnification), for
every threshold of --thresholds. Adds cascade.json and cascade.png (accuracy against mean FLOPs
per tile, F_student + share escalated * F_teacher) and names the cheapest threshold whose tile
accuracy is within 1 point of the teacher's.

exit codes: 0 done; 2 unusable input (checkpoint not found, magnification or classes that the
dataset lacks, empty split, a cascade teacher with other classes than a student, a threshold
outside [0, 1]).""",
    examples=(
        "resdistill evaluate runs/t10x/checkpoint_epoch0010 runs/s2p5x/checkpoint_epoch0010 \\\n"
        "      --data ds/ --out eval/",
        "resdistill evaluate best.json --data s3://bucket/ds --split val --out s3://bucket/eval",
        "resdistill evaluate STUDENT_CKPT --cascade TEACHER_CKPT --data ds/ --out eval-cascade/",
        "resdistill evaluate --config eval/config.yaml --split val --out eval-val/",
    ),
)


def run(cfg: EvaluateConfig) -> int:
    """Evaluate, print the tables and the files written: 0 done, 2 unusable input."""
    from rich.console import Console

    from resdistill.errors import UsageError
    from resdistill.eval.cascade_eval import format_cascade_tables
    from resdistill.eval.evaluation_run import run_evaluation
    from resdistill.eval.report_files import format_table
    from sharding.storage import StorageError

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and pipes: room for the whole table
        console = Console(highlight=False, width=max(console.width, 150))
    err = Console(stderr=True, highlight=False)
    try:
        report, cascade = run_evaluation(
            cfg, log=lambda msg: err.print(msg, style="dim", markup=False, soft_wrap=True)
        )
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
