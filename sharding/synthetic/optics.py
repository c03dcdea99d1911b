"""How a scanner's optics change a synthetic slide: focus blur and stripe shading.

A site effect of another kind than staining (:mod:`~sharding.synthetic.staining`): the same
stained tissue looks different through different scanners. :class:`Optics` holds two properties:

* ``blur_um``: the standard deviation, in micrometres on the slide, of a Gaussian point-spread
  function (defocus, a softer objective): it erases detail finer than a few ``blur_um``, such
  as chromatin texture at 40x, and leaves tissue architecture alone;
* ``shading``: the illumination of a line-scan camera falls off towards the edges of each scan
  stripe (``stripe_um`` wide, along x): light is multiplied by
  ``1 - shading * (2 * frac - 1)^2`` with ``frac`` the position across the stripe, in [0, 1).
  A slowly varying brightness pattern fixed to slide coordinates, glass included.

Both act on the optical image, before the sensor noise. Blur is applied to a margin of
``ceil(3 * sigma)`` pixels around the requested rectangle, so a tile's pixels do not depend on
the tile boundaries beyond what the sensor noise already does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optics:
    """A scanner's point-spread function and illumination (module doc); the default is ideal."""

    blur_um: float = 0.0
    shading: float = 0.0
    stripe_um: float = 1000.0

    def __post_init__(self) -> None:
        if self.blur_um < 0 or not 0 <= self.shading < 1 or self.stripe_um <= 0:
            raise ValueError(f"bad optics {self}: blur_um >= 0, 0 <= shading < 1, stripe_um > 0")

    @property
    def ideal(self) -> bool:
        return self.blur_um == 0 and self.shading == 0

    def margin_px(self, mpp: float) -> int:
        """Pixels of context the blur needs on each side at ``mpp``."""
        return int(math.ceil(3 * self.blur_um / mpp)) if self.blur_um else 0

    def apply(self, clean: np.ndarray, x0: int, mpp: float, noise: np.ndarray) -> np.ndarray:
        """RGB uint8 of the rectangle whose noise-free pixels, with :meth:`margin_px` on each
        side, are ``clean``; ``x0`` is the rectangle's first column on the raster of ``mpp``,
        ``noise`` its sensor noise ``(h, w, 3)``."""
        m = self.margin_px(mpp)
        img = clean.astype(np.float32)
        if m:
            img = gaussian_blur(img, self.blur_um / mpp)[m:-m, m:-m]
        if self.shading:
            xs = (x0 + np.arange(img.shape[1]) + 0.5) * mpp
            frac = np.mod(xs, self.stripe_um) / self.stripe_um
            light = (1.0 - self.shading * (2.0 * frac - 1.0) ** 2).astype(np.float32)
            img *= light[None, :, None]
        img += noise
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``(h, w, c)`` float image, kernel radius ``ceil(3 sigma)``;
    borders use the nearest edge pixel (callers crop a margin of that radius)."""
    r = int(math.ceil(3 * sigma))
    if r == 0:
        return img
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, weight in enumerate(k):
            acc += weight * np.take(padded, np.arange(i, i + n), axis=axis)
        out = acc
    return out
