"""Marker ink (and black borders) on a slide thumbnail, found by hue, saturation and brightness.

H&E stains lie on a narrow arc of hue: eosin pink to hematoxylin purple (about 250-340 degrees
in HSV) and, mixed at thumbnail scale, mostly 280-330. Pathologists' markers sit elsewhere:

* ``blue``: hue 180-245, saturation >= 0.25 (bluer than hematoxylin, which stays near 255+);
* ``green``: hue 70-180, saturation >= 0.15 (no H&E pixel is green);
* ``red``: hue >= 345 or <= 15, saturation >= 0.5 (strong eosin stays below ~340; red blood
  cells in bulk can reach this arc, the price of removing red marker);
* ``black``: brightness < 0.2, or < 0.45 and greyish (saturation < 0.25): black marker, often
  tinted, and dark scanner borders; dense hematoxylin at thumbnail scale stays purple and
  saturated (>= 0.3).

Each colour's pixels are cleaned of specks (a marker stroke is wide: hundreds of microns), so
scattered odd pixels of real tissue are not taken for ink, and of pinholes (noise, a nucleus
under the ink) up to the same area. The ink mask is grown by
``INK_MARGIN_UM`` where it is removed from the tissue candidates: a stroke's edge, half ink and
half glass, keeps the ink's hue at a lower saturation.
"""

from __future__ import annotations

import numpy as np

from .morphology import drop_small, fill_small_holes, grow

#: Ink areas smaller than this (um^2) are specks of stain or dust, not a marker.
MIN_INK_UM2 = 5000.0
#: Margin around ink removed from the tissue candidates (um).
INK_MARGIN_UM = 16.0
INK_COLOURS = ("blue", "green", "red", "black")


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of an RGB uint8 image."""
    # Contiguous channel planes, compared channel by channel: the same values as interleaved
    # pixels and max/min over axis 2, which numpy runs slowly (strided, length-3 axes).
    r, g, b = np.moveaxis(rgb, -1, 0).astype(np.float32, order="C") / 255.0
    cmax = np.maximum(np.maximum(r, g), b)
    chroma = cmax - np.minimum(np.minimum(r, g), b)
    sat = np.divide(chroma, cmax, out=np.zeros_like(cmax), where=cmax > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    # ``% 6`` and ``% 360`` by hand (numpy's float modulo is slow next to the rest of this function):
    # where r is the maximum (the only pixels whose value is kept), (g - b) / chroma lies in
    # [-1, 1], so ``% 6`` adds 6 to negatives; hue * 60 lies in [0, 360], 360 itself only by
    # rounding, which ``% 360`` makes 0; ``+ 0.0`` turns -0.0 into 0.0 as the modulo does. The
    # same bits as the modulo for every 8-bit colour (checked exhaustively).
    red = (g - b) / safe
    red = np.where(red < 0, red + 6, red)
    hue = np.where(cmax == r, red, np.where(cmax == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = hue * 60.0
    return np.where(hue >= 360.0, hue - 360.0, hue) + 0.0, sat, cmax


def ink_colours(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> dict[str, np.ndarray]:
    """Raw per-colour ink masks (before speck removal), by the rules of the module docstring."""
    black = (val < 0.2) | ((val < 0.45) & (sat < 0.25))
    lit = ~black
    return {
        "blue": lit & (hue >= 180) & (hue <= 245) & (sat >= 0.25),
        "green": lit & (hue >= 70) & (hue < 180) & (sat >= 0.15),
        "red": lit & ((hue >= 345) | (hue <= 15)) & (sat >= 0.5),
        "black": black,
    }


def ink_mask(hue: np.ndarray, sat: np.ndarray, val: np.ndarray, mpp: float) -> np.ndarray:
    """Marker ink and black borders of a thumbnail with ``mpp`` microns per pixel, specks of each
    colour smaller than ``MIN_INK_UM2`` dropped, then holes up to that area filled."""
    min_px = MIN_INK_UM2 / (mpp * mpp)
    out = np.zeros(hue.shape, bool)
    for found in ink_colours(hue, sat, val).values():
        out |= drop_small(found, min_px)
    return fill_small_holes(out, min_px)


def ink_margin(ink: np.ndarray, mpp: float) -> np.ndarray:
    """``ink`` grown by ``INK_MARGIN_UM``: what the tissue candidates leave out."""
    return grow(ink, max(1, int(round(INK_MARGIN_UM / mpp))))
