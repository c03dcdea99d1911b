"""The feature ("pixel") term: a teacher feature map brought to the student's grid, compared
with the student's map, on the student's last map (the paper) or on a fixed spatial grid."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from resdistill.losses.kd import _float32

FeatureMode = Literal["mse", "l1"]
ResizeMode = Literal["maxpool", "bicubic"]


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
    """Feature ("pixel") loss between feature maps, DiPalma et al. 2021 (arXiv:2101.04170).

    With the student map ``f_s`` of shape ``(N, Cs, Hs, Ws)`` and the teacher map ``f_t`` of
    shape ``(N, C, Ht, Wt)`` (a teacher at higher magnification has ``Ht >= Hs``)::

        g = resize(f_t, (Hs, Ws))                     # see resize_feature_map
        L_feat = mean_{n,c,h,w} (P(f_s) - g)^2        # mode="mse" (L2, the default)
        L_feat = mean_{n,c,h,w} |P(f_s) - g|          # mode="l1"

    ``P`` is the identity when the channel counts match. When they differ (e.g. a resnet18
    student, 512 channels, and a resnet50 teacher, 2048), pass ``student_channels`` and
    ``teacher_channels``: ``P`` is then a trainable 1x1 convolution ``student_channels ->
    teacher_channels`` (FitNets, Romero et al. 2015, on the student side) and **its parameters
    must be given to the optimizer** together with the student's. Without them a channel
    mismatch raises ``ValueError``.

    ``grid = G >= 2`` is the spatial mode. The paper's rule compares the student's *last* map,
    which on small student tiles is a single cell (a 32 px tile at stride 32), so ``g`` is the
    teacher's per-channel global maximum and no spatial correspondence is learnt. With a grid,
    both maps are brought to ``G x G`` by the same ``resize`` rule::

        L_feat = mean (resize(P(f_s), (G, G)) - resize(f_t, (G, G)))^2

    where ``f_s`` is then the map of an earlier student stage with at least ``G x G`` cells
    (:func:`resdistill.train.feature_tap.feature_tap` picks it; the caller passes that map) and
    ``P`` is always a learnt 1x1 projection (the stage's channels mean something else than the
    teacher's last map's), so ``student_channels`` and ``teacher_channels`` are required. The
    student tile and the teacher tile cover the same region, so cell ``(i, j)`` of both grids
    covers the same tissue. A map smaller than ``G x G`` raises ``ValueError``: upsampling would
    invent the structure the mode exists to keep. The teacher map is detached; everything is
    computed in float32.
    """

    def __init__(
        self,
        mode: FeatureMode = "mse",
        resize: ResizeMode = "maxpool",
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        antialias: bool = True,
        grid: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("mse", "l1"):
            raise ValueError(f"unknown feature loss mode {mode!r}: use 'mse' or 'l1'")
        if resize not in ("maxpool", "bicubic"):
            raise ValueError(f"unknown resize mode {resize!r}: use 'maxpool' or 'bicubic'")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("give both student_channels and teacher_channels, or neither")
        if grid == 1 or grid < 0:
            raise ValueError(f"grid must be 0 (the last map) or at least 2, got {grid}")
        if grid and student_channels is None:
            raise ValueError("the spatial grid learns a projection: give student_channels and "
                             "teacher_channels")  # fmt: skip
        self.mode: FeatureMode = mode
        self.resize: ResizeMode = resize
        self.antialias = antialias
        self.grid = int(grid)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.projection: nn.Conv2d | None = None
        if student_channels is not None and teacher_channels is not None:
            if student_channels < 1 or teacher_channels < 1:
                raise ValueError("channel counts must be positive")
            if student_channels != teacher_channels or self.grid:
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
        if self.grid:
            g = self.grid
            for who, m in (("student", s), ("teacher", t)):
                if min(m.shape[-2:]) < g:
                    raise ValueError(
                        f"the {who}'s feature map is {m.shape[-2]}x{m.shape[-1]}, smaller than "
                        f"the feature grid {g}x{g}: use a smaller --feature-grid, larger tiles, "
                        "or (teacher) distil online rather than from cached targets"
                    )
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
        size = (self.grid, self.grid) if self.grid else (s.shape[-2], s.shape[-1])
        s = resize_feature_map(s, size, self.resize, self.antialias)
        target = resize_feature_map(_float32(t), size, self.resize, self.antialias)
        if self.mode == "mse":
            return F.mse_loss(s, target, reduction="mean")
        return F.l1_loss(s, target, reduction="mean")

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, resize={self.resize!r}, grid={self.grid}"
