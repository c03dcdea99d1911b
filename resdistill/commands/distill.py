"""``resdistill distill``: a low-magnification student learns from a frozen teacher, or the
supervised low-magnification baseline (``--supervised``)."""

from __future__ import annotations

from resdistill.commands import training
from resdistill.commands.generate import CommandSpec, Flag, Switch
from resdistill.config import STAGE_DISTILL, STAGE_SUPERVISED, TrainConfig

SPEC = CommandSpec(
    name="distill",
    config=TrainConfig,
    summary="distill a low-magnification student from the teacher",
    description="""\
Resolution distillation (DiPalma et al. 2021): every sample of the training splits is read as
the student's low-magnification tile x_s and the teacher's high-magnification tile x_t of the
same region, both transformed by one draw of the paired augmentation. The frozen teacher gives
logits t and feature map f_t, the student s and f_s, and the student minimises

  L = kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))
    + feature_weight * mean((f_s - resize(f_t, size(f_s)))^2)

where resize is an adaptive max-pool (or bicubic) of the teacher's last feature map. Labels are
never read for training, only to score --val-split after every epoch. With --targets the stored
teacher outputs (resdistill teacher-targets) replace running the teacher at every step.

--supervised trains the same student on labels only, with no teacher: the baseline.

Run storage, resuming, worker failures and checkpoints work as for resdistill teacher.

exit codes: 0 done; 1 the run failed; 2 unusable options or data.""",
    examples=(
        "resdistill distill --data shards/ --teacher runs/t1 --student-mag 2.5x --name s1",
        "resdistill distill --data shards/ --teacher runs/t1 --student-mag 2.5x --targets tgt/",
        "resdistill distill --data shards/ --student-mag 2.5x --supervised --label-fraction 0.1",
    ),
    defaults={"stage": STAGE_DISTILL},
    flags={
        "model.mag": Flag(
            "--student-mag", "the student's magnification, e.g. 5x, 2.5x, 1.25x", required=True
        ),  # fmt: skip
    },
    switches=(
        training.gpu_switch(),
        Switch(
            "--supervised",
            "stage",
            STAGE_SUPERVISED,
            "the baseline: train the student with cross-entropy on labels only, no teacher",
        ),
    ),  # fmt: skip
    titles=training.TITLES,
)


def run(cfg: TrainConfig) -> int:
    """Distil (or train the baseline) as ``cfg`` says; 0 ok, 1 failed run, 2 bad input."""
    return training.exit_code("distill", lambda: training.train(cfg))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.distill``; returns the exit status."""
    from resdistill.commands.generate import main as generated_main

    return generated_main(SPEC, run, argv)
