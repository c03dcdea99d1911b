"""Driver side of pretrained and timm backbones: the run's backbone record, the frozen head's
embedding cache, and what a foundation-model teacher allows a student (before any Ray work).

:func:`plan_backbone` runs at the end of :func:`resdistill.train.preflight.prepare`:

* ``plan.backbone``: the :class:`~resdistill.backbones.BackboneSpec` of ``--arch``/``--weights``
  (the weights file's sha256 read once here; workers, checkpoints and every later reader check
  the file against it);
* ``--freeze-backbone`` (teacher and ``--supervised``): needs a timm backbone and ``--weights``
  (a frozen random network would learn nothing); ``plan.embeddings`` names the cache folder of
  :mod:`resdistill.train.embeddings` (its key), which the driver fills before training;
  refused for a distilled student, which learns its whole network;
* distillation from a teacher whose features have no spatial layout (a backbone that only gives a
  pooled embedding): KD only, the feature term switched off, said in the run's notes;
  ``--attention-weight`` with a timm teacher or student is refused (class attention needs a
  global-average-pool + linear head over the feature map).

Every refusal is one :class:`~resdistill.errors.UsageError` line naming the flag or file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from resdistill.config import STAGE_DISTILL, TrainConfig
from resdistill.errors import UsageError


def spatial_features(model: Any, tile_px: int) -> bool:
    """Whether ``model``'s feature output has a spatial layout on ``tile_px`` tiles: one
    forward of a blank tile for a timm network (a ResNet always has one)."""
    import torch

    if not hasattr(model, "spatial_features"):
        return True
    with torch.inference_mode():
        model(torch.zeros(1, 3, max(tile_px, 1), max(tile_px, 1)))
    return bool(model.spatial_features)


def plan_backbone(cfg: TrainConfig, notes: list[str]) -> TrainConfig:
    """The planned ``cfg`` with its backbone record, embedding cache and KD-only switch (module
    docstring). ``notes`` get the run-header remarks."""
    from resdistill.backbones import WeightsError, backbone_spec, is_timm

    model = cfg.model
    try:
        spec = backbone_spec(model)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    plan = cfg.plan
    assert plan is not None
    if model.freeze_backbone:
        if cfg.stage == STAGE_DISTILL:
            raise UsageError("--freeze-backbone is for the teacher and --supervised: a distilled "
                             "student learns its whole network")  # fmt: skip
        if not model.weights:
            raise UsageError("--freeze-backbone needs --weights: a frozen randomly initialised "
                             "backbone learns nothing")  # fmt: skip
    if spec is not None:
        plan = replace(plan, backbone=spec.to_dict())
        if spec.licence:
            notes.append(f"weights licence: {spec.licence}")
        notes.append(f"backbone: {spec.describe()}")
    cfg = replace(cfg, plan=plan)
    if model.freeze_backbone and spec is not None:
        cfg = _plan_embeddings(cfg, notes)
    if cfg.stage == STAGE_DISTILL and cfg.teacher is not None:
        cfg = _kd_only(cfg, notes)
    teacher_arch = cfg.teacher.arch if cfg.teacher is not None else ""
    timm_pair = is_timm(model.arch) or is_timm(teacher_arch)
    if timm_pair and cfg.loss.attention_weight > 0 and cfg.stage == STAGE_DISTILL:
        raise UsageError("--attention-weight needs a ResNet teacher and student (class "
                         "attention reads a global-average-pool + linear head)")  # fmt: skip
    return cfg


def _plan_embeddings(cfg: TrainConfig, notes: list[str]) -> TrainConfig:
    from resdistill.data import Dataset
    from resdistill.train.embeddings import EMBEDDINGS_DIR, cache_key, identity
    from sharding.storage import open_storage

    assert cfg.plan is not None
    dataset = Dataset.open(cfg.data.url)
    ident = identity(cfg, dataset.info, dataset.manifest_sha256)
    key = cache_key(ident)
    url = open_storage(cfg.data.url).child_url(f"{EMBEDDINGS_DIR}/{key[:16]}")
    notes.append(f"frozen backbone: the head learns from cached embeddings at {url} (computed "
                 "once per dataset, un-augmented: --jitter, --flips and --hed-jitter do not "
                 "apply)")  # fmt: skip
    planned = {"url": url, "key": key, "identity": ident}
    return replace(cfg, plan=replace(cfg.plan, embeddings=planned))


def _kd_only(cfg: TrainConfig, notes: list[str]) -> TrainConfig:
    teacher = cfg.teacher
    assert teacher is not None
    if teacher.spatial_features or cfg.loss.feature_weight == 0:
        return cfg
    if cfg.loss.kd_weight == 0:
        raise UsageError(f"the teacher {teacher.arch} gives no spatial feature map (only a pooled "
                         "embedding): --kd-weight 0 leaves nothing to learn")  # fmt: skip
    notes.append(f"the teacher {teacher.arch} gives no spatial feature map (only a pooled "
                 "embedding): KD only, the feature term is off")  # fmt: skip
    return replace(cfg, loss=replace(cfg.loss, feature_weight=0.0, feature_grid=0))
