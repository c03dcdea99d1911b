"""How a synthetic slide is stained and scanned: the colour model from stain amounts to RGB.

Beer-Lambert, as in colour deconvolution: ``RGB_c = glass_c * exp(-(h * H_c + e * E_c)) + noise_c``
with unit optical-density (OD) vectors ``H`` (hematoxylin, blue-purple) and ``E`` (eosin, pink),
per-pixel stain amounts ``h``, ``e`` (already scaled by the stain strengths) and Gaussian sensor
noise. A :class:`Staining` holds what a lab and its scanner fix for every slide they make:
the two OD vectors, the strengths of the two stains and the colour of the bare glass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit(v: tuple[float, float, float]) -> tuple[float, float, float]:
    """``v / |v|`` in float32 (an OD vector's direction), as a tuple of Python floats."""
    a = np.asarray(v, np.float32) / np.float32(np.linalg.norm(np.asarray(v, np.float64)))
    return (float(a[0]), float(a[1]), float(a[2]))


@dataclass(frozen=True)
class Staining:
    """A lab's stains and scanner: unit OD vectors (R, G, B), stain strengths, glass colour.

    ``h_strength`` / ``e_strength`` multiply every slide's hematoxylin / eosin amounts;
    ``glass`` is the RGB of bare glass (the scanner's white point and background tint).
    """

    h_od: tuple[float, float, float] = unit((0.60, 0.74, 0.30))
    e_od: tuple[float, float, float] = unit((0.13, 0.87, 0.48))
    h_strength: float = 1.0
    e_strength: float = 1.0
    glass: tuple[float, float, float] = (242.0, 240.0, 245.0)

    def compose(self, hem: np.ndarray, eos: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of stain amounts ``hem``, ``eos`` ``(h, w)`` plus ``noise``.

        The amounts are used as given (the caller applies :attr:`h_strength` and
        :attr:`e_strength`), so this is only the Beer-Lambert mix, rounded and clipped.
        """
        h_od = np.asarray(self.h_od, np.float32)
        e_od = np.asarray(self.e_od, np.float32)
        glass = np.asarray(self.glass, np.float32)
        out = np.empty((*hem.shape, 3), np.uint8)
        for c in range(3):
            chan = hem * h_od[c]
            chan += eos * e_od[c]
            np.exp(-chan, out=chan)
            chan *= glass[c]
            chan += noise[..., c]
            chan += 0.5
            np.clip(chan, 0, 255, out=chan)
            out[..., c] = chan
        return out

    def blank(self, noise: np.ndarray) -> np.ndarray:
        """RGB uint8 of bare glass plus ``noise`` ``(h, w, 3)``."""
        return np.clip(np.asarray(self.glass, np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


#: The reference staining: the stains and glass of every slide of the ``default`` cohort.
REFERENCE = Staining()
