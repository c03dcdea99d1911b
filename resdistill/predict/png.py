"""PNG bytes of an RGB picture, written with numpy and a fast deflate: a tenth of Pillow's time.

Pillow tries every PNG row filter on every row (adaptive filtering) before deflating; a slide
picture is photograph-like, where the "up" filter (each byte minus the byte above it) alone
does as well. The residues are deflated by ISA-L (``isal``, level 1), which compresses them as
small as zlib's level 1 in a quarter to a sixth of its time; where ``isal`` is not installed,
zlib's run-length strategy at level 1 (slower, the same size). The file is a plain 8-bit RGB PNG
(IHDR, one IDAT, IEND) that any reader opens.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np

__all__ = ["encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # the PNG row filter "up"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zlib_rle(data: memoryview) -> bytes:
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return deflate.compress(data) + deflate.flush()


def _compressor() -> Callable[[memoryview], bytes]:
    """A zlib stream of its bytes (PNG's IDAT format): ISA-L's level 1, else :func:`_zlib_rle`."""
    try:
        from isal import isal_zlib
    except ImportError:
        return _zlib_rle
    return lambda data: isal_zlib.compress(data, 1)


_compress = _compressor()


def encode_png(rgb: np.ndarray) -> bytes:
    """``(h, w, 3)`` uint8 -> PNG bytes (module docstring); any strides."""
    h, w = rgb.shape[:2]
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 picture, got {rgb.shape} {rgb.dtype}")
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = _UP
    flat = rows[:, 1:].reshape(h, w, 3)
    flat[0] = rgb[0]
    np.subtract(rgb[1:], rgb[:-1], out=flat[1:])  # uint8 wraps modulo 256, as PNG's filter does
    data = _compress(rows.data)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
