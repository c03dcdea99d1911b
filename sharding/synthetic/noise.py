"""Hashed noise: every random quantity of a synthetic slide is a pure function of (salt, integer
lattice coordinates), so any tile can be rendered alone and neighbouring tiles agree at their
borders.

Also the linear interpolation that evaluates smooth fields on a coarse grid, and the Gaussian
sensor noise, a window of one fixed bank chosen by a hash of the rectangle.
"""

from __future__ import annotations

import functools

import numpy as np

#: Standard deviation of the Gaussian sensor noise, in 8-bit RGB levels.
SENSOR_SIGMA = 2.5
_NOISE_BANK = 1024


def mix(*values: int) -> int:
    """A 32-bit hash of integers (splitmix-style), used to derive independent salts."""
    h = 0x9E3779B9
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFF)) * 0x85EBCA6B & 0xFFFFFFFF
        h ^= h >> 13
        h = h * 0xC2B2AE35 & 0xFFFFFFFF
        h ^= h >> 16
    return h


def lattice_hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
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


def uniform(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform float32 in [0, 1) hashed from lattice coordinates."""
    return (lattice_hash(ix, iy, salt) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def noise_grid(xs: np.ndarray, ys: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] on the grid ``ys x xs`` (um), lattice spacing ``scale`` um.

    Separable evaluation: lattice values are hashed once for the few lattice points under the
    grid, then interpolated (smoothstep) along x and then along y.
    """
    gx, gy = xs / scale, ys / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    lx, ly = np.arange(ix.min(), ix.max() + 2), np.arange(iy.min(), iy.max() + 2)
    lattice = uniform(lx[None, :], ly[:, None], salt)
    cx, cy = ix - lx[0], iy - ly[0]
    along_x = lattice[:, cx] * (1 - fx) + lattice[:, cx + 1] * fx
    return along_x[cy] * (1 - fy)[:, None] + along_x[cy + 1] * fy[:, None]


def noise_points(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1] at points ``(x, y)`` (um); equal to :func:`noise_grid` on a grid."""
    gx, gy = np.asarray(x) / scale, np.asarray(y) / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = _smooth((gx - ix).astype(np.float32)), _smooth((gy - iy).astype(np.float32))
    v00, v10 = uniform(ix, iy, salt), uniform(ix + 1, iy, salt)
    v01, v11 = uniform(ix, iy + 1, salt), uniform(ix + 1, iy + 1, salt)
    return (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy


def coarse_axis(v: np.ndarray, step: int) -> np.ndarray:
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


def upsample(
    coarse: np.ndarray, xc: np.ndarray, yc: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
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


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed ``(1024, 1024, 3)`` bank of N(0, sigma^2) sensor noise (float32, 12 MB)."""
    rng = np.random.default_rng(0x5E45)
    return rng.standard_normal((_NOISE_BANK, _NOISE_BANK, 3), dtype=np.float32) * np.float32(
        SENSOR_SIGMA
    )


def sensor_noise_window(salt: int, x0: int, y0: int, w: int, h: int, extra: int) -> np.ndarray:
    """Gaussian noise for one rectangle: a window of the bank at a hashed offset (wraps if large)."""
    bank = _noise_bank()
    key = mix(salt, x0, y0, extra)
    oy, ox = key % (_NOISE_BANK // 2), (key >> 12) % (_NOISE_BANK // 2)
    if h + oy <= _NOISE_BANK and w + ox <= _NOISE_BANK:
        return bank[oy : oy + h, ox : ox + w]
    return np.take(np.take(bank, np.arange(oy, oy + h) % _NOISE_BANK, axis=0),
                   np.arange(ox, ox + w) % _NOISE_BANK, axis=1)  # fmt: skip
