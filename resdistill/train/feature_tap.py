"""Which student map the feature term reads: the last conv map (the paper), or, on a spatial
grid (``--feature-grid N``), the deepest stage that still has ``N x N`` cells.

On a 128 px teacher tile at 10x, the student's tile is 32 px at 2.5x and 16 px at 1.25x; a
ResNet's stage ``k`` (1..4) has stride ``2^(k+1)``, so its last map (stride 32) is one cell at
both, and a loss on it compares the teacher's global maximum only. The stage maps there:

    stage (stride)     2.5x, 32 px     1.25x, 16 px     teacher 10x, 128 px
    1 (4)              8 x 8           4 x 4            32 x 32
    2 (8)              4 x 4           2 x 2            16 x 16
    3 (16)             2 x 2           1 x 1            8 x 8
    4 (32)             1 x 1           1 x 1            4 x 4

With ``N = 2`` the student's stage 3 at 2.5x (stage 2 at 1.25x) meets the teacher's last map
pooled to 2 x 2; cell ``(i, j)`` of both covers the same quarter of the region, since the two
tiles are the same region. The deepest such stage keeps the most of the student's depth under
the term (FitNets' "hint" layer, Romero et al. 2015, chosen by geometry).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: the ResNet stages a tap may read (``layer1`` .. ``layer4``)
STAGES = (1, 2, 3, 4)


@dataclass(frozen=True)
class FeatureTap:
    """The student map the feature term reads: ``stage`` (1..4; 4 is the last map, what
    ``forward`` returns), its ``channels`` and, on a grid, its ``size`` on the run's student
    tiles (None for the last map, which is not measured)."""

    stage: int
    channels: int
    size: tuple[int, int] | None = None

    @property
    def last(self) -> bool:
        return self.stage == STAGES[-1]


def stage_shapes(model: nn.Module, tile_px: int) -> list[tuple[int, int, int]]:
    """``(channels, h, w)`` of each stage of ``model`` (a :class:`~resdistill.models.
    ResNetClassifier`) on a ``tile_px`` square tile: one forward pass of zeros on the CPU, in
    eval mode (no normalisation statistic moves) and without gradients."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            _, maps = model.stage_maps(torch.zeros(1, 3, tile_px, tile_px, device=device))
    finally:
        model.train(was_training)
    return [(int(m.shape[1]), int(m.shape[2]), int(m.shape[3])) for m in maps]


def feature_tap(model: nn.Module, tile_px: int, grid: int) -> FeatureTap:
    """The map the feature term reads on ``tile_px`` student tiles: the last stage for
    ``grid = 0``; for ``grid >= 2`` the deepest stage with at least ``grid`` cells per side.
    Raises ``ValueError`` (naming ``--feature-grid``) when no stage has that many, or the
    student has no stages (a network without ``stage_maps``, e.g. a timm model)."""
    if grid == 0:
        return FeatureTap(STAGES[-1], int(model.feature_channels))
    if not hasattr(model, "stage_maps"):
        raise ValueError(f"--feature-grid {grid} needs a ResNet student (its stage maps)")
    shapes = stage_shapes(model, tile_px)
    for stage, (c, h, w) in reversed(list(zip(STAGES, shapes, strict=True))):
        if min(h, w) >= grid:
            return FeatureTap(stage, c, (h, w))
    c, h, w = shapes[0]
    raise ValueError(
        f"--feature-grid {grid}: the student's first stage is {h}x{w} on {tile_px} px tiles; "
        f"use a grid of at most {min(h, w)}, or larger tiles"
    )
