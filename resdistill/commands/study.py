"""``resdistill study``: the paper's three claims checked on a dataset, as a grid on Ray Tune."""

from __future__ import annotations

from resdistill.commands import training
from resdistill.commands.generate import CommandSpec
from resdistill.study.config import StudyConfig

SPEC = CommandSpec(
    name="study",
    config=StudyConfig,
    summary="check the paper's three claims: a grid on Ray Tune",
    description="""\
Checks on a dataset, with one resumable command:
  1. students at 4x/16x/64x fewer FLOPs approach the high-magnification teacher;
  2. with few labels, the distilled student beats the supervised baseline;
  3. accuracy rises with the amount of unlabelled data.

The grid: student magnification (default: every one of the dataset below the teacher's) x
{baseline (labels only), distilled} x label fraction x unlabelled share (the share of the
unlabelled training slides distillation reads; baselines read none) x seeds, plus a teacher per
label fraction and seed (none for a fraction whose --teacher is given). Each cell is one Ray
Train run scheduled by Ray Tune (a grid search, trials sized to the cluster), evaluated on the
test split with slide-clustered bootstrap CIs.

Without --data it writes the embedded synthetic cohort (32 slides, a quarter unlabelled) under
--out and shards it at 10x, 5x, 2.5x and 1.25x. --quick runs one student magnification, one
seed and the unlabelled shares 0 and 1, at the full schedules.

Output in --out: study.csv and study.parquet, accuracy_vs_flops.png, accuracy_vs_unlabeled.png,
summary.md (each claim with its numbers, its rule and "holds" or "does not hold") and
config.yaml (the resolved options); cells/ holds one record per finished cell, which --resume
keeps.

exit codes: 0 done; 1 a run failed; 2 unusable options or data.""",
    examples=(
        "resdistill study --out study-quick --quick",
        "resdistill study --data shards/ --teacher runs/t1 --student-mags 2.5x --out study1",
        "resdistill study --out study1 --resume --student-args '--temperature 2'",
    ),
    switches=(training.gpu_switch("device"),),
)


def run(cfg: StudyConfig) -> int:
    """Run (or resume) the study; errors as one line: 0 ok, 1 failed run, 2 bad input."""
    from resdistill.study.run import run_study

    return training.exit_code("study", lambda: run_study(cfg))
