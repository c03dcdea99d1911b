"""Write a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens, in bounded memory.

Two flavours, both read by OpenSlide 4.0.1:

* ``svs``: Aperio-style. The first page's ImageDescription starts ``Aperio Image Library v12.0.0``
  and carries ``|AppMag = <power>|MPP = <mpp>``; OpenSlide reports vendor ``aperio`` with
  ``openslide.objective-power`` and ``openslide.mpp-x``/``-y``.
* ``tiff``: a generic tiled TIFF with XResolution/YResolution in pixels per centimetre
  (ResolutionUnit = CENTIMETER). OpenSlide reports vendor ``generic-tiff`` and derives
  ``openslide.mpp-x = 10000 / XResolution`` (so ``mpp-x``/``-y`` are set), but no
  ``openslide.objective-power``.

Level ``k`` has size ``ceil(size[k-1] / factor)`` and holds the box (area) average of
``factor x factor`` pixels of level ``k-1`` (an anti-aliased downsample; OpenSlide reports
``downsample[k] ~= factor**k``). Levels are added while the last one is wider or taller than
``min_level_px``. Reduced pages carry NewSubfileType = 1.

Memory stays bounded whatever the slide size: level 0 is produced tile by tile by a caller's
``read_tile(x, y, w, h)``; each tile is downsampled at once into a block that goes to an
anonymous temporary file, and level ``k`` is assembled from those blocks when its page is written.
No level is ever held whole in memory.

JPEG tiles are stored as YCbCr with 2x2 chroma subsampling (Photometric = YCbCr, the usual SVS
layout); tifffile encodes them with the ``imagecodecs`` package.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

#: ``read_tile(x, y, w, h) -> uint8 array (h, w, 3)``: level-0 pixels of one rectangle.
TileReader = Callable[[int, int, int, int], np.ndarray]

FORMATS = ("svs", "tiff")
APERIO_PREFIX = "Aperio Image Library v12.0.0"


@dataclass(frozen=True)
class PyramidInfo:
    """What was written: level sizes ``(width, height)`` from level 0 down."""

    path: Path
    levels: tuple[tuple[int, int], ...]
    tile: int
    factor: int


def level_sizes(width: int, height: int, factor: int, min_level_px: int) -> list[tuple[int, int]]:
    """Sizes of the pyramid: ``size[k] = ceil(size[k-1] / factor)`` while ``max(size[k-1]) > min_level_px``."""
    sizes = [(int(width), int(height))]
    while max(sizes[-1]) > min_level_px and min(sizes[-1]) >= factor:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / factor), math.ceil(h / factor)))
    return sizes


def aperio_description(
    width: int, height: int, tile: int, quality: int, app_mag: float, mpp: float, extra: str = ""
) -> str:
    """The first page's ImageDescription of an Aperio SVS: header line, then ``|key = value`` pairs."""
    mag = f"{app_mag:g}"
    head = f"{APERIO_PREFIX}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    return f"{head}|AppMag = {mag}|MPP = {mpp:.4f}{extra}"


