"""``resdistill study``: the paper's claims and two controls checked on a dataset, as a grid on
Ray Tune under a validation-only protocol."""

from __future__ import annotations

from resdistill.commands import training
from resdistill.commands.generate import CommandSpec
from resdistill.study.config import StudyConfig

SPEC = CommandSpec(
    name="study",
    config=StudyConfig,
    summary="check the paper's claims against fair baselines and two controls: a grid on Ray Tune",
    description="""\
Checks on a dataset, with one resumable command:
  1. students at 4x/16x/64x fewer FLOPs approach the high-magnification teacher;
  2. with few labels, the distilled student beats the supervised baseline;
  3. accuracy rises with the amount of unlabelled data;
  4. the high-magnification teacher beats both controls: a teacher at the student's
     magnification distilled alike (same-res), and teacher-free self-training (the baseline's
     soft pseudo-labels on the same unlabelled slides).

The grid: student magnification (default: every one of the dataset below the teacher's) x
{baseline (labels only), distilled, the controls} x label fraction x unlabelled share (the share
of the unlabelled training slides distillation reads; baselines read none, controls run at the
largest) x seeds, plus a teacher per label fraction and seed (none for a fraction whose
--teacher is given). Each cell is one Ray Train run scheduled by Ray Tune (trials sized to the
cluster).

The protocol: every choice is made on validation data. Each arm first tries the same --trials
recipes (learning rate, weight decay, colour jitter; the first its defaults) and keeps the one
its own validation rule scores best: the labelled validation metric for the arms that learn from
labels, the label-free distillation loss for the arms that distil; checkpoints are chosen by the
same rules. The test split is scored once per reported cell, after every choice, with paired
two-level bootstrap intervals (test units and seeds), and each claim is judged by a rule stated
before the run.

Without --data it writes the embedded synthetic cohort (32 slides, a quarter unlabelled) under
--out and shards it at 10x, 5x, 2.5x and 1.25x. --quick is a smoke test, not evidence: one
student magnification, one seed, the unlabelled shares 0 and 1 and no recipe search; its
verdicts show that the pipeline runs, never that a claim holds.

Output in --out: summary.md (the protocol, the recipes each arm kept, each claim with its rule,
paired interval and verdict, then every cell), study.csv and study.parquet (test metrics),
validation.csv (validation metrics only: what later choices may read), accuracy_vs_flops.png,
accuracy_vs_unlabeled.png and config.yaml (the resolved options); cells/ holds one record per
finished cell and tuning/ one per tuned arm, which --resume keeps.

exit codes: 0 done; 1 a run failed; 2 unusable options or data.""",
    examples=(
        "resdistill study --out study-smoke --quick",
        "resdistill study --out study1 --student-mags 2.5x --trials 4 --controls same-res,self-training",
        "resdistill study --data shards/ --teacher runs/t1 --student-mags 2.5x --out study1",
        "resdistill study --out study1 --resume --student-args '--temperature 2'",
    ),
    switches=(training.gpu_switch("device"),),
)


def run(cfg: StudyConfig) -> int:
    """Run (or resume) the study; errors as one line: 0 ok, 1 failed run, 2 bad input."""
    from resdistill.study.run import run_study

    return training.exit_code("study", lambda: run_study(cfg))
