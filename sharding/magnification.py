"""Magnification: the one place that converts between objective power, microns per pixel and names.

Contract (shared by sharding, training and evaluation):

* ``mpp = 10 / magnification``: 10x is 1.0 um/px, 20x is 0.5, 40x is 0.25.
* A magnification is written ``10x``, ``5x``, ``2.5x`` or ``0.5um`` (microns per pixel) on the
  command line, and named without dots in files and sample keys: ``10x``, ``2p5x``, ``1p25x``,
  ``0p625x`` (webdataset splits a member name at its first dot, so extensions must be dot-free).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: The objective power that images 1 um per pixel: ``mpp = MPP_AT_1X / magnification``.
MPP_AT_1X = 10.0

_MAG_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>x|um|mpp|µm)?\s*$", re.IGNORECASE
)
_NAME_RE = re.compile(r"^(?P<int>\d+)(?:p(?P<frac>\d+))?x$")


@dataclass(frozen=True, order=True)
class Magnification:
    """An objective magnification, e.g. ``Magnification(10.0)`` is 10x = 1.0 um/px."""

    power: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.power) and self.power > 0):
            raise ValueError(f"magnification must be a positive number, got {self.power!r}")

    @property
    def mpp(self) -> float:
        """Microns per pixel: ``10 / power``."""
        return MPP_AT_1X / self.power

    @property
    def name(self) -> str:
        """Dot-free name used in sample member names and dataset.json: 10x, 2p5x, 0p625x."""
        text = f"{self.power:.6f}".rstrip("0").rstrip(".")
        return text.replace(".", "p") + "x"

    @classmethod
    def from_mpp(cls, mpp: float) -> Magnification:
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"microns per pixel must be a positive number, got {mpp!r}")
        return cls(round(MPP_AT_1X / mpp, 6))

    @classmethod
    def parse(cls, text: str | float | Magnification) -> Magnification:
        """Parse ``10x``, ``10``, ``2.5x``, ``2p5x`` or ``0.5um`` / ``0.5mpp`` (microns per pixel)."""
        if isinstance(text, Magnification):
            return text
        if isinstance(text, (int, float)):
            return cls(float(text))
        named = _NAME_RE.match(text.strip())
        if named:
            return cls(float(f"{named['int']}.{named['frac'] or '0'}"))
        m = _MAG_RE.match(text)
        if not m:
            raise ValueError(
                f"cannot read magnification {text!r}: write it as 10x, 2.5x or 0.5um (microns per pixel)"
            )
        value = float(m["num"])
        if value <= 0:
            raise ValueError(f"magnification must be positive, got {text!r}")
        unit = (m["unit"] or "x").lower()
        return cls.from_mpp(value) if unit in ("um", "mpp", "µm") else cls(value)

    def __str__(self) -> str:
        return f"{self.power:g}x"


def display_mag(name: str | float | Magnification) -> str:
    """A magnification as users write it (``2.5x``), from any form :meth:`Magnification.parse`
    reads (e.g. the file-name form ``2p5x``); for plots, tables and messages."""
    return str(Magnification.parse(name))


def parse_mags(text: str) -> list[Magnification]:
    """Parse a comma list such as ``10,5,2.5,1.25``; highest first, no duplicates."""
    mags = [Magnification.parse(part) for part in text.split(",") if part.strip()]
    if not mags:
        raise ValueError("no magnification given: use e.g. --mags 10,5,2.5,1.25")
    if len({m.name for m in mags}) != len(mags):
        raise ValueError(f"duplicate magnification in {text!r}")
    if mags != sorted(mags, reverse=True):
        raise ValueError(f"magnifications must be listed highest first, got {text!r}")
    return mags


def tile_sizes(mags: list[Magnification], tile_px: int) -> dict[str, int]:
    """Tile edge in pixels at each magnification: ``tile_px * mag / mags[0]``, each exact.

    The region is the same at every magnification, so every ratio to the highest one must give a
    whole number of pixels (224 at 10x -> 112 at 5x, 56 at 2.5x, 28 at 1.25x).
    """
    top = mags[0].power
    sizes: dict[str, int] = {}
    for mag in mags:
        px = tile_px * mag.power / top
        if abs(px - round(px)) > 1e-6 or round(px) < 1:
            raise ValueError(
                f"--tile-px {tile_px} at {mags[0]} gives {px:g} px at {mag}: choose a tile size "
                f"that divides evenly (e.g. a multiple of {int(round(top / mag.power))})"
            )
        sizes[mag.name] = int(round(px))
    return sizes