def box_downsample(tile: np.ndarray, factor: int) -> np.ndarray:
    """Area average of ``factor x factor`` blocks: ``out[i, j] = mean(tile[f*i:f*i+f, f*j:f*j+f])``.

    A partial edge (height or width not a multiple of ``factor``) is padded by repeating the
    last row/column, so the output is ``(ceil(h / f), ceil(w / f), 3)`` uint8 (rounded).
    """
    h, w = tile.shape[:2]
    hp, wp = math.ceil(h / factor) * factor, math.ceil(w / factor) * factor
    if (hp, wp) != (h, w):
        tile = np.pad(tile, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    acc_type = np.uint16 if factor * factor * 255 < 2**16 else np.uint32
    rows = tile[0::factor].astype(acc_type)
    for i in range(1, factor):
        rows += tile[i::factor]
    acc = rows[:, 0::factor].copy()
    for j in range(1, factor):
        acc += rows[:, j::factor]
    n = factor * factor
    return ((acc + n // 2) // n).astype(np.uint8)


class _BlockStore:
    """Fixed-size ``(bs, bs, 3)`` uint8 blocks on a grid, kept in an anonymous temporary file."""

    def __init__(self, rows: int, cols: int, bs: int, directory: str | None) -> None:
        self.rows, self.cols, self.bs = rows, cols, bs
        self.nbytes = bs * bs * 3
        self.fh: BinaryIO = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed in close())
        self.fh.truncate(rows * cols * self.nbytes)

    def put(self, row: int, col: int, block: np.ndarray) -> None:
        full = np.zeros((self.bs, self.bs, 3), np.uint8)
        full[: block.shape[0], : block.shape[1]] = block
        self.fh.seek((row * self.cols + col) * self.nbytes)
        self.fh.write(full.tobytes())

    def get(self, row: int, col: int) -> np.ndarray:
        self.fh.seek((row * self.cols + col) * self.nbytes)
        data = self.fh.read(self.nbytes)
        return np.frombuffer(data, np.uint8).reshape(self.bs, self.bs, 3)

    def close(self) -> None:
        self.fh.close()


def _pad_tile(tile: np.ndarray, size: int) -> np.ndarray:
    """Pad a partial edge tile to ``size x size`` by repeating its edge (keeps JPEG edges clean)."""
    h, w = tile.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(tile)
    return np.pad(tile, ((0, size - h), (0, size - w), (0, 0)), mode="edge")


def require_jpeg_codec() -> None:
    """Fail with one clear line when tifffile cannot JPEG-encode (the ``imagecodecs`` package)."""
    try:
        import imagecodecs  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "writing JPEG-compressed TIFF/SVS needs the 'imagecodecs' package: pip install imagecodecs"
        ) from exc


def write_pyramid(
    path: str | Path,
    width: int,
    height: int,
    read_tile: TileReader,
    *,
    mpp: float,
    fmt: str = "svs",
    app_mag: float | None = None,
    tile: int = 256,
    factor: int = 4,
    min_level_px: int = 1000,
    quality: int = 80,
    description_extra: str = "",
    tmp_dir: str | Path | None = None,
) -> PyramidInfo:
    """Write ``path`` as a tiled JPEG pyramid whose level 0 is ``read_tile`` over ``width x height``.

    ``fmt="svs"`` writes the Aperio description (``app_mag`` defaults to ``10 / mpp``);
    ``fmt="tiff"`` writes resolution tags in pixels per centimetre (``10000 / mpp``).
    ``read_tile`` is called once per level-0 tile in row-major order with ``w, h <= tile``.
    The file is written under a temporary name next to ``path`` and renamed when complete.
    """
    import tifffile

    if fmt not in FORMATS:
        raise ValueError(f"unknown slide format {fmt!r}: use one of {FORMATS}")
    if tile % 16 or tile <= 0:
        raise ValueError(
            f"tile must be a positive multiple of 16 (JPEG 2x2 subsampling), got {tile}"
        )
    if factor < 2 or tile % factor:
        raise ValueError(f"factor must be >= 2 and divide the tile size {tile}, got {factor}")
    require_jpeg_codec()
    path = Path(path)
    sizes = level_sizes(width, height, factor, min_level_px)
    grids = [(math.ceil(h / tile), math.ceil(w / tile)) for w, h in sizes]
    tmp_dir = str(tmp_dir) if tmp_dir is not None else None
    stores: list[_BlockStore | None] = [None] + [
        _BlockStore(*grids[k - 1], tile // factor, tmp_dir) for k in range(1, len(sizes))
    ]

    def level_tiles(k: int) -> Iterator[np.ndarray]:
        w_k, h_k = sizes[k]
        rows, cols = grids[k]
        below = stores[k + 1] if k + 1 < len(sizes) else None
        for ty in range(rows):
            for tx in range(cols):
                x, y = tx * tile, ty * tile
                tw, th = min(tile, w_k - x), min(tile, h_k - y)
                if k == 0:
                    pixels = np.asarray(read_tile(x, y, tw, th), dtype=np.uint8)
                    if pixels.shape != (th, tw, 3):
                        raise ValueError(
                            f"read_tile({x}, {y}, {tw}, {th}) returned shape {pixels.shape}, "
                            f"expected {(th, tw, 3)}"
                        )
                else:
                    pixels = _assemble(stores[k], ty, tx, tile, factor)[:th, :tw]
                if below is not None:
                    below.put(ty, tx, box_downsample(pixels, factor))
                yield _pad_tile(pixels, tile)

    tmp_path = path.with_name(f".{path.name}.partial")
    bigtiff = width * height * 3 > 2**31
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        tile=(tile, tile),
        dtype=np.uint8,
        metadata=None,
        maxworkers=1,
    )
    try:
        with tifffile.TiffWriter(tmp_path, bigtiff=bigtiff) as tw:
            for k, (w_k, h_k) in enumerate(sizes):
                extra: dict[str, object] = {}
                if k == 0 and fmt == "svs":
                    extra["description"] = aperio_description(
                        width, height, tile, quality, app_mag or 10.0 / mpp, mpp, description_extra
                    )
                    extra["software"] = False
                elif k == 0:
                    extra["resolution"] = (1e4 / mpp, 1e4 / mpp)
                    extra["resolutionunit"] = "CENTIMETER"
                    extra["software"] = "resdistill"
                else:
                    extra["subfiletype"] = 1
                    if fmt == "tiff":
                        ds = factor**k
                        extra["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * ds))
                        extra["resolutionunit"] = "CENTIMETER"
                    extra["software"] = False
                tw.write(level_tiles(k), shape=(h_k, w_k, 3), **common, **extra)
        tmp_path.replace(path)
    finally:
        for store in stores:
            if store is not None:
                store.close()
        tmp_path.unlink(missing_ok=True)
    return PyramidInfo(path=path, levels=tuple(sizes), tile=tile, factor=factor)


def _assemble(store: _BlockStore | None, ty: int, tx: int, tile: int, factor: int) -> np.ndarray:
    """Level-k tile ``(ty, tx)`` from the ``factor x factor`` level-(k-1) blocks that cover it."""
    assert store is not None
    out = np.zeros((tile, tile, 3), np.uint8)
    bs = store.bs
    for a in range(factor):
        row = ty * factor + a
        if row >= store.rows:
            break
        for b in range(factor):
            col = tx * factor + b
            if col >= store.cols:
                break
            out[a * bs : (a + 1) * bs, b * bs : (b + 1) * bs] = store.get(row, col)
    return out
