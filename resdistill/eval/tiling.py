"""The region grid of a slide at a model's magnification: steps 1-3 of
:mod:`resdistill.eval.predict`, drawn with the sharding planner's own functions so that a slide is
predicted on exactly the regions sharding would cut from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MIN_TISSUE", "TilePlan", "plan_tiles"]

DEFAULT_MIN_TISSUE = 0.5


@dataclass
class TilePlan:
    """The region grid of one slide at one magnification and its tissue regions."""

    info: Any  # sharding.slide.SlideInfo
    size0: int
    rows: int
    cols: int
    xs: np.ndarray  # (rows * cols,) level-0 x of every grid cell, row-major
    ys: np.ndarray
    tissue: np.ndarray  # (rows * cols,) tissue fraction of every cell
    keep: np.ndarray  # (rows * cols,) bool: tissue >= min_tissue
    thumbnail: np.ndarray  # (th, tw, 3) uint8
    thumb_scale: float  # level-0 pixels per thumbnail pixel (x)


def plan_tiles(
    slide: Any,
    path: str,
    mag: Any,
    tile_px: int,
    *,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    mpp: float | None = None,
) -> TilePlan:
    """Steps 1-3 of :mod:`resdistill.eval.predict` for an open OpenSlide ``slide``.

    Raises :class:`sharding.slide.SlideError` (one line) for a slide without mpp, a magnification
    above the slide's, a slide smaller than one region, or a slide without tissue.
    """
    from sharding.magnification import Magnification
    from sharding.slide import SlideError, check_magnification, slide_info
    from sharding.tissue import TissueMask, grid, region_size0, thumbnail, tissue_mask

    info = slide_info(slide, path, mpp)
    magnification = Magnification.parse(mag)
    check_magnification(info, magnification)
    size0 = region_size0(info, magnification.mpp, tile_px)
    try:
        thumb, scale = thumbnail(slide, info)
    except Exception as exc:  # OpenSlide raises on a truncated level
        raise SlideError(
            f"{path}: reading the slide failed ({exc}); the file may be truncated: copy it again"
        ) from None
    found = tissue_mask(thumb)
    mask = TissueMask(mask=found.mask, scale=scale, threshold=found.threshold)
    xs, ys = grid(info.width, info.height, size0)
    if xs.size == 0:
        raise SlideError(
            f"{path}: the slide ({info.width}x{info.height} px) is smaller than one "
            f"{tile_px} px tile at {magnification} ({size0} px at level 0)"
        )
    frac = mask.fractions(xs, ys, size0)
    keep = frac >= min_tissue
    if not keep.any():
        raise SlideError(
            f"{path}: no region has a tissue fraction >= {min_tissue:g} (best {frac.max():.2f}): "
            "check the slide is not blank, or lower --min-tissue"
        )
    return TilePlan(
        info=info,
        size0=size0,
        rows=info.height // size0,
        cols=info.width // size0,
        xs=xs,
        ys=ys,
        tissue=frac,
        keep=keep,
        thumbnail=thumb,
        thumb_scale=float(scale),
    )
