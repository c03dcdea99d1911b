"""Painting per-tile values onto a picture of a whole slide, with numpy (no drawing library).

A picture of ``(h, w)`` pixels shows a slide of ``slide_size = (width, height)`` level-0 pixels,
so one picture pixel is ``sx = width / w`` by ``sy = height / h`` level-0 pixels. Tile ``i``, the
level-0 square at ``(xs[i], ys[i])`` of side ``size0``, covers picture columns
``round(x / sx) .. round((x + size0) / sx)`` (end excluded) and rows
``round(y / sy) .. round((y + size0) / sy)``, at least one pixel each way: adjacent tiles share
their edges, with no gap and no overlap. Where tiles overlap anyway the later one wins.

Painting is two steps: :func:`owner_map` (which tile each pixel shows, one slice assignment per
tile) and :func:`blend` (every painted pixel at once), so a slide's thousands of tiles cost a few
milliseconds, and every picture of one slide shares one owner map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLEND_ROWS", "blend", "edge_mask", "hatch_mask", "owner_map", "tile_boxes"]

#: Picture rows blended at once: their float32 temporaries fit a core's cache (a third faster
#: than the whole picture at once on 1600 px pictures).
BLEND_ROWS = 16


def tile_boxes(
    shape: tuple[int, ...],
    slide_size: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    size0: int,
) -> np.ndarray:
    """``(n, 4)`` int ``x0, x1, y0, y1`` of each tile on a picture of ``shape[:2] = (h, w)``."""
    h, w = shape[:2]
    sx, sy = slide_size[0] / w, slide_size[1] / h
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    x0, x1 = np.round(xs / sx), np.round((xs + size0) / sx)
    y0, y1 = np.round(ys / sy), np.round((ys + size0) / sy)
    boxes = np.stack([x0, np.maximum(x1, x0 + 1), y0, np.maximum(y1, y0 + 1)], axis=1)
    return boxes.astype(np.int64).reshape(-1, 4)


def owner_map(shape: tuple[int, ...], boxes: np.ndarray) -> np.ndarray:
    """``(h, w)`` int32: the index of the tile each pixel shows, -1 where none (later tiles win)."""
    owner = np.full(shape[:2], -1, dtype=np.int32)
    for i, (x0, x1, y0, y1) in enumerate(boxes.tolist()):
        owner[max(y0, 0) : y1, max(x0, 0) : x1] = i
    return owner


def blend(
    background: np.ndarray,
    owner: np.ndarray,
    colours: np.ndarray,
    alpha: float | np.ndarray,
) -> np.ndarray:
    """``background`` (``(h, w, 3)`` uint8) with tile ``i``'s pixels made
    ``(1 - a_i) * background + a_i * colours[i]`` (``colours`` ``(n, 3)`` in 0..255, ``a_i`` the
    scalar ``alpha`` or ``alpha[i]``), rounded to uint8; pixels of no tile keep the background.
    Only the rows and columns between the first and last painted pixel are computed."""
    n = len(colours)
    a_lut = np.zeros(n + 1, dtype=np.float32)  # entry 0: no tile, the background unchanged
    a_lut[1:] = np.broadcast_to(np.asarray(alpha, dtype=np.float32), (n,))
    c_lut = np.zeros((n + 1, 3), dtype=np.float32)
    c_lut[1:] = np.asarray(colours, dtype=np.float32).reshape(n, 3)
    keep_lut, add_lut = 1.0 - a_lut, a_lut[:, None] * c_lut  # per tile, as per pixel (float32)
    out = np.array(background[..., :3], dtype=np.uint8)  # pixels of no tile: the background
    painted = owner >= 0
    rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
    if rows.size == 0:
        return out
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    for r in range(int(rows[0]), int(rows[-1]) + 1, BLEND_ROWS):  # temporaries that stay in cache
        o = owner[r : r + BLEND_ROWS, x0:x1] + 1
        mixed = background[r : r + BLEND_ROWS, x0:x1, :3].astype(np.float32)
        mixed *= keep_lut[o][..., None]
        mixed += add_lut[o]
        mixed += 0.5
        np.clip(mixed, 0, 255, out=mixed)
        out[r : r + o.shape[0], x0:x1] = mixed
    return out


def edge_mask(owner: np.ndarray) -> np.ndarray:
    """Pixels on a tile's top or left edge (its neighbour above or to the left is another tile or
    none) or on its bottom or right edge where no tile follows: one-pixel lines between tiles."""
    pad = np.pad(owner, 1, constant_values=-1)
    mid = pad[1:-1, 1:-1]
    up, left = pad[:-2, 1:-1], pad[1:-1, :-2]
    down, right = pad[2:, 1:-1], pad[1:-1, 2:]
    return (mid >= 0) & ((mid != up) | (mid != left) | (down < 0) | (right < 0))


def hatch_mask(
    owner: np.ndarray, marked: np.ndarray, period: int = 8, width: int = 2
) -> np.ndarray:
    """Diagonal stripes (``(x + y) % period < width``) over the pixels of the tiles ``marked``
    (``(n,)`` bool)."""
    h, w = owner.shape
    stripes = (np.arange(h)[:, None] + np.arange(w)[None, :]) % period < width
    marked = np.asarray(marked, dtype=bool)
    return stripes & (owner >= 0) & marked[np.maximum(owner, 0)]
