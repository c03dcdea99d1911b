"""Synthetic H&E-like whole-slide images: real pyramidal SVS / TIFF files that OpenSlide opens.

The project's demo and test data (``resdistill synth OUT --slides N --seed S``). Each slide is a
*scene* described in micrometres (tissue islands on glass, plus procedural fields hashed from the
seed), rendered tile by tile at the slide's base resolution and written as a JPEG pyramid by
:func:`sharding.pyramid_writer.write_pyramid`, whose lower levels are area averages of level 0.
Memory use does not grow with slide size.

Colour model (Beer-Lambert, as in colour deconvolution): ``RGB = glass * exp(-(h * H + e * E))``
with unit optical-density vectors ``H`` (hematoxylin, blue-purple) and ``E`` (eosin, pink) and
per-pixel stain amounts ``h``, ``e``, plus Gaussian sensor noise.

Classes (:data:`CLASSES`) carry their cue at different physical scales (:data:`CLASS_CUES`):

* ``benign``: the reference - fibrous pink stroma with scattered oval nuclei (smooth chromatin).
* ``glandular``: the same stroma and nuclei plus regular glands (75-95 um across on a 140 um
  grid, white lumen, pale epithelial rim lined by a ring of nuclei): architecture, which
  survives a 4-8x downsample. Glands are dense enough that any 128 um field of the tissue holds
  a good part of one, so a tile's slide label is true of the tile itself.
* ``atypia``: same nuclear density as ``benign``, but coarse clumped chromatin, nucleoli and an
  irregular contour (1-3 um detail): clear at 40x and 20x, fading at 10x, gone at 5x (a nucleus
  is ~3 pixels there). Its nuclei are also 40% larger and a little darker (nucleomegaly,
  hyperchromasia), a cue that survives at low magnification as slightly bigger, darker dots,
  partly masked by the regional variation of cellularity (0.7-1.3x): the kind of cue a
  low-magnification student must learn to see from the teacher.
* ``inflamed``: small, very dark lymphocyte nuclei scattered through the tissue and packed into
  wide aggregates: darker and bluer at every scale.

Slide ``i`` of a set gets class ``CLASSES[i % len(CLASSES)]`` (round robin), format
``formats[i % len(formats)]`` and base magnification ``base_mags[(i // len(formats)) % len(base_mags)]``
(so four slides cover both formats at both magnifications); slides ``i`` and ``i + len(CLASSES)``
(same class) share a patient, so a patient has at most two slides and one class.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharding.magnification import Magnification
from sharding.pyramid_writer import write_pyramid

CLASSES: tuple[str, ...] = ("benign", "glandular", "atypia", "inflamed")

#: The visual cue of each class and the scale it lives at.
CLASS_CUES: dict[str, str] = {
    "benign": "reference: fibrous stroma, scattered oval nuclei with smooth chromatin",
    "glandular": "architecture: large regular glands with white lumens (low magnification)",
    "atypia": "nuclear detail: clumped chromatin, nucleoli, irregular contour (high magnification); "
    "slightly enlarged nuclei (a faint darkening at low magnification)",
    "inflamed": "nuclear density and colour: dark lymphocyte aggregates (every magnification)",
}

LABELS_CSV = "labels.csv"
TRUTH_CSV = "truth.csv"
CSV_HEADER = ("slide", "label", "patient")

# Unit optical-density vectors (R, G, B) of the two stains, and the glass colour.
_H_OD = np.array([0.60, 0.74, 0.30], np.float32) / np.float32(np.linalg.norm([0.60, 0.74, 0.30]))
_E_OD = np.array([0.13, 0.87, 0.48], np.float32) / np.float32(np.linalg.norm([0.13, 0.87, 0.48]))
_GLASS = np.array([242.0, 240.0, 245.0], np.float32)
_NOISE_SIGMA = 2.5

# Stromal nuclei: one candidate per cell of a jittered grid (um), kept with probability _NUC_P.
_NUC_CELL = 11.0
_NUC_P = 0.6
_NUC_R = (2.6, 3.4)  # mean semi-axis range, um
_NUC_H = 1.35  # hematoxylin amount of a smooth nucleus
# Atypia: clumps/nucleoli add density, so the base is lower; nuclei are also enlarged by
# _ATYPIA_SCALE (more hematoxylin per area of tissue), a faint cue that survives downsampling.
_ATYPIA_H = 1.30
_ATYPIA_SCALE = 1.4
# Lymphocytes (inflamed).
_LYM_CELL = 5.0
_LYM_R = (2.2, 2.7)
_LYM_H = 2.0
# Glands (glandular): one candidate per cell of a jittered grid (um).
_GLAND_CELL = 140.0
# How far beyond a box glands still shape its nuclei: the widest nucleus reach into the box
# (2 x the largest atypical semi-axis) plus the 10% exclusion rim of the largest gland.
_GLAND_MARGIN = 16.0
# Vacuoles (all classes): one candidate per cell (um).
_VAC_CELL = 70.0
# Largest outward reach of the tissue edge noise, in units of an island's semi-axes.
_EDGE_GROW = 0.10


@dataclass(frozen=True)
class SynthSlide:
    """One written slide. ``slide`` is the file stem; ``labeled`` says whether labels.csv lists it."""

    path: Path
    slide: str
    label: str
    patient: str
    format: str
    base_mag: float
    mpp: float
    width: int
    height: int
    labeled: bool = True
    index: int = 0
    seed: int = 0
    size_um: tuple[float, float] = (0.0, 0.0)

    def scene(self) -> SlideScene:
        """The scene this slide was rendered from (islands in um, fields hashed from the seed)."""
        return make_scene(self.label, seed=self.seed, index=self.index, size_um=self.size_um)


@dataclass(frozen=True)
class Island:
    """A tissue island: an ellipse (semi-axes ``sx, sy`` um, centre ``cx, cy``) whose radius is
    modulated by harmonics: ``r(t) = 1 + sum_k amps[k] * cos((k + 2) * t + phases[k])`` (in units
    of the ellipse), plus hashed edge noise."""

    cx: float
    cy: float
    sx: float
    sy: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    @functools.cached_property
    def reach(self) -> float:
        """Largest outline radius, in units of the semi-axes: ``max_t r(t)`` + the edge noise."""
        t = np.linspace(0.0, 2 * np.pi, 721)
        r = 1.0 + sum(
            a * np.cos((k + 2) * t + p)
            for k, (a, p) in enumerate(zip(self.amps, self.phases, strict=True))
        )
        return float(np.max(r)) + _EDGE_GROW + 0.005

    def bbox(self) -> tuple[float, float, float, float]:
        grow = self.reach
        return (
            self.cx - self.sx * grow,
            self.cy - self.sy * grow,
            self.cx + self.sx * grow,
            self.cy + self.sy * grow,
        )


# --------------------------------------------------------------------------------------------
# Hashed noise: every random quantity is a pure function of (salt, integer lattice coordinates),
# so any tile can be rendered alone and tiles agree at their borders.


def _mix(*values: int) -> int:
    """A 32-bit hash of integers (splitmix-style), used to derive independent salts."""
    h = 0x9E3779B9
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFF)) * 0x85EBCA6B & 0xFFFFFFFF
        h ^= h >> 13
        h = h * 0xC2B2AE35 & 0xFFFFFFFF
        h ^= h >> 16
    return h


def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """uint32 hash of integer lattice coordinates (broadcasting; arithmetic wraps mod 2^32)."""
    with np.errstate(over="ignore"):
        h = np.asarray(ix).astype(np.int64).astype(np.uint32) * np.uint32(0x8DA6B343)
        h = h ^ (np.asarray(iy).astype(np.int64).astype(np.uint32) * np.uint32(0xD8163841))
        h = h ^ np.uint32(salt & 0xFFFFFFFF)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x2C1B3C6D)
        h = h ^ (h >> np.uint32(12))
        h = h * np.uint32(0x297A2D39)
        h = h ^ (h >> np.uint32(15))
    return h


def _uniform(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform float32 in [0, 1) hashed from lattice coordinates."""
    return (_hash(ix, iy, salt) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _noise_grid(xs: np.ndarray, ys: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] on the grid ``ys x xs`` (um), lattice spacing ``scale`` um.

    Separable evaluation: lattice values are hashed once for the few lattice points under the
    grid, then interpolated (smoothstep) along x and then along y.
    """
    gx, gy = xs / scale, ys / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    lx, ly = np.arange(ix.min(), ix.max() + 2), np.arange(iy.min(), iy.max() + 2)
    lattice = _uniform(lx[None, :], ly[:, None], salt)
    cx, cy = ix - lx[0], iy - ly[0]
    along_x = lattice[:, cx] * (1 - fx) + lattice[:, cx + 1] * fx
    return along_x[cy] * (1 - fy)[:, None] + along_x[cy + 1] * fy[:, None]


def _noise_pts(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] at points ``(x, y)`` (um); equal to :func:`_noise_grid` on a grid."""
    gx, gy = np.asarray(x) / scale, np.asarray(y) / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    v00, v10 = _uniform(ix, iy, salt), _uniform(ix + 1, iy, salt)
    v01, v11 = _uniform(ix, iy + 1, salt), _uniform(ix + 1, iy + 1, salt)
    return (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy


def _coarse_axis(v: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th sample of a 1-D axis, always including the last one."""
    coarse = v[::step]
    return coarse if (len(v) - 1) % step == 0 else np.append(coarse, v[-1])


def _lerp_weights(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index ``j`` and weight ``t`` so that ``f(dst) ~ f(src[j]) * (1 - t) + f(src[j + 1]) * t``."""
    if len(src) == 1:
        return np.zeros(len(dst), np.int64), np.zeros(len(dst), np.float32)
    j = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, len(src) - 2)
    t = np.clip((dst - src[j]) / (src[j + 1] - src[j]), 0.0, 1.0).astype(np.float32)
    return j, t


def _upsample(coarse: np.ndarray, xc: np.ndarray, yc: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Bilinear interpolation of ``coarse`` (on the grid ``yc x xc``) onto the grid ``y x x``."""
    if coarse.shape[1] == 1:
        along_x = np.repeat(coarse, len(x), axis=1)
    else:
        j, t = _lerp_weights(xc, x)
        along_x = coarse[:, j] * (1 - t) + coarse[:, j + 1] * t
    if coarse.shape[0] == 1:
        return np.repeat(along_x, len(y), axis=0)
    i, u = _lerp_weights(yc, y)
    return along_x[i] * (1 - u)[:, None] + along_x[i + 1] * u[:, None]


# --------------------------------------------------------------------------------------------
# The scene


@dataclass(frozen=True)
class SlideScene:
    """Everything needed to render one slide, in micrometres; ``render`` draws any rectangle."""

    label: str
    width_um: float
    height_um: float
    islands: tuple[Island, ...]
    salt: int
    stain: tuple[float, float] = (1.0, 1.0)  # per-slide (hematoxylin, eosin) strength
    fibre_angles: tuple[float, float] = (0.3, 1.9)

    def _s(self, k: int) -> int:
        return _mix(self.salt, k)

    # -- fields ---------------------------------------------------------------------------
    def edge_distance(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Signed distance to the tissue edge in um (positive inside), approximately.

        For island ``i``: ``(r_i(t) + edge(x, y) - d_i) * (sx_i + sy_i) / 2`` where ``d_i`` is
        the elliptical radius of the point, ``t`` its angle, ``r_i`` the harmonic outline and
        ``edge`` hashed noise at 150, 30 and 8 um; the maximum over islands (``-1e6`` far away).
        """
        noise = _noise_grid if grid else _noise_pts
        X, Y = (x[None, :], y[:, None]) if grid else (x, y)
        out = np.full(np.broadcast_shapes(np.shape(X), np.shape(Y)), -1e6, np.float32)
        x_lo, x_hi = float(np.min(x)), float(np.max(x))
        y_lo, y_hi = float(np.min(y)), float(np.max(y))
        near = []
        for isl in self.islands:
            bx0, by0, bx1, by1 = isl.bbox()
            if not (bx1 < x_lo or bx0 > x_hi or by1 < y_lo or by0 > y_hi):
                near.append(isl)
        if not near:
            return out
        edge = 0.10 * (noise(x, y, 150.0, self._s(4)) - 0.5)
        edge += 0.07 * (noise(x, y, 30.0, self._s(1)) - 0.5)
        edge += 0.03 * (noise(x, y, 8.0, self._s(2)) - 0.5)
        for isl in near:
            dx, dy = (X - isl.cx) / isl.sx, (Y - isl.cy) / isl.sy
            d = np.sqrt(dx * dx + dy * dy)
            t = np.arctan2(dy, dx)
            r = 1.0 + edge
            for k, (a, p) in enumerate(zip(isl.amps, isl.phases, strict=True)):
                r = r + a * np.cos((k + 2) * t + p)
            np.maximum(out, ((r - d) * (0.5 * (isl.sx + isl.sy))).astype(np.float32), out=out)
        return out

    def tissue(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Tissue coverage in [0, 1], ``clip(distance / pixel + 0.5)``: on the grid ``y x x`` or at points.

        At points the pixel is taken as 1 um. On a grid the pixel is the grid spacing and the
        (smooth) edge distance is evaluated every 8th sample and interpolated linearly;
        :meth:`tissue_tile` does the same with nodes fixed to the slide's raster.
        """
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.float32)
        if not grid:
            return np.clip(self.edge_distance(x, y, grid=False) + 0.5, 0.0, 1.0)
        px = float(abs(x[1] - x[0])) if len(x) > 1 else 1.0
        return self._tissue_on_nodes(x, y, _coarse_axis(x, 8), _coarse_axis(y, 8), px)

    def tissue_tile(self, x0: int, y0: int, w: int, h: int, mpp: float) -> np.ndarray:
        """Tissue coverage of the pixel rectangle ``(x0, y0, w, h)`` of the raster with ``mpp``.

        Interpolation nodes sit on raster pixels whose indices are multiples of 8, the same
        for every tile, so neighbouring tiles agree exactly along their borders.
        """

        def axis(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
            first, last = (start // 8) * 8, -(-(start + n - 1) // 8) * 8
            nodes = ((np.arange(first, last + 1, 8) + 0.5) * mpp).astype(np.float32)
            return ((start + np.arange(n) + 0.5) * mpp).astype(np.float32), nodes

        (x, xc), (y, yc) = axis(x0, w), axis(y0, h)
        return self._tissue_on_nodes(x, y, xc, yc, mpp)

    def _tissue_on_nodes(
        self, x: np.ndarray, y: np.ndarray, xc: np.ndarray, yc: np.ndarray, px: float
    ) -> np.ndarray:
        coarse = self.edge_distance(xc, yc, grid=True) / px + 0.5
        if coarse.max() <= 0.0:
            return np.zeros((len(y), len(x)), np.float32)
        if coarse.min() >= 1.0:
            return np.ones((len(y), len(x)), np.float32)
        full = _upsample(coarse, xc, yc, x, y)
        return np.clip(full, 0.0, 1.0).astype(np.float32)

    def vacuoles(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Round empty spaces (fat cells, small vessels) reaching the um box: rows ``(cx, cy, r)``.

        One candidate per ``_VAC_CELL`` cell, kept with probability 0.3, radius 5-14 um.
        """
        cell, reach = _VAC_CELL, 15.0
        ix = np.arange(math.floor((x0 - reach) / cell), math.floor((x1 + reach) / cell) + 1)
        iy = np.arange(math.floor((y0 - reach) / cell), math.floor((y1 + reach) / cell) + 1)
        IX, IY = np.meshgrid(ix, iy)
        u = [_uniform(IX.ravel(), IY.ravel(), self._s(200 + k)) for k in range(4)]
        cx = (IX.ravel() + 0.2 + 0.6 * u[1]) * cell
        cy = (IY.ravel() + 0.2 + 0.6 * u[2]) * cell
        r = 5.0 + 9.0 * u[3]
        keep = (u[0] < 0.3) & (cx + r > x0) & (cx - r < x1) & (cy + r > y0) & (cy - r < y1)
        return np.stack([cx, cy, r], axis=1)[keep]

    def holes(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Empty-space coverage in [0, 1] (vacuoles), on the grid ``y x x`` or at points."""
        x, y = np.asarray(x), np.asarray(y)
        vac = self.vacuoles(float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y)))
        if grid:
            out = np.zeros((len(y), len(x)), np.float32)
            px = float(x[1] - x[0]) if len(x) > 1 else 1.0
            for cx, cy, r in vac:
                j0, j1 = np.searchsorted(x, [cx - r - 2 * px, cx + r + 2 * px])
                i0, i1 = np.searchsorted(y, [cy - r - 2 * px, cy + r + 2 * px])
                if j1 > j0 and i1 > i0:
                    d = np.sqrt((x[None, j0:j1] - cx) ** 2 + (y[i0:i1, None] - cy) ** 2)
                    sub = out[i0:i1, j0:j1]
                    np.maximum(sub, np.clip((r - d) / px + 0.5, 0.0, 1.0), out=sub)
            return out
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape), np.float32)
        for cx, cy, r in vac:
            out = np.maximum(out, ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32))
        return out

    def glands(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Glands whose ellipse reaches the um box: rows ``(cx, cy, a, b, angle)``.

        One candidate per ``_GLAND_CELL`` cell; kept with probability 0.95 when its centre lies
        in tissue. Semi-axes ``a in [0.26, 0.34] * cell``, ``b = a * [0.8, 1]``: no two overlap,
        and any 128 um field inside the tissue holds a good part of at least one.
        """
        if self.label != "glandular":
            return np.zeros((0, 5), np.float32)
        g = _GLAND_CELL
        reach = 0.41 * g
        cx_i = np.arange(math.floor((x0 - reach) / g), math.floor((x1 + reach) / g) + 1)
        cy_i = np.arange(math.floor((y0 - reach) / g), math.floor((y1 + reach) / g) + 1)
        IX, IY = np.meshgrid(cx_i, cy_i)
        IX, IY = IX.ravel(), IY.ravel()
        u = [_uniform(IX, IY, self._s(100 + k)) for k in range(6)]
        cx = (IX + 0.5 + 0.12 * (u[1] - 0.5)) * g
        cy = (IY + 0.5 + 0.12 * (u[2] - 0.5)) * g
        a = (0.26 + 0.08 * u[3]) * g
        b = a * (0.8 + 0.2 * u[4])
        ang = u[5] * np.pi
        keep = (u[0] < 0.95) & (self.tissue(cx, cy, grid=False) > 0.5)
        keep &= (cx + a > x0) & (cx - a < x1) & (cy + a > y0) & (cy - a < y1)
        return np.stack([cx, cy, a, b, ang], axis=1)[keep].astype(np.float32)

    # -- nuclei ---------------------------------------------------------------------------
    def _grid_nuclei(
        self, x0: float, y0: float, x1: float, y1: float, cell: float, salt: int, margin: float
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Candidate centres on a jittered grid of ``cell`` um over the box, and 6 uniforms each."""
        ix = np.arange(math.floor((x0 - margin) / cell), math.floor((x1 + margin) / cell) + 1)
        iy = np.arange(math.floor((y0 - margin) / cell), math.floor((y1 + margin) / cell) + 1)
        IX, IY = np.meshgrid(ix, iy)
        IX, IY = IX.ravel(), IY.ravel()
        u = [_uniform(IX, IY, _mix(salt, k)) for k in range(8)]
        cx = (IX + 0.1 + 0.8 * u[1]) * cell
        cy = (IY + 0.1 + 0.8 * u[2]) * cell
        return cx, cy, [u[0], *u[3:]]

    def nuclei(self, x0: float, y0: float, x1: float, y1: float) -> list[dict[str, np.ndarray]]:
        """Nuclei that may touch the um box, in groups sharing a drawing style.

        Each group is a dict of arrays: ``cx, cy, a, b, ang, h, seed`` and a scalar-like
        ``style`` (0 smooth, 1 atypical). ``a, b`` are semi-axes in um, ``h`` the hematoxylin
        amount, ``seed`` a per-nucleus integer for its texture.
        """
        groups: list[dict[str, np.ndarray]] = []
        # Glands near the box too: a nucleus drawn into the box may sit just outside it, inside
        # a gland's exclusion zone (1.1 semi-axes) or on its ring; every tile must see the same.
        reach = _GLAND_MARGIN
        glands = self.glands(x0 - reach, y0 - reach, x1 + reach, y1 + reach)

        def outside_glands(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
            ok = np.ones(cx.shape, bool)
            for gx, gy, ga, gb, gt in glands:
                c, s = math.cos(gt), math.sin(gt)
                u = ((cx - gx) * c + (cy - gy) * s) / ga
                v = (-(cx - gx) * s + (cy - gy) * c) / gb
                ok &= u * u + v * v > 1.1**2
            return ok

        def in_tissue(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
            return (self.tissue(cx, cy, grid=False) > 0.5) & (self.holes(cx, cy, grid=False) < 0.5)

        # stromal / parenchymal nuclei: same grid, density and size in every class
        margin = 2 * _NUC_R[1]
        cx, cy, u = self._grid_nuclei(x0, y0, x1, y1, _NUC_CELL, self._s(10), margin)
        cellularity = 0.7 + 0.6 * _noise_pts(cx, cy, 220.0, self._s(12))
        keep = u[0] < _NUC_P * cellularity
        keep &= in_tissue(cx, cy) & outside_glands(cx, cy)
        atypia = self.label == "atypia"
        r = (_NUC_R[0] + (_NUC_R[1] - _NUC_R[0]) * u[1]) * (_ATYPIA_SCALE if atypia else 1.0)
        elong = 1.0 + 0.45 * u[2]
        groups.append(
            {
                "cx": cx[keep],
                "cy": cy[keep],
                "a": (r * np.sqrt(elong))[keep],
                "b": (r / np.sqrt(elong))[keep],
                "ang": (u[3] * np.pi)[keep],
                "h": ((_ATYPIA_H if atypia else _NUC_H) * (0.9 + 0.2 * u[4]))[keep],
                "seed": _hash(cx, cy, self._s(11))[keep],
                "style": np.array(1 if atypia else 0),
            }
        )
        if self.label == "inflamed":
            margin = 2 * _LYM_R[1]
            cx, cy, u = self._grid_nuclei(x0, y0, x1, y1, _LYM_CELL, self._s(20), margin)
            cluster = _noise_pts(cx, cy, 160.0, self._s(21))
            p = 0.20 + 0.75 * np.clip((cluster - 0.35) / 0.25, 0.0, 1.0)
            keep = (u[0] < p) & in_tissue(cx, cy) & outside_glands(cx, cy)
            r = _LYM_R[0] + (_LYM_R[1] - _LYM_R[0]) * u[1]
            groups.append(
                {
                    "cx": cx[keep],
                    "cy": cy[keep],
                    "a": (r * 1.05)[keep],
                    "b": (r / 1.05)[keep],
                    "ang": (u[3] * np.pi)[keep],
                    "h": (_LYM_H * (0.92 + 0.16 * u[4]))[keep],
                    "seed": _hash(cx, cy, self._s(22))[keep],
                    "style": np.array(0),
                }
            )
        if len(glands):
            rows = []
            for gx, gy, ga, gb, gt in glands:
                ring = 0.8
                perim = math.pi * (3 * (ga + gb) - math.sqrt((3 * ga + gb) * (ga + 3 * gb))) * ring
                n = max(8, int(perim / 6.5))
                gland_id = int(_hash(int(gx * 16), int(gy * 16), self._s(33)))
                jitter = _uniform(np.arange(n), gland_id, self._s(30))
                t = 2 * np.pi * (np.arange(n) + 0.3 * jitter) / n
                c, s = math.cos(gt), math.sin(gt)
                px, py = ring * ga * np.cos(t), ring * gb * np.sin(t)
                nx, ny = gb * np.cos(t), ga * np.sin(t)  # outward normal in the gland frame
                rows.append(
                    np.stack(
                        [
                            gx + px * c - py * s,
                            gy + px * s + py * c,
                            np.arctan2(nx * s + ny * c, nx * c - ny * s),
                        ],
                        axis=1,
                    )
                )
            ring_nuc = np.concatenate(rows).astype(np.float32)
            cx, cy, ang = ring_nuc[:, 0], ring_nuc[:, 1], ring_nuc[:, 2]
            keep = (self.tissue(cx, cy, grid=False) > 0.5) & (cx > x0 - 8) & (cx < x1 + 8)
            keep &= (cy > y0 - 8) & (cy < y1 + 8)
            u4 = _uniform(np.floor(cx * 8), np.floor(cy * 8), self._s(31))
            groups.append(
                {
                    "cx": cx[keep],
                    "cy": cy[keep],
                    "a": np.full(int(keep.sum()), 3.6, np.float32),
                    "b": np.full(int(keep.sum()), 1.9, np.float32),
                    "ang": ang[keep],
                    "h": (_NUC_H * (0.9 + 0.2 * u4))[keep],
                    "seed": _hash(cx, cy, self._s(32))[keep],
                    "style": np.array(0),
                }
            )
        return groups

    # -- drawing --------------------------------------------------------------------------
    def render(
        self,
        x0: int,
        y0: int,
        w: int,
        h: int,
        mpp: float,
        noise_seed: int = 0,
        sensor_noise: bool = True,
    ) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the pixel rectangle at ``x0, y0`` of a raster with ``mpp``.

        Pixel ``(i, j)`` samples the scene at ``((x0 + j + 0.5) * mpp, (y0 + i + 0.5) * mpp)`` um.
        The Gaussian sensor noise (``sensor_noise``) is a window of a fixed noise bank chosen by
        ``(salt, x0, y0, noise_seed)``, so equal arguments give equal pixels. Everything else is
        a function of scene coordinates: rendering a rectangle at once or tile by tile gives the
        same pixels (up to the linear interpolation of the tissue edge between 8-px nodes).
        """
        xs = ((x0 + np.arange(w) + 0.5) * mpp).astype(np.float32)
        ys = ((y0 + np.arange(h) + 0.5) * mpp).astype(np.float32)
        ux0, ux1, uy0, uy1 = xs[0], xs[-1], ys[0], ys[-1]
        noise = (
            _sensor_noise(self.salt, x0, y0, w, h, noise_seed)
            if sensor_noise
            else np.zeros((h, w, 3), np.float32)
        )
        tissue = self.tissue_tile(x0, y0, w, h, mpp)
        if not tissue.any():
            return np.clip(_GLASS + noise + 0.5, 0, 255).astype(np.uint8)

        # stroma: two families of thin wavy collagen fibres (the second one fainter), each bent
        # by its own smooth phase warp, whose mix drifts slowly over the tissue
        blend = np.clip((_noise_grid(xs, ys, 140.0, self._s(42)) - 0.4) / 0.2, 0.0, 1.0)
        fib = np.zeros((h, w), np.float32)
        for k, (theta, weight) in enumerate(
            zip(self.fibre_angles, (blend, 1.0 - blend), strict=True)
        ):
            warp = 14.0 * _noise_grid(xs, ys, 45.0, self._s(40 + 3 * k))
            warp += 2.5 * _noise_grid(xs, ys, 9.0, self._s(41 + 3 * k))
            proj = xs[None, :] * math.cos(theta) + ys[:, None] * math.sin(theta)
            band = (0.5 + 0.5 * np.sin((2 * np.pi / 5.0) * proj + warp)).astype(np.float32)
            fib += weight * band**3
        fib *= 0.55 + 0.9 * _noise_grid(xs, ys, 4.0, self._s(44))
        slow = 0.8 + 0.4 * _noise_grid(xs, ys, 90.0, self._s(43))
        e = 0.62 * (0.45 + 0.75 * fib) * slow
        hem = np.full((h, w), 0.10, np.float32)
        hole = self.holes(xs, ys, grid=True)
        e *= 1.0 - hole
        hem *= 1.0 - hole

        # glands: pale epithelial rim around a white lumen
        for gx, gy, ga, gb, gt in self.glands(ux0, uy0, ux1, uy1):
            j0, j1 = np.searchsorted(xs, [gx - ga - 2, gx + ga + 2])
            i0, i1 = np.searchsorted(ys, [gy - ga - 2, gy + ga + 2])
            if j1 <= j0 or i1 <= i0:
                continue
            c, s = math.cos(gt), math.sin(gt)
            dx, dy = xs[None, j0:j1] - gx, ys[i0:i1, None] - gy
            u = (dx * c + dy * s) / ga
            v = (-dx * s + dy * c) / gb
            rho = np.sqrt(u * u + v * v)
            scale_px = 0.5 * (ga + gb) / mpp
            inside = np.clip((1.0 - rho) * scale_px + 0.5, 0.0, 1.0).astype(np.float32)
            lumen = np.clip((0.6 - rho) * scale_px + 0.5, 0.0, 1.0).astype(np.float32)
            rim = inside - lumen
            sub_e, sub_h = e[i0:i1, j0:j1], hem[i0:i1, j0:j1]
            sub_e *= 1.0 - inside
            sub_h *= 1.0 - inside
            sub_e += 0.30 * rim + 0.05 * lumen
            sub_h += 0.20 * rim + 0.02 * lumen

        alpha = np.zeros(h * w, np.float32)
        nuc_h = np.zeros(h * w, np.float32)
        textures: dict[int, np.ndarray] = {}
        for group in self.nuclei(ux0, uy0, ux1, uy1):
            style = int(group["style"])
            if style not in textures:  # chromatin: fine and faint (0), clumped (1); mean 1
                scale, amp = (0.8, 1.1) if style else (1.2, 0.12)
                field = _noise_grid(xs, ys, scale, self._s(50 + style))
                textures[style] = (1.0 + amp * (field - 0.5)).ravel()
            _stamp_nuclei(group, x0, y0, w, h, mpp, alpha, nuc_h, textures[style])
        alpha = alpha.reshape(h, w)
        nuc_h = nuc_h.reshape(h, w)

        hs, es = self.stain
        hem = tissue * (hem * (1.0 - alpha) + nuc_h) * hs
        e = tissue * e * (1.0 - 0.75 * alpha) * es
        out = np.empty((h, w, 3), np.uint8)
        for c in range(3):  # RGB_c = glass_c * exp(-(h * H_c + e * E_c)) + noise_c
            chan = hem * _H_OD[c]
            chan += e * _E_OD[c]
            np.exp(-chan, out=chan)
            chan *= _GLASS[c]
            chan += noise[..., c]
            chan += 0.5
            np.clip(chan, 0, 255, out=chan)
            out[..., c] = chan
        return out


_NOISE_BANK = 1024


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed ``(1024, 1024, 3)`` bank of N(0, sigma^2) sensor noise (float32, 12 MB)."""
    rng = np.random.default_rng(0x5E45)
    return rng.standard_normal((_NOISE_BANK, _NOISE_BANK, 3), dtype=np.float32) * np.float32(
        _NOISE_SIGMA
    )


def _sensor_noise(salt: int, x0: int, y0: int, w: int, h: int, extra: int) -> np.ndarray:
    """Gaussian noise for one rectangle: a window of the bank at a hashed offset (wraps if large)."""
    bank = _noise_bank()
    key = _mix(salt, x0, y0, extra)
    oy, ox = key % (_NOISE_BANK // 2), (key >> 12) % (_NOISE_BANK // 2)
    if h + oy <= _NOISE_BANK and w + ox <= _NOISE_BANK:
        return bank[oy : oy + h, ox : ox + w]
    return np.take(np.take(bank, np.arange(oy, oy + h) % _NOISE_BANK, axis=0),
                   np.arange(ox, ox + w) % _NOISE_BANK, axis=1)  # fmt: skip


def _stamp_nuclei(
    g: dict[str, np.ndarray],
    x0: int,
    y0: int,
    w: int,
    h: int,
    mpp: float,
    alpha: np.ndarray,
    nuc_h: np.ndarray,
    texture: np.ndarray,
) -> None:
    """Draw one group of nuclei into the flat ``alpha`` (coverage) and ``nuc_h`` (hematoxylin).

    Each nucleus is an ellipse ``(u / a)^2 + (v / b)^2 <= 1`` in its rotated frame with a ~1 px
    soft edge, drawn in a square window around its centre; overlaps take the maximum.
    ``nuc_h = coverage * h * texture`` where ``texture`` (flat, per pixel of the tile) is the
    chromatin field of the group's style. Style 1 (atypia) also bends the contour with
    harmonics 3 and 4 (area kept), darkens the membrane, and adds one or two nucleoli
    (0.5-0.7 um discs).
    """
    n = len(g["cx"])
    if n == 0:
        return
    style = int(g["style"])
    reach = float(np.max(g["a"])) * (1.2 if style else 1.0) + mpp
    win = int(math.ceil(2 * reach / mpp)) + 2
    cx, cy = g["cx"].astype(np.float64), g["cy"].astype(np.float64)
    px0 = np.floor(cx / mpp - x0 - win / 2).astype(np.int64)
    py0 = np.floor(cy / mpp - y0 - win / 2).astype(np.int64)
    off = np.arange(win)
    cols = px0[:, None, None] + off[None, None, :]  # (n, 1, win)
    rows = py0[:, None, None] + off[None, :, None]  # (n, win, 1)
    X = ((x0 + cols + 0.5) * mpp - cx[:, None, None]).astype(np.float32)
    Y = ((y0 + rows + 0.5) * mpp - cy[:, None, None]).astype(np.float32)
    c = np.cos(g["ang"]).astype(np.float32)[:, None, None]
    s = np.sin(g["ang"]).astype(np.float32)[:, None, None]
    a = g["a"].astype(np.float32)[:, None, None]
    b = g["b"].astype(np.float32)[:, None, None]
    U = (X * c + Y * s) / a
    V = (-X * s + Y * c) / b
    rho = np.sqrt(U * U + V * V)
    seed = g["seed"]
    if style:
        p1 = (seed & 0xFFFF).astype(np.float32)[:, None, None] * np.float32(2 * np.pi / 65536)
        p2 = (seed >> 16).astype(np.float32)[:, None, None] * np.float32(2 * np.pi / 65536)
        phi = np.arctan2(V, U)
        bend = 1.0 + 0.12 * np.cos(3 * phi + p1) + 0.06 * np.cos(4 * phi + p2)
        rho = rho * np.float32(math.sqrt(1 + (0.12**2 + 0.06**2) / 2)) / bend
    cover = np.clip((1.0 - rho) * (b / mpp) + 0.5, 0.0, 1.0)
    inside = (cover > 0) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    flat = (rows * w + cols)[inside]
    which = np.broadcast_to(np.arange(n)[:, None, None], inside.shape)[inside]
    cov = cover[inside]
    tex = texture[flat]
    if style:
        rho_i, u_i, v_i = rho[inside], U[inside] * a[which, 0, 0], V[inside] * b[which, 0, 0]
        tex = tex + 0.35 * np.clip((rho_i - 0.75) / 0.2, 0.0, 1.0)
        for k in range(2):
            sk = _hash(seed, k, 0x0C1E).astype(np.float32) * np.float32(2.0**-32)
            present = np.ones(n, bool) if k == 0 else sk < 0.5
            ang = sk * np.float32(6.283 * 7)
            ck = 0.35 * g["a"] * np.cos(ang)
            sk_y = 0.35 * g["b"] * np.sin(ang)
            rk = 0.5 + 0.2 * (sk * 3 % 1)
            dist = np.sqrt((u_i - ck[which]) ** 2 + (v_i - sk_y[which]) ** 2)
            dot = np.clip((rk[which] - dist) / mpp + 0.5, 0.0, 1.0) * present[which]
            tex = tex + 1.1 * dot
    value = cov * g["h"][which] * tex
    np.maximum.at(alpha, flat, cov.astype(np.float32))
    np.maximum.at(nuc_h, flat, value.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Scenes and slide sets


def make_scene(label: str, *, seed: int, index: int, size_um: tuple[float, float]) -> SlideScene:
    """The scene of slide ``index`` of a set made with ``seed``: 1-3 islands filling ~half the glass.

    Islands sit in equal cells along the longer side; each is an ellipse of ~0.8 of its cell's
    half-size with random low harmonics, kept >= 3% of the short side away from the slide edge.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}: use one of {CLASSES}")
    width_um, height_um = float(size_um[0]), float(size_um[1])
    if width_um <= 0 or height_um <= 0:
        raise ValueError(f"size_um must be positive, got {size_um!r}")
    rng = np.random.default_rng([seed, index, 0x15])
    horizontal = width_um >= height_um
    long_side, short_side = (width_um, height_um) if horizontal else (height_um, width_um)
    k = int(np.clip(round(long_side / short_side * rng.uniform(0.7, 1.6)), 1, 3))
    cell_long = long_side / k
    margin = 0.03 * short_side
    islands = []
    for i in range(k):
        amps = tuple(
            float(v) for v in rng.uniform(-1, 1, 5) * np.array([0.14, 0.09, 0.06, 0.04, 0.03])
        )
        phases = tuple(float(v) for v in rng.uniform(0, 2 * np.pi, 5))
        grow = Island(0, 0, 1, 1, amps, phases).reach
        half_long = (cell_long / 2 - margin) / grow
        half_short = (short_side / 2 - margin) / grow
        c_long = (i + 0.5) * cell_long + rng.uniform(-0.02, 0.02) * cell_long
        c_short = short_side / 2 + rng.uniform(-0.02, 0.02) * short_side
        s_long = half_long * rng.uniform(0.95, 1.0) - abs(c_long - (i + 0.5) * cell_long) / grow
        s_short = half_short * rng.uniform(0.95, 1.0) - abs(c_short - short_side / 2) / grow
        if horizontal:
            islands.append(Island(c_long, c_short, s_long, s_short, amps, phases))
        else:
            islands.append(Island(c_short, c_long, s_short, s_long, amps, phases))
    return SlideScene(
        label=label,
        width_um=width_um,
        height_um=height_um,
        islands=tuple(islands),
        salt=_mix(seed, index, 0xA11CE),
        stain=(float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.93, 1.07))),
        fibre_angles=(float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi))),
    )


def slide_plan(
    n_slides: int,
    seed: int = 0,
    *,
    formats: Sequence[str] = ("svs", "tiff"),
    base_mags: Sequence[float] = (40, 20),
    labeled_fraction: float = 1.0,
    prefix: str = "synth",
    slides_per_patient: int = 2,
) -> list[dict[str, object]]:
    """Name, class, patient, format, base magnification and labelled flag of each slide.

    Slide ``i``: class ``CLASSES[i % C]``; patient ``P{(i // (S * C)) * C + i % C:03d}`` with
    ``S = slides_per_patient`` (with S = 2, slides ``i`` and ``i + C`` share one); format ``formats[i % F]``; base magnification
    ``base_mags[(i // F) % M]``. The labelled slides are the first ``round(f * n)`` (at least
    one when ``f > 0``), which cycle through the classes, so every class is labelled as soon as
    ``round(f * n) >= C``.
    """
    if n_slides < 0:
        raise ValueError(f"n_slides must be >= 0, got {n_slides}")
    if not 0.0 <= labeled_fraction <= 1.0:
        raise ValueError(f"labeled_fraction must be in [0, 1], got {labeled_fraction}")
    if not formats or not base_mags:
        raise ValueError("formats and base_mags must not be empty")
    if slides_per_patient < 1:
        raise ValueError(f"slides_per_patient must be >= 1, got {slides_per_patient}")
    c, f = len(CLASSES), len(formats)
    n_lab = round(labeled_fraction * n_slides)
    if labeled_fraction > 0 and n_slides:
        n_lab = max(1, n_lab)
    plan = []
    for i in range(n_slides):
        plan.append(
            {
                "index": i,
                "slide": f"{prefix}_{seed}_{i:03d}",
                "label": CLASSES[i % c],
                "patient": f"P{(i // (slides_per_patient * c)) * c + i % c:03d}",
                "format": formats[i % f],
                "base_mag": float(base_mags[(i // f) % len(base_mags)]),
                "labeled": i < n_lab,
            }
        )
    return plan


def write_slide(
    path: str | Path,
    scene: SlideScene,
    *,
    fmt: str,
    base_mag: float,
    tile: int = 256,
    factor: int = 4,
    min_level_px: int = 1000,
    quality: int = 80,
) -> tuple[int, int]:
    """Render ``scene`` at ``base_mag`` (``mpp = 10 / base_mag``) into ``path``; return (w, h) px."""
    mpp = Magnification(float(base_mag)).mpp
    width = int(round(scene.width_um / mpp))
    height = int(round(scene.height_um / mpp))

    def read_tile(x: int, y: int, w: int, h: int) -> np.ndarray:
        return scene.render(x, y, w, h, mpp)

    write_pyramid(
        path,
        width,
        height,
        read_tile,
        mpp=mpp,
        fmt=fmt,
        app_mag=float(base_mag),
        tile=tile,
        factor=factor,
        min_level_px=min_level_px,
        quality=quality,
    )
    return width, height


def write_synthetic_slides(
    out_dir: str | Path,
    n_slides: int,
    seed: int = 0,
    *,
    size_um: tuple[float, float] = (4000.0, 3000.0),
    labeled_fraction: float = 1.0,
    formats: Sequence[str] = ("svs", "tiff"),
    base_mags: Sequence[float] = (40, 20),
    tile: int = 256,
    factor: int = 4,
    min_level_px: int = 1000,
    quality: int = 80,
    prefix: str = "synth",
    progress: Callable[[SynthSlide], None] | None = None,
    workers: int = 1,
    slides_per_patient: int = 2,
) -> list[SynthSlide]:
    """Write ``n_slides`` synthetic slides plus ``labels.csv`` and ``truth.csv`` into ``out_dir``.

    Files are ``<prefix>_<seed>_<iii>.<format>``. ``labels.csv`` (``slide,label,patient``) lists
    the labelled slides only; ``truth.csv`` (same columns) lists every slide with its true class.
    Same arguments give identical pixels. ``progress`` is called after each slide is written;
    ``workers > 1`` writes slides in that many processes (same files, in the same order).
    See :func:`slide_plan` for the assignment of classes, patients, formats and magnifications.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        if fmt not in ("svs", "tiff"):
            raise ValueError(f"unknown slide format {fmt!r}: use 'svs' or 'tiff'")
    plan = slide_plan(
        n_slides, seed, formats=formats, base_mags=base_mags,
        labeled_fraction=labeled_fraction, prefix=prefix, slides_per_patient=slides_per_patient,
    )  # fmt: skip
    common = {"out": out, "seed": seed, "size_um": size_um, "tile": tile, "factor": factor,
              "min_level_px": min_level_px, "quality": quality}  # fmt: skip
    slides: list[SynthSlide] = []
    if workers > 1 and len(plan) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork would copy the parent's threads (Ray, torch); spawn starts clean.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(plan)), mp_context=ctx) as pool:
            for slide in pool.map(_write_one, plan, [common] * len(plan)):
                slides.append(slide)
                if progress is not None:
                    progress(slide)
    else:
        for entry in plan:
            slide = _write_one(entry, common)
            slides.append(slide)
            if progress is not None:
                progress(slide)
    _write_csv(out / LABELS_CSV, [s for s in slides if s.labeled])
    _write_csv(out / TRUTH_CSV, slides)
    return slides


def _write_one(entry: dict, common: dict) -> SynthSlide:
    """Render and write one slide of a :func:`slide_plan` (a process-pool task)."""
    label, fmt, mag = str(entry["label"]), str(entry["format"]), float(entry["base_mag"])
    scene = make_scene(
        label, seed=common["seed"], index=int(entry["index"]), size_um=common["size_um"]
    )
    path = common["out"] / f"{entry['slide']}.{fmt}"
    width, height = write_slide(
        path, scene, fmt=fmt, base_mag=mag, tile=common["tile"], factor=common["factor"],
        min_level_px=common["min_level_px"], quality=common["quality"],
    )  # fmt: skip
    return SynthSlide(
        path=path,
        slide=str(entry["slide"]),
        label=label,
        patient=str(entry["patient"]),
        format=fmt,
        base_mag=mag,
        mpp=Magnification(mag).mpp,
        width=width,
        height=height,
        labeled=bool(entry["labeled"]),
        index=int(entry["index"]),
        seed=common["seed"],
        size_um=common["size_um"],
    )


def _write_csv(path: Path, slides: Sequence[SynthSlide]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for s in slides:
            writer.writerow((s.slide, s.label, s.patient))
    tmp.replace(path)
