"""Clean-up of boolean masks by connected components: drop specks, fill small holes, grow, and
keep the weak parts that touch strong ones (hysteresis). 8-connectivity throughout.

Sizes are in mask pixels; callers convert from square microns with the mask's pixel size.
scipy is imported inside the functions: the modules that use these are imported by readers of
dataset.json, which never clean masks.
"""

from __future__ import annotations

import numpy as np

_EIGHT = np.ones((3, 3), bool)


def _label(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component labels and each label's pixel count (index 0: the background)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=_EIGHT)
    return labels, np.bincount(labels.ravel())


def drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without its components of fewer than ``min_px`` pixels."""
    if not mask.any() or min_px <= 1:
        return mask.copy()
    labels, sizes = _label(mask)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """``mask`` with its holes (background not connected to the border) of at most ``max_px``
    pixels filled: lumens, fat cells, a dropped dark pixel inside tissue."""
    if not mask.any():
        return mask.copy()
    # Pad with background so that every piece of background reaching the border is one component.
    background = np.pad(~mask, 1, constant_values=True)
    labels, sizes = _label(background)
    small = sizes <= max_px
    small[0] = False
    small[labels[0, 0]] = False  # the outside
    return mask | small[labels][1:-1, 1:-1]


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` dilated by ``px`` pixels (a square of side ``2 px + 1``)."""
    if px <= 0 or not mask.any():
        return mask.copy()
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=_EIGHT, iterations=px)


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The components of ``weak`` that hold at least one pixel of ``strong`` (``strong``
    is expected inside ``weak``)."""
    if not strong.any():
        return np.zeros_like(weak)
    labels, _ = _label(weak)
    seeded = np.zeros(labels.max() + 1, bool)
    seeded[labels[strong & weak]] = True
    seeded[0] = False
    return seeded[labels]
