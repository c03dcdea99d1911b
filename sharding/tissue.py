"""Tissue detection on a slide: its thumbnail, its tissue and ink masks, and the region grid.

:func:`detect_tissue` is the one entry point for sharding and prediction alike: it builds a
thumbnail near ``THUMB_MPP`` microns per pixel, strip by strip from the smallest adequate pyramid
level (memory stays bounded however large the slide), and finds tissue and marker ink on it with
:func:`sharding.tissue_mask.tissue_mask` (ink filter, candidates, threshold, clean-up).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from .slide import SlideInfo, best_level, rgb_image
from .tissue_mask import DETECTOR, THUMB_MPP, TissueMask, otsu, tissue_mask

__all__ = [
    "DETECTOR", "THUMB_MPP", "TissueMask", "detect_tissue", "grid", "otsu", "region_size0",
    "thumbnail", "tissue_mask",
]  # fmt: skip

MAX_THUMB_PX = 4096
#: Rows of level pixels read at once while building the thumbnail.
STRIP_PX = 1024


def thumbnail(slide, info: SlideInfo) -> tuple[np.ndarray, float]:
    """RGB thumbnail near THUMB_MPP and its scale (level-0 pixels per thumbnail pixel).

    Reads the level with the largest downsample at or below the wanted scale in blocks of at most
    STRIP_PX x STRIP_PX level pixels (more when one block would shrink below a thumbnail pixel),
    shrinking each block into its place before reading the next: memory is bounded by the block
    and the thumbnail, not by the level.
    """
    scale = max(THUMB_MPP / info.base_mpp, max(info.width, info.height) / MAX_THUMB_PX, 1.0)
    level = best_level(info.level_downsamples, scale)
    ds = info.level_downsamples[level]
    lw, lh = info.level_dimensions[level]
    tw, th = max(1, int(round(info.width / scale))), max(1, int(round(info.height / scale)))
    out = np.empty((th, tw, 3), dtype=np.uint8)
    block = max(STRIP_PX, int(math.ceil(4 * scale / ds)))

    def edges(length: int, thumb: int) -> list[tuple[int, int, int, int]]:
        """(level start, level length, thumb start, thumb end) per block along one axis."""
        out_edges, t_prev = [], 0
        for start in range(0, length, block):
            stop = min(start + block, length)
            t_end = thumb if stop >= length else min(thumb, int(round(stop * ds / scale)))
            if t_end > t_prev:
                out_edges.append((start, stop - start, t_prev, t_end))
                t_prev = t_end
        return out_edges

    for ly, lrows, ty0, ty1 in edges(lh, th):
        for lx, lcols, tx0, tx1 in edges(lw, tw):
            region = slide.read_region(
                (int(round(lx * ds)), int(round(ly * ds))), level, (lcols, lrows)
            )
            small = rgb_image(region).resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX)
            out[ty0:ty1, tx0:tx1] = np.asarray(small)
    return out, info.width / tw


def detect_tissue(slide, info: SlideInfo) -> TissueMask:
    """Tissue and ink masks of a whole slide at roughly THUMB_MPP microns per pixel, with the
    thumbnail they were found on."""
    rgb, scale = thumbnail(slide, info)
    return replace(tissue_mask(rgb, scale * info.base_mpp), scale=scale)


def grid(width: int, height: int, size0: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the non-overlapping ``size0`` squares that fit inside the slide."""
    nx, ny = width // size0, height // size0
    if nx == 0 or ny == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    # Centre the grid so the unused margin is split evenly.
    ox, oy = (width - nx * size0) // 2, (height - ny * size0) // 2
    ys, xs = np.meshgrid(oy + np.arange(ny) * size0, ox + np.arange(nx) * size0, indexing="ij")
    return xs.ravel().astype(np.int64), ys.ravel().astype(np.int64)


def region_size0(info: SlideInfo, top_mpp: float, tile_px: int) -> int:
    """Edge of a region in level-0 pixels: ``tile_px * top_mpp / base_mpp``, rounded."""
    return max(1, int(math.floor(tile_px * top_mpp / info.base_mpp + 0.5)))
