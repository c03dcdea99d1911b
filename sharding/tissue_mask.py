"""The tissue mask of an RGB thumbnail: ink filter, candidate pixels, threshold, clean-up.

Tissue is stained, glass is grey or white, so the mask is a threshold on HSV saturation, built
in four steps that each do one thing:

1. **ink** (:mod:`sharding.ink`): marker ink of any colour and black borders, by hue;
2. **candidates**: pixels that may be tissue: not ink (nor its margin), not near-black
   (value < ``NEAR_BLACK``, where saturation is noise) and not near-white (every channel >=
   ``NEAR_WHITE``: blown-out background outside the scanned area);
3. **threshold** (:func:`saturation_threshold`): Otsu's threshold over the candidates only, so
   that ink and borders cannot pull it up, kept within ``[MIN_SATURATION, MAX_SATURATION]``;
   when the candidates hold no glass mode (under ``GLASS_MIN_FRACTION`` of them below
   ``GLASS_SATURATION``: a slide that is all tissue) Otsu would split the tissue in two, so the
   floor ``MIN_SATURATION`` is used;
4. **mask**: candidates above ``WEAK_SATURATION`` kept where they are connected to pixels above
   the threshold (hysteresis: the pale rim of a section stays with its stained body), holes up
   to ``MAX_HOLE_UM2`` filled, pieces under ``MIN_TISSUE_UM2`` dropped, ink removed again.

:data:`DETECTOR` names the method and its version; dataset.json records it (key ``tissue``) and a
resumed run must use the same (see :meth:`sharding.options.ShardOptions.identity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ink import hsv, ink_margin, ink_mask
from .morphology import drop_small, fill_small_holes, hysteresis

#: Bump ``version`` whenever a change moves masks: regions of datasets and predictions follow it.
DETECTOR = {"method": "ink-filtered saturation Otsu, hysteresis, morphology", "version": 2}

#: Microns per thumbnail pixel aimed at (coarser when the slide is huge, see tissue.MAX_THUMB_PX).
THUMB_MPP = 8.0
#: Saturation floor of the threshold: clean glass is ~0.01-0.05.
MIN_SATURATION = 0.08
#: Ceiling of the threshold: a slide whose tissue is mostly well stained must not push it above
#: the pale tissue of the same slide.
MAX_SATURATION = 0.15
#: Saturation of the weak (hysteresis) level: pale tissue joined to stained tissue.
WEAK_SATURATION = 0.06
#: A candidate below this saturation is glass-like; the glass mode needs GLASS_MIN_FRACTION.
GLASS_SATURATION = 0.04
GLASS_MIN_FRACTION = 0.05
#: Value (brightness) below which saturation is noise: never tissue, never counted.
NEAR_BLACK = 0.2
#: Every channel at or above this (of 255) is blown-out white: not a candidate.
NEAR_WHITE = 247
#: Holes in the tissue up to this area (um^2) are filled (lumens, fat cells, a dropped pixel).
MAX_HOLE_UM2 = 50_000.0
#: Tissue pieces under this area (um^2) are dropped (dust, debris, stray stain).
MIN_TISSUE_UM2 = 10_000.0


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue and ink masks with ``scale`` level-0 pixels per mask pixel; ``thumb`` is
    the RGB thumbnail they were found on, when kept (for the QC picture)."""

    mask: np.ndarray
    scale: float
    threshold: float
    ink: np.ndarray | None = None
    thumb: np.ndarray | None = None

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fraction of each level-0 square ``(x, y, size0)``."""
        return cover(self.mask, self.scale, xs, ys, size0)

    def ink_fractions(self, xs: np.ndarray, ys: np.ndarray, size0: float) -> np.ndarray:
        """Ink fraction of each level-0 square ``(x, y, size0)`` (0 without an ink mask)."""
        if self.ink is None:
            return np.zeros(np.shape(xs), np.float64)
        return cover(self.ink, self.scale, xs, ys, size0)


def cover(mask: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray, size0: float):
    """Fraction of each level-0 square ``(x, y, size0)`` that ``mask`` covers, via a summed-area
    table over the mask pixels the square touches."""
    sat = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    x0 = np.clip(np.floor(xs / scale).astype(int), 0, w)
    y0 = np.clip(np.floor(ys / scale).astype(int), 0, h)
    x1 = np.clip(np.ceil((xs + size0) / scale).astype(int), 0, w)
    y1 = np.clip(np.ceil((ys + size0) / scale).astype(int), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return inside / area


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


def candidates(rgb: np.ndarray, val: np.ndarray, ink_zone: np.ndarray) -> np.ndarray:
    """Pixels that may be tissue: not ink or its margin, not near-black, not near-white."""
    near_white = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) >= NEAR_WHITE
    return ~ink_zone & (val >= NEAR_BLACK) & ~near_white


def saturation_threshold(sat: np.ndarray) -> float:
    """The strong threshold from the candidates' saturations (step 3 of the module docstring)."""
    if sat.size == 0 or np.mean(sat < GLASS_SATURATION) < GLASS_MIN_FRACTION:
        return MIN_SATURATION
    return float(np.clip(otsu(sat), MIN_SATURATION, MAX_SATURATION))


def clean(mask: np.ndarray, mpp: float) -> np.ndarray:
    """Fill holes up to ``MAX_HOLE_UM2`` and drop pieces under ``MIN_TISSUE_UM2``."""
    px2 = mpp * mpp
    return drop_small(fill_small_holes(mask, MAX_HOLE_UM2 / px2), MIN_TISSUE_UM2 / px2)


def tissue_mask(rgb: np.ndarray, mpp: float = THUMB_MPP) -> TissueMask:
    """Tissue and ink of an RGB thumbnail with ``mpp`` microns per pixel (``scale`` is 1: the
    caller sets it, see :func:`sharding.tissue.detect_tissue`)."""
    hue, sat, val = hsv(rgb)
    ink = ink_mask(hue, sat, val, mpp)
    zone = ink_margin(ink, mpp)
    cand = candidates(rgb, val, zone)
    threshold = saturation_threshold(sat[cand])
    weak = cand & (sat >= min(WEAK_SATURATION, threshold))
    found = hysteresis(weak, weak & (sat >= threshold))
    mask = clean(found, mpp) & ~zone
    return TissueMask(mask=mask, scale=1.0, threshold=threshold, ink=ink, thumb=rgb)
