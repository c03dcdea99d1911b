"""Tissue detection: a low-resolution mask of the slide and the tissue fraction of each region.

The mask is Otsu's threshold on HSV saturation of a thumbnail (tissue is stained, glass is grey
or white), floored at ``MIN_SATURATION`` so that a blank slide is not split in two by noise, and
with near-black pixels (pen marks, scanner borders) excluded. The thumbnail is built strip by strip
from the smallest adequate pyramid level, so memory stays bounded however large the slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .slide import SlideInfo, best_level, to_rgb

#: Microns per thumbnail pixel aimed at (coarser when the slide is huge, see MAX_THUMB_PX).
THUMB_MPP = 8.0
MAX_THUMB_PX = 4096
#: Rows of level pixels read at once while building the thumbnail.
STRIP_PX = 1024
#: Saturation below which nothing is tissue, whatever Otsu says (glass is ~0.02-0.05).
MIN_SATURATION = 0.08
#: Value (brightness) below which a pixel is ink or border, not tissue.
MIN_VALUE = 0.12


@dataclass(frozen=True)
class TissueMask:
    """Boolean mask with ``scale`` level-0 pixels per mask pixel."""

    mask: np.ndarray
    scale: float
    threshold: float

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fraction of each level-0 square ``(x, y, size0)``, via a summed-area table."""
        sat = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = self.mask.shape
        x0 = np.clip(np.floor(xs / self.scale).astype(int), 0, w)
        y0 = np.clip(np.floor(ys / self.scale).astype(int), 0, h)
        x1 = np.clip(np.ceil((xs + size0) / self.scale).astype(int), 0, w)
        y1 = np.clip(np.ceil((ys + size0) / self.scale).astype(int), 0, h)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        return inside / area


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
            small = Image.fromarray(to_rgb(region)).resize(
                (tx1 - tx0, ty1 - ty0), Image.Resampling.BOX
            )
            out[ty0:ty1, tx0:tx1] = np.asarray(small)
    return out, info.width / tw


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold on values in [0, 1]: maximises the between-class variance
    ``w0 * w1 * (mean0 - mean1) ** 2`` over histogram cuts."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    # Between two well separated modes the criterion is flat: take the middle of the plateau.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(round(best.mean())) + 1])


def tissue_mask(rgb: np.ndarray) -> TissueMask:
    """Mask of stained pixels of an RGB thumbnail (scale filled in by :func:`detect_tissue`)."""
    arr = rgb.astype(np.float32) / 255.0
    cmax = arr.max(axis=2)
    cmin = arr.min(axis=2)
    sat = np.divide(cmax - cmin, cmax, out=np.zeros_like(cmax), where=cmax > 0)
    threshold = max(otsu(sat), MIN_SATURATION)
    mask = (sat >= threshold) & (cmax >= MIN_VALUE)
    return TissueMask(mask=mask, scale=1.0, threshold=threshold)


def detect_tissue(slide, info: SlideInfo) -> TissueMask:
    """Tissue mask of a whole slide at roughly THUMB_MPP microns per pixel."""
    rgb, scale = thumbnail(slide, info)
    found = tissue_mask(rgb)
    return TissueMask(mask=found.mask, scale=scale, threshold=found.threshold)


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
