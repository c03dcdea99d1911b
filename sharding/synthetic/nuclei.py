"""Nuclei of a synthetic slide: where they are (hashed from the layout) and how one is drawn.

Placement (:func:`place_nuclei`) is a pure function of scene coordinates, so every tile that a
nucleus reaches places it identically. Drawing (:func:`stamp_nuclei`) turns a group of nuclei
into coverage and hematoxylin per pixel of one tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sharding.synthetic.layout import TissueLayout
from sharding.synthetic.noise import lattice_hash, mix, noise_points, uniform

# Stromal nuclei: one candidate per cell of a jittered grid (um), kept with probability _NUC_P.
_NUC_CELL = 11.0
_NUC_P = 0.6
_NUC_R = (2.6, 3.4)  # mean semi-axis range, um
_NUC_H = 1.35  # hematoxylin amount of a smooth nucleus
# Lymphocytes (inflamed).
_LYM_CELL = 5.0
_LYM_R = (2.2, 2.7)
_LYM_H = 2.0
# How far beyond a box glands still shape its nuclei: the widest nucleus reach into the box
# (2 x the largest atypical semi-axis) plus the 10% exclusion rim of the largest gland.
_GLAND_MARGIN = 16.0


@dataclass(frozen=True)
class NuclearCues:
    """How atypical nuclei differ from benign ones beyond their chromatin, contour and nucleoli.

    ``atypia_scale`` multiplies the semi-axes (nucleomegaly) and ``atypia_h`` is the base
    hematoxylin amount (hyperchromasia; benign nuclei have 1.35, and clumps, membrane and
    nucleoli add density on top of the base). Both leave more hematoxylin per area of tissue,
    the only part of the atypia cue that survives downsampling. The defaults are the
    ``default`` cohort's; ``atypia_scale`` must stay within [1, 1.4] (:data:`_GLAND_MARGIN`).
    """

    atypia_scale: float = 1.4
    atypia_h: float = 1.30

    def __post_init__(self) -> None:
        if not 1.0 <= self.atypia_scale <= 1.4:
            raise ValueError(f"atypia_scale must be within [1, 1.4], got {self.atypia_scale}")
        if self.atypia_h <= 0:
            raise ValueError(f"atypia_h must be positive, got {self.atypia_h}")


def _grid_nuclei(
    x0: float, y0: float, x1: float, y1: float, cell: float, salt: int, margin: float
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Candidate centres on a jittered grid of ``cell`` um over the box, and 6 uniforms each."""
    ix = np.arange(math.floor((x0 - margin) / cell), math.floor((x1 + margin) / cell) + 1)
    iy = np.arange(math.floor((y0 - margin) / cell), math.floor((y1 + margin) / cell) + 1)
    IX, IY = np.meshgrid(ix, iy)
    IX, IY = IX.ravel(), IY.ravel()
    u = [uniform(IX, IY, mix(salt, k)) for k in range(8)]
    cx = (IX + 0.1 + 0.8 * u[1]) * cell
    cy = (IY + 0.1 + 0.8 * u[2]) * cell
    return cx, cy, [u[0], *u[3:]]


