"""``resdistill teacher``: the high-magnification teacher, supervised, on Ray Train."""

from __future__ import annotations

from resdistill.commands import training
from resdistill.commands.generate import CommandSpec
from resdistill.config import STAGE_TEACHER, TrainConfig

SPEC = CommandSpec(
    name="teacher",
    config=TrainConfig,
    summary="train the high-magnification teacher on Ray Train",
    description="""\
Each of --workers Ray Train workers (DDP: gloo on CPU, NCCL and bf16 autocast with --gpu) streams
its own shards of the training splits, decodes only the teacher's magnification and takes the
same number of steps per epoch. The loss is cross-entropy on the labels (optionally
label-smoothed). After every epoch the --val-split is scored on all ranks and a checkpoint is
reported to <storage>/<name>; the best by --metric and the latest are kept, with the run's
resolved options in <storage>/<name>/config.yaml. Rerunning with the same --name and --storage
resumes after the latest checkpoint; a worker that dies is restarted from it (--max-failures).

exit codes: 0 done; 1 the run failed; 2 unusable options or data.""",
    examples=(
        "resdistill teacher --data shards/ --storage runs --name t1",
        "resdistill teacher --data s3://bucket/ds --storage s3://bucket/runs --workers 4 --gpu",
        "resdistill teacher --config runs/t1/config.yaml --name t1-again",
    ),
    fixed={"stage": STAGE_TEACHER},
    hidden=frozenset({"teacher", "data.targets", "data.unlabelled_share", *training.KD_FIELDS}),
    switches=(training.gpu_switch(),),
    titles=training.TITLES,
)


def run(cfg: TrainConfig) -> int:
    """Train the teacher ``cfg`` describes; errors as one line: 0 ok, 1 failed, 2 bad input."""
    return training.exit_code("teacher", lambda: training.train(cfg))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher``; returns the exit status."""
    from resdistill.commands.generate import main as generated_main

    return generated_main(SPEC, run, argv)
