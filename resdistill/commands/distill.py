"""Resolution distillation: a low-magnification student learns from a frozen high-magnification
teacher on the same regions, without labels (DiPalma et al. 2021, arXiv:2101.04170). Also the
``--supervised`` baseline: the same student trained on labels only, for comparison.

``python -m resdistill.distill --data s3://bucket/ds --teacher s3://bucket/runs/t1/checkpoint_epoch0010
--student-mag 2.5x --storage s3://bucket/runs --name s1`` (or ``resdistill distill ...``, or
``ray job submit -- python -m resdistill.distill ...``).

Distillation. Every sample of ``--train-splits`` (default ``train,unlabeled``) is read with its
student-magnification tile ``x_s`` and its teacher-magnification tile ``x_t`` of the same region,
both transformed by ONE draw of the paired augmentation (flips, 90-degree rotations, colour
jitter; :class:`resdistill.data.PairedAugment`). The teacher (loaded from its checkpoint with
``weights_only=True``, frozen, eval mode, not wrapped in DDP) gives ``(t, f_t) = teacher(x_t)``,
the student ``(s, f_s) = student(x_s)``, and the student minimises::

    L = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))            (batch mean)
      + feature_weight * mean((f_s - resize(f_t, size(f_s)))^2)           (or |.| with l1)

with ``resize`` an adaptive max-pool (or antialiased bicubic) of the teacher's last feature map
to the student's spatial size (:class:`resdistill.losses.DistillLoss`). Labels are never read
on this path: samples with null labels (the ``unlabeled`` split) train the student like any
other. They are used only to score the ``--val-split`` after every epoch (accuracy and macro F1
of the student's own classifier head on its own magnification, summed over all ranks).

Cached teacher targets (``--targets URL``, written once by ``python -m resdistill.teacher_targets``):
the loader reads only the student tile plus the stored teacher logits and pooled feature map of
its key, and the teacher is not run per step (the same loss; flips/rotations are applied to the
stored map too, colour jitter is refused: see :mod:`resdistill.train.targets`). Targets of
another teacher checkpoint or dataset version are refused.

Baseline (``--supervised``): ``cross_entropy(student(x_s), label)`` on the labelled samples of
``--train-splits`` (default ``train``), no teacher involved.

Conventions shared with ``resdistill teacher`` (one worker, :mod:`resdistill.train.worker`): Ray Train DDP
(gloo on CPU, NCCL + bf16 autocast with ``--gpu``), equal steps on every rank, run storage on a
folder or ``s3://``, a rerun with the same ``--name`` resumes after the latest checkpoint,
worker failures restart from it (``--max-failures``), the best checkpoint by ``val_macro_f1``
and the latest are kept. The student's ``model.pt`` has the teacher checkpoint's layout (arch,
classes, mag, tile_px, normalization, state_dict) plus ``stage`` (``distill`` / ``supervised``),
``teacher`` (the teacher checkpoint it learned from and its arch/mag) and ``loss`` (the
distillation settings), so ``resdistill evaluate`` loads students and teachers alike.
"""

from __future__ import annotations

import argparse
from typing import Any

from resdistill.commands import common
from resdistill.config import (
    STAGE_DISTILL,
    STAGE_SUPERVISED,
    STUDENT_JITTER,
    TeacherRef,
    TrainConfig,
)
from resdistill.errors import UsageError  # noqa: F401 - what this command raises


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the distillation options to ``parser`` (``resdistill distill`` and ``python -m``)."""
    g = common.add_data_options(
        parser,
        train_splits=None,
        splits_help="comma list of splits to learn from (default: train,unlabeled; with "
        "--supervised: train). Distillation uses every sample of them, labelled or not",
        fraction_help="with --supervised: use the labels of only this share of the training "
        "slides (at least one per class), as the teacher's --label-fraction; with "
        "--unlabelled-share: which slides count as labelled (the teacher's)",
        jitter_help="the same draw for the student's and the teacher's tile",
        jitter=STUDENT_JITTER,
    )
    g.add_argument(
        "--teacher",
        default=None,
        help="teacher checkpoint folder (local or s3://), as printed by `resdistill teacher`; "
        "required unless --supervised (then only its architecture is used, as --arch's default)",
    )
    g.add_argument(
        "--student-mag", required=True, help="the student's magnification, e.g. 5x, 2.5x, 1.25x"
    )
    g.add_argument(
        "--teacher-mag",
        default=None,
        help="magnification fed to the teacher (default: the one it was trained at, which for "
        "`resdistill teacher` is the dataset's highest)",
    )
    g.add_argument(
        "--targets",
        default=None,
        help="cached teacher targets (a root written by `resdistill teacher-targets`): the "
        "student learns from the stored teacher outputs instead of running the teacher; flips "
        "and rotations stay, colour jitter is refused (see resdistill.train.targets)",
    )
    g.add_argument(
        "--unlabelled-share",
        type=float,
        default=1.0,
        help="read every labelled training slide plus only this share of the others (seeded; "
        "a smaller share is a subset of a larger one), to measure what unlabelled slides add; "
        "with --label-fraction F, the slides outside the teacher's F count as unlabelled",
    )
    g = parser.add_argument_group("distillation")
    g.add_argument(
        "--supervised",
        action="store_true",
        help="the baseline: train the student with cross-entropy on labels only, no teacher",
    )
    common.add_kd_options(g)
    common.add_label_smoothing(g, "cross-entropy smoothing (--supervised)")
    common.add_model_options(
        parser,
        arch=None,
        arch_help="student architecture (default: the teacher's; resnet18 without a teacher)",
    )
    g = common.add_run_options(parser)
    g.add_argument(
        "--no-teacher-eval",
        action="store_true",
        help="skip scoring the teacher once on --val-split (reported as teacher_val_*)",
    )
    return common.show_defaults(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.distill",
        description="Distill a low-magnification student from a frozen teacher on Ray Train "
        "(or train the supervised low-magnification baseline).",
    )
    return add_arguments(parser)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The student's (unplanned) config: distillation, or the baseline with ``--supervised``."""
    supervised = bool(getattr(args, "supervised", False))
    teacher = None
    if getattr(args, "teacher", None):
        teacher = TeacherRef(
            checkpoint=args.teacher,
            mag=getattr(args, "teacher_mag", None) or "",
            evaluate=not (supervised or getattr(args, "no_teacher_eval", False)),
        )
    return common.train_config(
        args,
        STAGE_SUPERVISED if supervised else STAGE_DISTILL,
        mag=getattr(args, "student_mag", None),
        train_splits="train" if supervised else "train,unlabeled",
        teacher=teacher,
    )


def train(args: argparse.Namespace) -> Any:
    """Distil (or train the baseline) as ``args`` say (see :func:`resdistill.train.run.train`):
    the RunSummary."""
    from resdistill.train.run import train as run_train

    return run_train(build_config(args), summary_json=args.summary_json)


def run(args: argparse.Namespace) -> int:
    """``resdistill distill``: errors as one line; 0 ok, 1 failed run, 2 bad input."""
    return common.exit_code("distill", lambda: train(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.distill``; returns the exit status."""
    return common.main(build_parser, run, argv)
