"""``predict.png.encode_png``: a plain RGB PNG any reader decodes to the very pixels, through
ISA-L's deflate and through the zlib fallback alike."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from resdistill.predict import png


def _picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-3, 4, (130, 170, 3)), axis=1) % 256  # photograph-like rows
    pic = smooth.astype(np.uint8)
    pic[40:90, 50:120] = (200, 30, 30)  # a flat painted block
    return pic


@pytest.mark.parametrize("deflate", ["default", "zlib"])
def test_pngs_decode_to_the_same_pixels(deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if deflate == "zlib":
        monkeypatch.setattr(png, "_compress", png._zlib_rle)
    pic = _picture()
    for rgb in (pic, pic[::2, ::-1], np.zeros((1, 1, 3), np.uint8)):  # any strides, one pixel
        data = png.encode_png(rgb)
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "RGB" and img.format == "PNG"
            assert np.array_equal(np.asarray(img), rgb)


def test_isal_is_the_default_and_writes_a_zlib_stream() -> None:
    pytest.importorskip("isal")
    data = png._compress(memoryview(b"abc" * 1000))
    assert png._compress is not png._zlib_rle and zlib.decompress(data) == b"abc" * 1000


def test_not_an_rgb_picture_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((4, 4), np.float32))
