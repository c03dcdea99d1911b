"""Slides with a known tissue mask and the things real glass carries: marker ink of every colour,
dark scanner borders, black dots, pale tissue, no glass at all, no tissue at all.

Pixels follow Beer-Lambert: ``RGB = glass * exp(-(OD_tissue + d * OD_ink))``, where the tissue's
optical density mixes hematoxylin and eosin (smooth fields plus dark nuclei) and ``d`` is the ink
density. The true mask is tissue not covered by ink or dots: what a tile of usable tissue shows.
Slides are 3 x 2.3 mm, written at 2 um/px (AppMag 5) with :func:`tests.slide_factory.write_slide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.slide_factory import write_slide

MPP = 2.0
GLASS = np.array([242.0, 240.0, 245.0])
_H = np.array([0.60, 0.74, 0.30]) / np.linalg.norm([0.60, 0.74, 0.30])
_E = np.array([0.13, 0.87, 0.48]) / np.linalg.norm([0.13, 0.87, 0.48])
#: Colours of full-density marker ink on glass, as scanned.
INK_RGB = {
    "blue": (45, 75, 170),
    "green": (40, 135, 85),
    "black": (40, 42, 55),  # black markers scan dark grey with a blue tint
    "red": (185, 35, 50),
}


@dataclass
class Painted:
    """A slide being painted: its optical density per channel and its true tissue mask."""

    od: np.ndarray  # (h, w, 3)
    truth: np.ndarray  # (h, w) bool
    rng: np.random.Generator

    @classmethod
    def glass(cls, width: int, height: int, seed: int) -> Painted:
        return cls(
            np.zeros((height, width, 3)),
            np.zeros((height, width), bool),
            np.random.default_rng(seed),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.truth.shape

    def smooth(self, cell: int) -> np.ndarray:
        """A smooth random field in [0, 1] (bilinear noise on a ``cell``-pixel lattice)."""
        h, w = self.shape
        lattice = self.rng.random((h // cell + 2, w // cell + 2))
        yy, xx = np.arange(h) / cell, np.arange(w) / cell
        y0, x0 = yy.astype(int), xx.astype(int)
        fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
        a = lattice[y0][:, x0]
        b = lattice[y0][:, x0 + 1]
        c = lattice[y0 + 1][:, x0]
        d = lattice[y0 + 1][:, x0 + 1]
        return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy

    def blob(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        """An irregular ellipse: its radius wobbles by up to 15% with the angle."""
        h, w = self.shape
        yy, xx = np.mgrid[:h, :w]
        u, v = (xx - cx) / rx, (yy - cy) / ry
        angle = np.arctan2(v, u)
        phase = self.rng.uniform(0, 2 * np.pi, 3)
        wobble = 1 + 0.08 * np.sin(3 * angle + phase[0]) + 0.05 * np.sin(5 * angle + phase[1])
        return np.hypot(u, v) < wobble

    def tissue(self, where: np.ndarray, strength: float = 1.0) -> None:
        """Stain ``where`` with H&E: eosin stroma, hematoxylin, and nuclei, scaled by ``strength``
        (1: a well-stained section; 0.2: pale, loose or fatty tissue)."""
        e = 0.35 + 0.5 * self.smooth(um(60))
        hem = 0.15 + 0.35 * self.smooth(um(90))
        nuclei = self.rng.random(self.shape) < 0.02
        hem = hem + 1.2 * nuclei
        od = strength * (hem[..., None] * _H + e[..., None] * _E)
        self.od[where] += od[where]
        self.truth |= where

    def ink(self, where: np.ndarray, colour: str) -> None:
        """Marker ink over ``where`` (over glass or tissue), density 0.75-1.15; removes truth."""
        od = -np.log(np.asarray(INK_RGB[colour], float) / GLASS)
        density = 0.75 + 0.4 * self.smooth(um(40))
        self.od[where] += density[where][:, None] * od
        self.truth &= ~where

    def render(self) -> np.ndarray:
        noise = self.rng.normal(0, 2.5, self.od.shape)
        return (GLASS * np.exp(-self.od) + noise).clip(0, 255).astype(np.uint8)


def ring(shape: tuple[int, int], cx: float, cy: float, r: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.abs(np.hypot(xx - cx, yy - cy) - r) < width / 2


def stroke(shape: tuple[int, int], p0: tuple, p1: tuple, width: float) -> np.ndarray:
    """A straight marker stroke of ``width`` pixels from ``p0`` to ``p1`` (x, y)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)) < width / 2


def disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(xx - cx, yy - cy) < r


W, H = 1536, 1152


def um(length: float) -> int:
    """Pixels of ``length`` microns."""
    return int(round(length / MPP))


def _island(p: Painted, strength: float = 1.0) -> None:
    p.tissue(p.blob(W * 0.5, H * 0.5, W * 0.27, H * 0.3), strength)


def marker_ring(colour: str, seed: int) -> Painted:
    """A thick marker circle round the island (on glass) and a stroke across its edge."""
    p = Painted.glass(W, H, seed)
    _island(p)
    p.ink(ring(p.shape, W * 0.5, H * 0.5, H * 0.45, um(260)), colour)
    p.ink(stroke(p.shape, (W * 0.05, H * 0.1), (W * 0.3, H * 0.35), um(300)), colour)
    return p


def dark_border_and_dots(seed: int) -> Painted:
    """A black scanner border on two sides and black marker dots beside the tissue."""
    p = Painted.glass(W, H, seed)
    _island(p)
    p.ink(
        np.pad(np.ones((H - um(260), W - um(200)), bool), ((0, um(260)), (um(200), 0))) == 0,
        "black",
    )
    for cx, cy in [(0.15, 0.2), (0.85, 0.25), (0.88, 0.7), (0.12, 0.6)]:
        p.ink(disc(p.shape, W * cx, H * cy, um(110)), "black")
    return p


def pale(seed: int) -> Painted:
    """A well-stained island and, apart from it, a pale one (a fifth of the stain)."""
    p = Painted.glass(W, H, seed)
    p.tissue(p.blob(W * 0.27, H * 0.5, W * 0.2, H * 0.3))
    p.tissue(p.blob(W * 0.75, H * 0.5, W * 0.18, H * 0.3), strength=0.2)
    return p


def all_tissue(seed: int) -> Painted:
    """Tissue from edge to edge (a biopsy scanned tight, a TMA core's tile)."""
    p = Painted.glass(W, H, seed)
    p.tissue(np.ones(p.shape, bool))
    return p


def blank(seed: int) -> Painted:
    return Painted.glass(W, H, seed)


CASES = {
    "blue": lambda: marker_ring("blue", 1),
    "green": lambda: marker_ring("green", 2),
    "black": lambda: marker_ring("black", 3),
    "red": lambda: marker_ring("red", 4),
    "border": lambda: dark_border_and_dots(5),
    "pale": lambda: pale(6),
    "all_tissue": lambda: all_tissue(7),
    "blank": lambda: blank(8),
}


def write_case(folder: Path, name: str) -> tuple[Path, np.ndarray]:
    """Write case ``name`` as ``<folder>/<name>.svs``; return its path and true level-0 mask."""
    p = CASES[name]()
    path = write_slide(folder / f"{name}.svs", p.render(), app_mag=10, mpp=MPP)
    return path, p.truth
