"""Where a synthetic slide's tissue is: islands on glass, vacuoles (empty spaces) and glands.

This is the scene's ground truth in micrometres, independent of how it is stained or drawn:
coverage fields (tissue, holes) evaluated on a pixel grid or at points, and the hashed glands
and vacuoles that reach a box. Every quantity is a pure function of scene coordinates and the
scene's salt (:mod:`sharding.synthetic.noise`), so any tile can be computed alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from sharding.synthetic.noise import coarse_axis, mix, noise_grid, noise_points, uniform, upsample

# Glands (glandular): one candidate per cell of a jittered grid (um).
_GLAND_CELL = 140.0
# Vacuoles (all classes): one candidate per cell (um).
_VAC_CELL = 70.0
# Largest outward reach of the tissue edge noise, in units of an island's semi-axes.
_EDGE_GROW = 0.10


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


@dataclass(frozen=True)
class TissueLayout:
    """The geometry of one slide in micrometres: tissue islands on a ``width_um x height_um``
    glass, and the vacuoles and (class ``glandular``) glands inside them, hashed from ``salt``."""

    label: str
    width_um: float
    height_um: float
    islands: tuple[Island, ...]
    salt: int

    def field_salt(self, k: int) -> int:
        """The salt of the scene's ``k``-th independent field."""
        return mix(self.salt, k)

    # -- fields ---------------------------------------------------------------------------
    def edge_distance(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Signed distance to the tissue edge in um (positive inside), approximately.

        For island ``i``: ``(r_i(t) + edge(x, y) - d_i) * (sx_i + sy_i) / 2`` where ``d_i`` is
        the elliptical radius of the point, ``t`` its angle, ``r_i`` the harmonic outline and
        ``edge`` hashed noise at 150, 30 and 8 um; the maximum over islands (``-1e6`` far away).
        """
        noise = noise_grid if grid else noise_points
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
        edge = 0.10 * (noise(x, y, 150.0, self.field_salt(4)) - 0.5)
        edge += 0.07 * (noise(x, y, 30.0, self.field_salt(1)) - 0.5)
        edge += 0.03 * (noise(x, y, 8.0, self.field_salt(2)) - 0.5)
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
        return self._tissue_on_nodes(x, y, coarse_axis(x, 8), coarse_axis(y, 8), px)

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
        full = upsample(coarse, xc, yc, x, y)
        return np.clip(full, 0.0, 1.0).astype(np.float32)

    def vacuoles(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Round empty spaces (fat cells, small vessels) reaching the um box: rows ``(cx, cy, r)``.

        One candidate per ``_VAC_CELL`` cell, kept with probability 0.3, radius 5-14 um.
        """
        cell, reach = _VAC_CELL, 15.0
        ix = np.arange(math.floor((x0 - reach) / cell), math.floor((x1 + reach) / cell) + 1)
        iy = np.arange(math.floor((y0 - reach) / cell), math.floor((y1 + reach) / cell) + 1)
        IX, IY = np.meshgrid(ix, iy)
        u = [uniform(IX.ravel(), IY.ravel(), self.field_salt(200 + k)) for k in range(4)]
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
        u = [uniform(IX, IY, self.field_salt(100 + k)) for k in range(6)]
        cx = (IX + 0.5 + 0.12 * (u[1] - 0.5)) * g
        cy = (IY + 0.5 + 0.12 * (u[2] - 0.5)) * g
        a = (0.26 + 0.08 * u[3]) * g
        b = a * (0.8 + 0.2 * u[4])
        ang = u[5] * np.pi
        keep = (u[0] < 0.95) & (self.tissue(cx, cy, grid=False) > 0.5)
        keep &= (cx + a > x0) & (cx - a < x1) & (cy + a > y0) & (cy - a < y1)
        return np.stack([cx, cy, a, b, ang], axis=1)[keep].astype(np.float32)