def place_nuclei(
    layout: TissueLayout,
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    cues: NuclearCues = NuclearCues(),
) -> list[dict[str, np.ndarray]]:
    """Nuclei that may touch the um box, in groups sharing a drawing style; ``cues`` sets the
    size and hematoxylin of atypical nuclei.

    Each group is a dict of arrays: ``cx, cy, a, b, ang, h, seed`` and a scalar-like
    ``style`` (0 smooth, 1 atypical). ``a, b`` are semi-axes in um, ``h`` the hematoxylin
    amount, ``seed`` a per-nucleus integer for its texture.
    """
    groups: list[dict[str, np.ndarray]] = []
    # Glands near the box too: a nucleus drawn into the box may sit just outside it, inside
    # a gland's exclusion zone (1.1 semi-axes) or on its ring; every tile must see the same.
    reach = _GLAND_MARGIN
    glands = layout.glands(x0 - reach, y0 - reach, x1 + reach, y1 + reach)

    def outside_glands(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        ok = np.ones(cx.shape, bool)
        for gx, gy, ga, gb, gt in glands:
            c, s = math.cos(gt), math.sin(gt)
            u = ((cx - gx) * c + (cy - gy) * s) / ga
            v = (-(cx - gx) * s + (cy - gy) * c) / gb
            ok &= u * u + v * v > 1.1**2
        return ok

    def in_tissue(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        return (layout.tissue(cx, cy, grid=False) > 0.5) & (layout.holes(cx, cy, grid=False) < 0.5)

    # stromal / parenchymal nuclei: same grid, density and size in every class
    margin = 2 * _NUC_R[1]
    cx, cy, u = _grid_nuclei(x0, y0, x1, y1, _NUC_CELL, layout.field_salt(10), margin)
    cellularity = 0.7 + 0.6 * noise_points(cx, cy, 220.0, layout.field_salt(12))
    keep = u[0] < _NUC_P * cellularity
    keep &= in_tissue(cx, cy) & outside_glands(cx, cy)
    atypia = layout.label == "atypia"
    r = (_NUC_R[0] + (_NUC_R[1] - _NUC_R[0]) * u[1]) * (cues.atypia_scale if atypia else 1.0)
    elong = 1.0 + 0.45 * u[2]
    groups.append(
        {
            "cx": cx[keep],
            "cy": cy[keep],
            "a": (r * np.sqrt(elong))[keep],
            "b": (r / np.sqrt(elong))[keep],
            "ang": (u[3] * np.pi)[keep],
            "h": ((cues.atypia_h if atypia else _NUC_H) * (0.9 + 0.2 * u[4]))[keep],
            "seed": lattice_hash(cx, cy, layout.field_salt(11))[keep],
            "style": np.array(1 if atypia else 0),
        }
    )
    if layout.label == "inflamed":
        margin = 2 * _LYM_R[1]
        cx, cy, u = _grid_nuclei(x0, y0, x1, y1, _LYM_CELL, layout.field_salt(20), margin)
        cluster = noise_points(cx, cy, 160.0, layout.field_salt(21))
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
                "seed": lattice_hash(cx, cy, layout.field_salt(22))[keep],
                "style": np.array(0),
            }
        )
    if len(glands):
        rows = []
        for gx, gy, ga, gb, gt in glands:
            ring = 0.8
            perim = math.pi * (3 * (ga + gb) - math.sqrt((3 * ga + gb) * (ga + 3 * gb))) * ring
            n = max(8, int(perim / 6.5))
            gland_id = int(lattice_hash(int(gx * 16), int(gy * 16), layout.field_salt(33)))
            jitter = uniform(np.arange(n), gland_id, layout.field_salt(30))
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
        keep = (layout.tissue(cx, cy, grid=False) > 0.5) & (cx > x0 - 8) & (cx < x1 + 8)
        keep &= (cy > y0 - 8) & (cy < y1 + 8)
        u4 = uniform(np.floor(cx * 8), np.floor(cy * 8), layout.field_salt(31))
        groups.append(
            {
                "cx": cx[keep],
                "cy": cy[keep],
                "a": np.full(int(keep.sum()), 3.6, np.float32),
                "b": np.full(int(keep.sum()), 1.9, np.float32),
                "ang": ang[keep],
                "h": (_NUC_H * (0.9 + 0.2 * u4))[keep],
                "seed": lattice_hash(cx, cy, layout.field_salt(32))[keep],
                "style": np.array(0),
            }
        )
    return groups


def stamp_nuclei(
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
            sk = lattice_hash(seed, k, 0x0C1E).astype(np.float32) * np.float32(2.0**-32)
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
