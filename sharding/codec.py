"""A tile's bytes and numbers: the encoder of every image member, and the per-tile channel means
the manifest keeps (the dataset's normalisation comes from them).

One encoder for sharding and for prediction's ``as-trained`` reads
(:func:`resdistill.eval.tiling.read_tiles`), so a predicted tile is byte-identical to the shard's.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import simplejpeg
from PIL import Image

from .options import ShardOptions

_LEVELS = np.arange(256, dtype=np.int64)
_SQUARES = _LEVELS * _LEVELS


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB; itself when it is (``convert`` to the same mode copies)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def encode(image: Image.Image | np.ndarray, opts: ShardOptions) -> bytes:
    """An RGB tile's member bytes: JPEG at ``opts.quality`` (4:4:4 chroma from quality 90, 4:2:0
    below, as before with Pillow) by simplejpeg, or PNG (zlib level 1) by Pillow.

    Why simplejpeg: it wraps the same libjpeg-turbo as Pillow with less work per call. Measured on
    the 224/112/56/28 px tiles of synthetic slides at quality 90: 9,500 tiles/s against Pillow's
    6,700 (1.4x; 1.2x counting the copy out of a PIL image), the same quantisation tables, file
    sizes within 0.2%, and decoded pixels as close to the source (mean absolute error 3.68 vs
    3.64 of 255; the two encoders' decodes differ by 1.5 on average, within JPEG noise).
    """
    if opts.fmt == "jpeg":
        arr = image if isinstance(image, np.ndarray) else np.asarray(_rgb(image))
        return simplejpeg.encode_jpeg(
            np.ascontiguousarray(arr, dtype=np.uint8),
            quality=opts.quality,
            colorspace="RGB",
            colorsubsampling="444" if opts.quality >= 90 else "420",
        )
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def channel_stats(images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean of each RGB image and of its square, RGB scaled to [0, 1]: two
    ``(len(images), 3)`` float64 arrays.

    From each image's per-band histogram (counted in C) rather than a float copy of its pixels:
    exact sums, an order of magnitude faster; the images of a sample go through numpy together.
    """
    # int64: numpy reads Python ints into it half again as fast as into float64, and sums exactly
    hist = np.array([_rgb(im).histogram() for im in images], dtype=np.int64)
    hist = hist.reshape(len(images), 3, 256)
    n = hist[:, :1].sum(axis=2)  # (images, 1): pixels per image
    return (hist @ _LEVELS) / (255.0 * n), (hist @ _SQUARES) / (255.0 * 255.0 * n)
