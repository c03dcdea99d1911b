"""Resolution-distillation losses: knowledge distillation on logits plus a feature-map loss.

Method: DiPalma, Suriawinata, Tafe, Torresani, Hassanpour, "Resolution-Based Distillation for
Efficient Histology Image Classification", arXiv:2101.04170 (2021), Artificial Intelligence in
Medicine 119:102136. A frozen teacher sees a high-magnification tile, the student the *same region*
at a lower magnification; the student is trained with

    L = kd_weight * L_KD(s, t) + feature_weight * L_feat(f_s, f_t)

and **no labels**: every module here takes only student and teacher outputs, so a label can never
reach the loss. Teacher inputs are always detached: gradients flow to the student (and to the
optional channel projection of :class:`FeatureLoss`) only.

All arithmetic is done in float32, whatever the dtype of the inputs (teacher logits or feature maps
precomputed and stored as float16/bfloat16, or student outputs produced under autocast).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from resdistill.config import ATTENTION_MIN_PX, LossConfig

_DEFAULT = LossConfig()  # the loss's defaults are the config's: declared once

__all__ = [
    "AttentionLoss",
    "DistillLoss",
    "FeatureLoss",
    "KDLoss",
    "class_attention",
    "resize_feature_map",
]

FeatureMode = Literal["mse", "l1"]
ResizeMode = Literal["maxpool", "bicubic"]


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


class KDLoss(nn.Module):
    """Hinton knowledge distillation on logits, as in DiPalma et al. 2021 (arXiv:2101.04170).

    For student logits ``s`` and teacher logits ``t`` of shape ``(N, K)`` and temperature ``T``::

        p_t = softmax(t / T),  log q_s = log_softmax(s / T)
        L_KD = T^2 / N * sum_n sum_k p_t[n,k] * (log p_t[n,k] - log q_s[n,k])

    i.e. ``F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T * T``. The ``T^2``
    factor keeps the gradient magnitude independent of ``T``. ``L_KD >= 0`` and it is 0 exactly when
    the two softmax distributions agree. The teacher logits are detached and cast to float32, so
    precomputed teacher logits stored in float16/bfloat16 are accepted.
    """

    def __init__(self, temperature: float = _DEFAULT.temperature) -> None:
        super().__init__()
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Return the scalar KD loss (float32) for logits of shape ``(N, K)``."""
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "KDLoss expects student and teacher logits of the same shape (N, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if student_logits.shape[0] == 0:
            raise ValueError("KDLoss got an empty batch (N = 0)")
        t = self.temperature
        log_q = F.log_softmax(_float32(student_logits) / t, dim=1)
        p = F.softmax(_float32(teacher_logits.detach()) / t, dim=1)
        return F.kl_div(log_q, p, reduction="batchmean") * (t * t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


def resize_feature_map(
    teacher: torch.Tensor,
    size: tuple[int, int],
    mode: ResizeMode = "maxpool",
    antialias: bool = True,
) -> torch.Tensor:
    """Bring a teacher feature map ``(N, C, Ht, Wt)`` to the spatial ``size = (Hs, Ws)``.

    * Same size: returned unchanged (identity; no pooling, no interpolation).
    * ``"maxpool"`` (the paper's default): ``F.adaptive_max_pool2d(teacher, (Hs, Ws))``. Output cell
      ``(i, j)`` is the maximum over rows ``floor(i*Ht/Hs) .. ceil((i+1)*Ht/Hs) - 1`` and the
      analogous columns, so e.g. 7x7 -> 4x4 uses the overlapping windows [0,2), [1,4), [3,6), [5,7)
      and any map -> 1x1 is the global max. When the student map is *larger* than the teacher's
      (a dimension with ``Hs > Ht``; never the case for a student at lower magnification), the same
      rule gives windows of one cell, i.e. each teacher cell is replicated (nearest-neighbour
      upsampling); no values are invented.
    * ``"bicubic"``: ``F.interpolate(teacher, (Hs, Ws), mode="bicubic", align_corners=False)``, with
      ``antialias=True`` when shrinking (a proper low-pass filter over the whole map rather than
      sampling a few cells; 7x7 -> 1x1 then weights all 49 cells); upsampling is plain bicubic.
    """
    if teacher.dim() != 4:
        raise ValueError(f"feature map must be (N, C, H, W), got shape {tuple(teacher.shape)}")
    hs, ws = int(size[0]), int(size[1])
    if hs < 1 or ws < 1:
        raise ValueError(f"target size must be positive, got {size!r}")
    if tuple(teacher.shape[-2:]) == (hs, ws):
        return teacher
    if mode == "maxpool":
        return F.adaptive_max_pool2d(teacher, (hs, ws))
    if mode == "bicubic":
        shrinking = hs <= teacher.shape[-2] and ws <= teacher.shape[-1]
        return F.interpolate(
            teacher,
            size=(hs, ws),
            mode="bicubic",
            align_corners=False,
            antialias=bool(antialias and shrinking),
        )
    raise ValueError(f"unknown resize mode {mode!r}: use 'maxpool' or 'bicubic'")


class FeatureLoss(nn.Module):
    """Feature ("pixel") loss between last conv feature maps, DiPalma et al. 2021 (arXiv:2101.04170).

    With the student map ``f_s`` of shape ``(N, C, Hs, Ws)`` and the teacher map ``f_t`` of shape
    ``(N, C, Ht, Wt)`` (a teacher at higher magnification has ``Ht >= Hs``)::

        g = resize(f_t, (Hs, Ws))                     # see resize_feature_map
        L_feat = mean_{n,c,h,w} (P(f_s) - g)^2        # mode="mse" (L2, the default)
        L_feat = mean_{n,c,h,w} |P(f_s) - g|          # mode="l1"

    ``P`` is the identity when the channel counts match. When they differ (e.g. a resnet18 student,
    512 channels, and a resnet50 teacher, 2048), pass ``student_channels`` and ``teacher_channels``:
    ``P`` is then a trainable 1x1 convolution ``student_channels -> teacher_channels`` (FitNets
    style, on the student side) and **its parameters must be given to the optimizer** together with
    the student's (``list(student.parameters()) + list(loss.parameters())``). Without them a
    channel mismatch raises ``ValueError``. The teacher map is detached; everything is computed in
    float32.
    """

    def __init__(
        self,
        mode: FeatureMode = "mse",
        resize: ResizeMode = "maxpool",
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("mse", "l1"):
            raise ValueError(f"unknown feature loss mode {mode!r}: use 'mse' or 'l1'")
        if resize not in ("maxpool", "bicubic"):
            raise ValueError(f"unknown resize mode {resize!r}: use 'maxpool' or 'bicubic'")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("give both student_channels and teacher_channels, or neither")
        self.mode: FeatureMode = mode
        self.resize: ResizeMode = resize
        self.antialias = antialias
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.projection: nn.Conv2d | None = None
        if student_channels is not None and teacher_channels is not None:
            if student_channels < 1 or teacher_channels < 1:
                raise ValueError("channel counts must be positive")
            if student_channels != teacher_channels:
                self.projection = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(
        self, student_features: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        """Return the scalar feature loss (float32) for maps ``(N, C, H, W)``."""
        s, t = student_features, teacher_features.detach()
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                "FeatureLoss expects (N, C, H, W) feature maps, got "
                f"{tuple(s.shape)} (student) and {tuple(t.shape)} (teacher)"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"batch sizes differ: student {s.shape[0]}, teacher {t.shape[0]}")
        if s.shape[0] == 0:
            raise ValueError("FeatureLoss got an empty batch (N = 0)")
        s = _float32(s)
        if self.projection is not None:
            if s.shape[1] != self.student_channels or t.shape[1] != self.teacher_channels:
                raise ValueError(
                    f"FeatureLoss was built for {self.student_channels} student and "
                    f"{self.teacher_channels} teacher channels, got {s.shape[1]} and {t.shape[1]}"
                )
            s = self.projection(s)
        elif s.shape[1] != t.shape[1]:
            raise ValueError(
                f"student feature map has {s.shape[1]} channels, the teacher's {t.shape[1]}: "
                f"use FeatureLoss(..., student_channels={s.shape[1]}, "
                f"teacher_channels={t.shape[1]}) to learn a 1x1 projection"
            )
        target = resize_feature_map(
            _float32(t), (s.shape[-2], s.shape[-1]), self.resize, self.antialias
        )
        if self.mode == "mse":
            return F.mse_loss(s, target, reduction="mean")
        return F.l1_loss(s, target, reduction="mean")

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, resize={self.resize!r}"


def class_attention(
    features: torch.Tensor, head_weight: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Unit-norm class attention maps ``(N, H*W)`` of feature maps ``F`` ``(N, C, H, W)``::

        A[n] = relu(sum_c W[k_n, c] * F[n, c]),   a[n] = A[n] / max(||A[n]||_2, 1e-8)

    with ``W`` ``(K, C)`` the weight of a global-average-pool + linear head and ``k_n =
    classes[n]``. For such a head this is Grad-CAM (Selvaraju et al. 2017) up to a positive
    factor: ``d logit_k / d F[c, h, w] = W[k, c] / (H W)`` for every cell, so Grad-CAM's channel
    weights are ``W[k, :]`` scaled, and no backward pass is needed. A map that is 0 everywhere
    stays 0."""
    w = _float32(head_weight)[classes]
    maps = torch.einsum("nc,nchw->nhw", w, _float32(features)).clamp_min(0).flatten(1)
    return maps / maps.norm(dim=1, keepdim=True).clamp_min(1e-8)


class AttentionLoss(nn.Module):
    """Inter-resolution attention transfer (del Amor et al. 2024, arXiv:2401.06010): the student
    attends to where the teacher does, for the class the teacher predicts::

        k = argmax(t),  g = resize(f_t, (Hs, Ws))                  # as FeatureLoss
        L_att = mean_n sum_hw (class_attention(f_s, W_s, k) - class_attention(g, W_t, k))^2

    ``W_t`` is the frozen teacher's head weight (a buffer), ``W_s`` the student's (its gradient
    flows). The teacher map is resized before its attention is taken, so a teacher map cached at
    the student's size (``resdistill teacher-targets``) gives the same loss as the online one.
    A 1x1 student map has one cell, whose unit-norm attention is 1 whatever the input: the term
    is refused there (:class:`ValueError`): tiles at the student's magnification must give maps
    of 2x2 cells or more (:data:`~resdistill.config.ATTENTION_MIN_PX` for the ResNets). ``resize``
    and ``antialias`` are the feature term's (:func:`resize_feature_map`)."""

    def __init__(
        self, teacher_head: torch.Tensor, resize: ResizeMode = "maxpool", antialias: bool = True
    ) -> None:
        super().__init__()
        if teacher_head.dim() != 2:
            raise ValueError(f"teacher head weight must be (K, C), got {tuple(teacher_head.shape)}")
        self.resize: ResizeMode = resize
        self.antialias = antialias
        self.register_buffer("teacher_head", _float32(teacher_head.detach().clone()))

    def forward(
        self,
        student_features: torch.Tensor,
        student_head: torch.Tensor,
        teacher_features: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> torch.Tensor:
        """The scalar attention loss (float32)."""
        s, t = student_features, teacher_features.detach()
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError("AttentionLoss expects (N, C, H, W) feature maps")
        if tuple(s.shape[-2:]) == (1, 1):
            raise ValueError(
                "attention transfer needs student feature maps of 2x2 cells or more, got 1x1: "
                f"use tiles of {ATTENTION_MIN_PX} px or more at the student's magnification, or "
                "drop it"
            )
        k = teacher_logits.detach().argmax(1)
        g = resize_feature_map(_float32(t), (s.shape[-2], s.shape[-1]), self.resize, self.antialias)
        a_s = class_attention(s, student_head, k)
        a_t = class_attention(g, self.teacher_head, k)
        return (a_s - a_t).pow(2).sum(1).mean()


class DistillLoss(nn.Module):
    """Total resolution-distillation loss of DiPalma et al. 2021 (arXiv:2101.04170)::

        L = kd_weight * KDLoss(T)(s, t) + feature_weight * FeatureLoss(mode, resize)(f_s, f_t)
          + attention_weight * AttentionLoss(W_t, resize)(f_s, W_s, f_t, t)

    (both first weights 1 and ``T = 1`` in the reference code; the attention term, off by
    default, needs the teacher's head weight ``teacher_head`` and, in ``forward``, the student's
    ``student_head``). ``forward`` takes only student and teacher
    outputs - there is no label argument, so labels can never influence the distillation loss.
    A term whose weight is 0 is not computed and its inputs may be ``None``; with
    ``feature_weight == 0`` no channel projection is built (no parameter without a gradient).

    Returns ``(total, parts)`` where ``total`` is the differentiable scalar and ``parts`` maps
    ``"kd"``, ``"feature"`` (unweighted values; 0 when the term is off) and ``"total"`` to detached
    float32 scalars for logging.
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
    ) -> None:
        super().__init__()
        if kd_weight < 0 or feature_weight < 0 or attention_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if kd_weight == 0 and feature_weight == 0:
            raise ValueError("at least one of kd_weight and feature_weight must be > 0")
        self.kd_weight = float(kd_weight)
        self.feature_weight = float(feature_weight)
        self.kd = KDLoss(temperature)
        # the feature term off: no projection, since a parameter that never gets a gradient
        # breaks DDP (every rank waits for its reduction)
        on = self.feature_weight > 0
        self.feature = FeatureLoss(
            feature_mode,
            resize,
            student_channels if on else None,
            teacher_channels if on else None,
            antialias=antialias,
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {"kd", "feature", "attention", "total"})`` for one batch of outputs."""
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
            if student_features is None or teacher_features is None:
                raise ValueError("feature_weight > 0 needs student_features and teacher_features")
            feature_value = self.feature(student_features, teacher_features)
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
        return total, parts

    def extra_repr(self) -> str:
        return (f"kd_weight={self.kd_weight}, feature_weight={self.feature_weight}, "
                f"attention_weight={self.attention_weight}")  # fmt: skip
