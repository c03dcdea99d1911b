"""A slide's kept regions read for prediction in runs: the read chain's pixels, fewer calls.

:func:`resdistill.read_chain.read_tiles` (the reference) reads each region with its own
``read_region`` call, turns it into a PIL image, reduces it, encodes and decodes it. For a
student's small tile the calls cost more than the pixels. :func:`read_regions` gives the very same
array (``tests/test_predict_fast_path.py`` checks it pixel for pixel) by reading a *run* of
regions that are neighbours in a grid row with one ``read_region``:

* the run's level and read size are :func:`sharding.slide.read_level`'s for one region; a run is
  read only when the level's downsample ``ds`` is a whole number and ``size0 / ds`` equals the
  read size, so region ``j`` of the run starts ``j * size0 / ds`` level pixels (a whole number)
  after the first: OpenSlide samples it at the same sub-pixel phase as a read of its own, and
  the crop is that read;
* the run's RGBA -> RGB conversion (:func:`sharding.slide.rgb_image`) is per pixel, and a box
  reduction by a whole factor ``f`` (:func:`sharding.slide.downsample`) of a run whose regions
  are ``f``-aligned is each region's box reduction side by side, so both are done once per run;
  any other reduction (Lanczos) is done per region, as the reference does;
* each tile is then encoded as the dataset was (:func:`sharding.extract.encode`) and decoded to
  ``(px, px, 3)`` the way the loader does (simplejpeg for JPEG, else
  :func:`resdistill.data.decode_image`), without the loader's channel-first round trip.

Regions whose level does not allow runs (an inexact level downsample) are read one by one by
the reference itself. A slide read by byte ranges (:class:`sharding.slide_ranges.RangedSlide`)
fetches every run's tiles at once first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from resdistill.read_chain import ReadChain, TilePlan

__all__ = ["MAX_RUN_PX", "read_regions", "runs"]

#: Widest run read at once, in level pixels (a run of 16 regions of 224 px: 3584 px, 14 MB RGBA).
MAX_RUN_PX = 4096


def runs(xs: np.ndarray, ys: np.ndarray, size0: int, max_len: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: consecutive regions of ``xs, ys`` (in grid order) cut into runs of
    horizontal neighbours (same ``y``, ``x`` one ``size0`` apart), at most ``max_len`` each."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or ys[i] != ys[i - 1] or xs[i] != xs[i - 1] + size0 or i - start >= max_len:
            out.append((start, i))
            start = i
    return out


def _decode(data: bytes) -> np.ndarray:
    """Tile bytes -> ``(h, w, 3)`` uint8 as :func:`resdistill.data.decode_image` decodes them."""
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    from resdistill.data import decode_image

    return decode_image(data).permute(1, 2, 0).numpy()


def read_regions(slide: Any, plan: TilePlan, chain: ReadChain, cells: np.ndarray) -> np.ndarray:
    """The model's input tiles of grid ``cells`` of ``plan``: exactly
    ``read_tiles(slide, plan, chain, cells)`` (module docstring), ``(len(cells), px, px, 3)``
    uint8. :class:`sharding.slide.SlideError` when a region cannot be read."""
    from resdistill.read_chain import read_tiles
    from sharding.slide import read_level

    cells = np.asarray(cells, dtype=np.int64)
    opts = replace(chain.opts, low_mags_from=chain.pixels_from)
    top = opts.mags[0].name
    direct = chain.mag == top or opts.low_mags_from == "native"
    out_px = opts.sizes[chain.mag] if direct else opts.sizes[top]
    info, size0 = plan.info, int(plan.size0)
    level, read_px = read_level(info, size0, out_px)
    ds = info.level_downsamples[level]
    if ds != int(ds) or size0 % int(ds) or size0 // int(ds) != read_px:
        return read_tiles(slide, plan, chain, cells)
    xs, ys = plan.xs[cells].astype(np.int64), plan.ys[cells].astype(np.int64)
    px = chain.tile_px
    tiles = np.empty((len(cells), px, px, 3), dtype=np.uint8)
    todo = runs(xs, ys, size0, max(1, MAX_RUN_PX // read_px))
    prefetch = getattr(slide, "prefetch", None)  # a slide read by ranges: fetch them at once
    if prefetch is not None:
        prefetch(level, [((int(xs[a]), int(ys[a])), ((b - a) * read_px, read_px)) for a, b in todo])
    for a, b in todo:
        try:
            region = slide.read_region(
                (int(xs[a]), int(ys[a])), level, ((b - a) * read_px, read_px)
            )
        except Exception:  # noqa: BLE001 - the reference read names the region that fails
            tiles[a:b] = read_tiles(slide, plan, chain, cells[a:b])
            continue
        for j, tile in enumerate(_run_tiles(region, b - a, read_px, out_px, px, direct)):
            tiles[a + j] = _decode(_encode(tile, opts)) if chain.encoded else tile
    return tiles


def _encode(tile: np.ndarray, opts: Any) -> bytes:
    from sharding.extract import encode

    return encode(tile, opts)


def _run_tiles(
    region: Any, n: int, read_px: int, out_px: int, px: int, direct: bool
) -> list[np.ndarray]:
    """The ``n`` tiles of a run read as one RGBA ``region`` of ``n * read_px`` by ``read_px``:
    :func:`sharding.slide.rgb_image`, then :func:`sharding.slide.downsample` to ``out_px`` and,
    for an as-trained low magnification (``not direct``), again to ``px``."""
    from sharding.slide import downsample, rgb_image

    rgb = rgb_image(region)
    steps = [out_px] if direct else [out_px, px]
    size = read_px
    for step in steps:
        if size == step:
            continue
        if size % step == 0:  # a box reduction: the same per region as over the run
            rgb = rgb.reduce(size // step)
        else:  # Lanczos: region by region, as the reference
            parts = [
                downsample(rgb.crop((j * size, 0, (j + 1) * size, size)), step) for j in range(n)
            ]
            arr = np.concatenate([np.asarray(p) for p in parts], axis=1)
            from PIL import Image

            rgb = Image.fromarray(arr)
        size = step
    arr = np.asarray(rgb)
    return [arr[:, j * px : (j + 1) * px] for j in range(n)]
