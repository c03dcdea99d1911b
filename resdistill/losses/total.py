"""The whole distillation loss: KD + feature term + optional attention transfer."""

from __future__ import annotations

import torch
from torch import nn

from resdistill.config import LossConfig
from resdistill.losses.attention import AttentionLoss
from resdistill.losses.feature import FeatureLoss, FeatureMode, ResizeMode
from resdistill.losses.kd import KDLoss

_DEFAULT = LossConfig()  # the loss's defaults are the config's: declared once


class DistillLoss(nn.Module):
    """Total resolution-distillation loss of DiPalma et al. 2021 (arXiv:2101.04170)::

        L = kd_weight * KDLoss(T)(s, t) + feature_weight * FeatureLoss(mode, resize)(f_s, f_t)
          + attention_weight * AttentionLoss(W_t, resize)(f_s, W_s, f_t, t)

    (both first weights 1 and ``T = 1`` in the reference code; the attention term, off by
    default, needs the teacher's head weight ``teacher_head`` and, in ``forward``, the student's
    ``student_head``). ``kd_threshold`` masks the KD term by the teacher's confidence
    (:class:`KDLoss`; 0, the default, keeps every sample). ``feature_grid >= 2`` is the feature
    term's spatial mode (:class:`FeatureLoss`): it reads the student map ``student_hint`` (an
    earlier stage's) when given, else ``student_features``, and always learns a projection, so
    ``student_channels`` (that map's) and ``teacher_channels`` are required. ``forward`` takes
    only student and teacher outputs - there is no label argument, so labels can never
    influence the distillation loss.
    A term whose weight is 0 is not computed and its inputs may be ``None``; with
    ``feature_weight == 0`` no channel projection is built (no parameter without a gradient).

    Returns ``(total, parts)`` where ``total`` is the differentiable scalar and ``parts`` maps
    ``"kd"``, ``"feature"``, ``"attention"`` (unweighted values; 0 when the term is off),
    ``"total"`` and, with a KD threshold, ``"kd_kept"`` (the share of samples the KD term kept) to
    detached float32 scalars for logging.
    """

    def __init__(
        self,
        kd_weight: float = _DEFAULT.kd_weight,
        feature_weight: float = _DEFAULT.feature_weight,
        temperature: float = _DEFAULT.temperature,
        feature_mode: FeatureMode = _DEFAULT.feature_loss,  # type: ignore[assignment]
        resize: ResizeMode = _DEFAULT.feature_resize,  # type: ignore[assignment]
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        antialias: bool = True,
        attention_weight: float = _DEFAULT.attention_weight,
        teacher_head: torch.Tensor | None = None,
        kd_threshold: float = _DEFAULT.kd_threshold,
        feature_grid: int = _DEFAULT.feature_grid,
    ) -> None:
        super().__init__()
        if kd_weight < 0 or feature_weight < 0 or attention_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if kd_weight == 0 and feature_weight == 0:
            raise ValueError("at least one of kd_weight and feature_weight must be > 0")
        self.kd_weight = float(kd_weight)
        self.feature_weight = float(feature_weight)
        self.kd = KDLoss(temperature, kd_threshold)
        # the feature term off: no projection, since a parameter that never gets a gradient
        # breaks DDP (every rank waits for its reduction)
        on = self.feature_weight > 0
        self.feature = FeatureLoss(
            feature_mode,
            resize,
            student_channels if on else None,
            teacher_channels if on else None,
            antialias=antialias,
            grid=feature_grid if on else 0,
        )
        self.attention_weight = float(attention_weight)
        self.attention: AttentionLoss | None = None
        if self.attention_weight > 0:
            if teacher_head is None:
                raise ValueError("attention_weight > 0 needs the teacher's head weight")
            self.attention = AttentionLoss(teacher_head, resize, antialias)

    def forward(
        self,
        student_logits: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        student_features: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        student_head: torch.Tensor | None = None,
        *,
        student_hint: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {"kd", "feature", "attention", "total"[, "kd_kept"]})`` for one batch of
        outputs; ``student_hint``: the student map the feature term reads instead of
        ``student_features`` (the spatial grid's earlier stage)."""
        total: torch.Tensor | None = None
        given = [x for x in (student_logits, student_features) if x is not None]
        device = given[0].device if given else None
        zero = torch.zeros((), dtype=torch.float32, device=device)
        kd_value = feature_value = attention_value = zero
        if self.kd_weight > 0:
            if student_logits is None or teacher_logits is None:
                raise ValueError("kd_weight > 0 needs student_logits and teacher_logits")
            kd_value = self.kd(student_logits, teacher_logits)
            total = self.kd_weight * kd_value
        if self.feature_weight > 0:
            if (student_features is None and student_hint is None) or teacher_features is None:
                raise ValueError("feature_weight > 0 needs student_features and teacher_features")
            mine = student_hint if student_hint is not None else student_features
            feature_value = self.feature(mine, teacher_features)
            term = self.feature_weight * feature_value
            total = term if total is None else total + term
        if self.attention is not None:
            needed = (student_features, teacher_features, student_head, teacher_logits)
            if any(x is None for x in needed):
                raise ValueError("the attention term needs both feature maps, the teacher's "
                                 "logits and the student's head weight")  # fmt: skip
            attention_value = self.attention(student_features, student_head, teacher_features,
                                             teacher_logits)  # fmt: skip
            term = self.attention_weight * attention_value
            total = term if total is None else total + term
        assert total is not None  # guaranteed by the constructor
        parts = {
            "kd": kd_value.detach(),
            "feature": feature_value.detach(),
            "attention": attention_value.detach(),
            "total": total.detach(),
        }
        if self.kd_weight > 0 and self.kd.threshold > 0 and teacher_logits is not None:
            parts["kd_kept"] = self.kd.confident(teacher_logits).float().mean()
        return total, parts

    def extra_repr(self) -> str:
        return (f"kd_weight={self.kd_weight}, feature_weight={self.feature_weight}, "
                f"attention_weight={self.attention_weight}, feature_grid={self.feature.grid}")  # fmt: skip
