"""Teacher pretraining: a supervised ResNet at the dataset's highest magnification, on Ray Train.

``resdistill teacher --data s3://bucket/dataset --storage s3://bucket/runs --name t1`` (or
``python -m resdistill.teacher ...``; or ``ray job submit -- python -m resdistill.teacher ...``).

Each of ``--workers`` Ray Train workers (DDP: gloo on CPU, NCCL + bf16 autocast with ``--gpu``)
streams its own disjoint shards of the ``train`` split, decodes only the teacher's magnification,
and takes the same number of steps per epoch (see :mod:`resdistill.data`). The loss is
``cross_entropy(logits, label)`` (optionally label-smoothed). After every epoch the ``val`` split
is scored on all ranks (accuracy and macro F1 from summed confusion matrices) and a checkpoint is
reported to ``<storage>/<name>``; the best one by ``val_macro_f1`` and the latest are kept.
Rerunning with the same ``--name`` and ``--storage`` resumes after the latest checkpoint, and a
worker that dies is restarted from it (``--max-failures``).
"""

from __future__ import annotations

import argparse
from typing import Any

from resdistill.commands import common
from resdistill.config import STAGE_TEACHER, TrainConfig
from resdistill.errors import UsageError  # noqa: F401 - what this command raises


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the teacher's options to ``parser`` (``resdistill teacher`` and ``python -m``)."""
    g = common.add_data_options(parser)
    g.add_argument(
        "--mag", default=None, help="magnification to train at (default: the dataset's highest)"
    )
    g = common.add_model_options(parser)
    common.add_label_smoothing(g)
    common.add_run_options(parser)
    return common.show_defaults(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.teacher",
        description="Train the high-magnification teacher on Ray Train.",
    )
    return add_arguments(parser)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The teacher's (unplanned) config from its options."""
    return common.train_config(
        args, STAGE_TEACHER, mag=getattr(args, "mag", None), train_splits="train"
    )


def train(args: argparse.Namespace) -> Any:
    """Train a teacher as ``args`` say (see :func:`resdistill.train.run.train`): the RunSummary."""
    from resdistill.train.run import train as run_train

    return run_train(build_config(args), summary_json=args.summary_json)


def run(args: argparse.Namespace) -> int:
    """``resdistill teacher``: errors as one line; 0 ok, 1 failed run, 2 bad input."""
    return common.exit_code("teacher", lambda: train(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher``; returns the exit status."""
    return common.main(build_parser, run, argv)
