"""The tiling plan of a slide: its region grid and which regions hold enough tissue.

One definition, used by sharding (:func:`sharding.extract.plan_slide`) and by prediction
(:mod:`resdistill.read_chain`), so a slide is predicted on exactly the regions sharding cuts:

1. base microns per pixel from the slide (or the ``--mpp`` override), refused when the top
   magnification ``opts.mags[0]`` would need upsampling;
2. the tissue mask of the slide (:func:`sharding.tissue.detect_tissue`, whatever detector
   sharding uses);
3. the region grid: level-0 squares of ``size0 = round(tile_px * mpp(top) / base_mpp)`` pixels,
   centred on the slide (:func:`sharding.tissue.grid`), ``cols = width // size0`` by
   ``rows = height // size0``, row-major; a region is kept when its tissue fraction is
   ``>= opts.min_tissue``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .options import ShardOptions
from .slide import SlideError, SlideInfo, check_magnification, slide_info
from .tissue import TissueMask, detect_tissue, grid, region_size0


@dataclass(frozen=True)
class RegionGrid:
    """Every region of one slide's grid (row-major), its tissue fraction, and which are kept."""

    info: SlideInfo
    size0: int
    xs: np.ndarray  # (rows * cols,) level-0 x of every cell
    ys: np.ndarray
    tissue: np.ndarray  # (rows * cols,) tissue fraction of every cell
    keep: np.ndarray  # (rows * cols,) bool: tissue >= min_tissue
    mask: TissueMask

    @property
    def rows(self) -> int:
        return self.info.height // self.size0

    @property
    def cols(self) -> int:
        return self.info.width // self.size0


def plan_regions(slide, path: str, opts: ShardOptions) -> RegionGrid:
    """Steps 1-3 of the module docstring for an open OpenSlide ``slide``.

    Raises :class:`SlideError` (one line) for a slide without mpp, a top magnification above the
    slide's, an unreadable level, a slide smaller than one region, or one without a region of
    enough tissue.
    """
    top = opts.mags[0]
    info = slide_info(slide, path, opts.mpp_override)
    check_magnification(info, top)
    size0 = region_size0(info, top.mpp, opts.tile_px)
    try:
        mask = detect_tissue(slide, info)
    except Exception as exc:  # OpenSlide raises on a truncated level
        raise SlideError(
            f"{path}: reading the slide failed ({exc}); the file may be truncated: copy it again"
        ) from None
    xs, ys = grid(info.width, info.height, size0)
    if xs.size == 0:
        raise SlideError(
            f"{path}: the slide ({info.width}x{info.height} px) is smaller than one region "
            f"({opts.tile_px} px at {top}, {size0} px at level 0): lower --tile-px or the top "
            "magnification"
        )
    frac = mask.fractions(xs, ys, size0)
    keep = frac >= opts.min_tissue
    if not keep.any():
        raise SlideError(
            f"{path}: no region has a tissue fraction >= {opts.min_tissue:g} (best "
            f"{frac.max():.2f}): check the slide is not blank, or lower --min-tissue"
        )
    return RegionGrid(info=info, size0=size0, xs=xs, ys=ys, tissue=frac, keep=keep, mask=mask)
