"""One cell of the study -> its planned :class:`~resdistill.config.TrainConfig`, built directly
from the study's options (what ``resdistill teacher`` / ``distill`` would make of the same
options: the same fields, defaults, stage presets and checks).

Every student cell of a magnification takes the same number of optimiser steps per epoch, that
of reading every training sample once (``train`` and ``unlabeled``): a smaller label fraction or
unlabelled share cycles fewer slides for as long, so only the data differs between cells, not the
compute. Teachers, the same-resolution one included, take ``train``'s steps whatever their label
fraction (as the demo does).

Overrides, in order: the arm's recipe (:mod:`resdistill.study.recipes`), then the study's
``teacher_args`` (teachers) / ``student_args`` (every other cell), which the config refuses to
set on a searched setting. Last, what defines a control or an ablation: self-training learns
the KD term (soft pseudo-labels, no feature or attention term), masked by the baseline's
confidence (``--self-training-threshold``), plus cross-entropy on the cell's labelled tiles
(``ce_weight`` 1: FixMatch and Noisy Student keep a supervised term; without it a student that
learns only confident tiles can collapse to one class); an ablation cell its variant's feature term
(:mod:`resdistill.study.ablation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from resdistill.config import (
    STAGE_DISTILL,
    STAGE_SUPERVISED,
    STAGE_TEACHER,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunOptions,
    TeacherRef,
    TrainConfig,
)
from resdistill.study.ablation import variant_overrides
from resdistill.study.config import StudyConfig
from resdistill.study.grid import (
    KIND_BASELINE,
    KIND_SAME_RES_TEACHER,
    KIND_SELF_TRAINING,
    KIND_TEACHER,
    Cell,
)
from resdistill.study.overrides import apply_overrides

#: what makes a distillation run self-training: the KD term (soft pseudo-labels) and
#: cross-entropy on the labelled tiles, equally weighted; the confidence threshold is the
#: study's (:func:`self_training_loss`)
SELF_TRAINING_LOSS = {"loss": {"feature_weight": 0.0, "feature_grid": 0, "attention_weight": 0.0,
                               "ce_weight": 1.0}}  # fmt: skip


def self_training_loss(threshold: float) -> dict[str, Any]:
    """The self-training cells' loss override: :data:`SELF_TRAINING_LOSS` and the KD term's
    confidence mask at ``threshold`` (:class:`resdistill.losses.KDLoss`)."""
    return {"loss": {**SELF_TRAINING_LOSS["loss"], "kd_threshold": threshold}}


@dataclass(frozen=True)
class CellOptions:
    """What the study derived for its cells: the dataset's URL, the run storage and the steps
    per epoch of teachers and students."""

    data: str
    storage: str
    teacher_steps: int
    student_steps: int


def cell_config(
    cell: Cell,
    study: StudyConfig,
    opts: CellOptions,
    experiment: str,
    teacher_checkpoint: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    targets: str | None = None,
) -> TrainConfig:
    """The planned config of ``cell`` (:func:`resdistill.train.preflight.prepare`) with its arm's
    ``recipe``; the cells that distil need their teacher's checkpoint, and read its stored
    ``targets`` when given (:mod:`resdistill.study.shared_targets`). Raises the configs'
    :class:`UsageError` on bad options."""
    from resdistill.train.preflight import prepare

    def finish(cfg: TrainConfig, args: Mapping[str, Any] | None) -> TrainConfig:
        cfg = apply_overrides(apply_overrides(cfg, recipe), args)
        if cell.kind == KIND_SELF_TRAINING:
            cfg = apply_overrides(cfg, self_training_loss(study.self_training_threshold))
        cfg = apply_overrides(cfg, variant_overrides(cell.kind))
        return prepare(cfg)

    data = DataConfig(url=opts.data, batch_size=study.batch_size,
                      loader_workers=study.loader_workers)  # fmt: skip
    model = ModelConfig(arch=study.arch, mag=cell.mag)
    run = RunOptions(name=f"{experiment}-{cell.id}", storage=opts.storage, workers=1,
                     cpus_per_worker=study.cpus_per_worker)  # fmt: skip
    fraction = {"label_fraction": cell.label_fraction}
    if cell.kind in (KIND_TEACHER, KIND_SAME_RES_TEACHER):
        cfg = TrainConfig(
            STAGE_TEACHER, replace(data, steps_per_epoch=opts.teacher_steps, **fraction), model,
            OptimConfig(epochs=study.epochs, seed=cell.seed), run=run,
        )  # fmt: skip
        return finish(cfg, study.teacher_args)
    data = replace(data, steps_per_epoch=opts.student_steps)
    optim = OptimConfig(epochs=study.student_epochs, seed=cell.seed)
    if cell.kind == KIND_BASELINE:
        cfg = TrainConfig(STAGE_SUPERVISED, replace(data, **fraction), model, optim, run=run)
        return finish(cfg, study.student_args)
    if teacher_checkpoint is None:
        raise ValueError(f"{cell.id}: a distilled cell needs its teacher's checkpoint")
    share = 1.0 if cell.unlabelled_share is None else cell.unlabelled_share
    if share < 1:  # the teacher's labelled slides stay; a share of the others is added
        data = replace(data, unlabelled_share=share, **fraction)
    teacher = TeacherRef(checkpoint=teacher_checkpoint, evaluate=False)
    data = replace(data, targets=targets)
    cfg = TrainConfig(STAGE_DISTILL, data, model, optim, run=run, teacher=teacher)
    return finish(cfg, study.student_args)


def split_samples(data: str, splits: tuple[str, ...], labelled_only: bool = False) -> int:
    """Samples of ``splits`` in the dataset's manifest (labelled ones only if asked)."""
    from resdistill.data import read_manifest

    cols = read_manifest(data, columns=["split", "label"]).to_pydict()
    return sum(
        1
        for split, label in zip(cols["split"], cols["label"], strict=True)
        if split in splits and not (labelled_only and label is None)
    )
