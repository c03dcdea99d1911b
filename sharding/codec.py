"""A tile's bytes and numbers: the encoder of every image member, and the per-tile channel means
the manifest keeps (the dataset's normalisation comes from them).

One encoder for sharding and for prediction's ``as-trained`` reads
(:func:`resdistill.read_chain.read_tiles`), so a predicted tile is byte-identical to the shard's.
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

    Why simplejpeg: it wraps the same libjpeg-turbo as Pillow with less work per call, with the
    same quantisation tables, so a tile's size and pixels stay those of Pillow's JPEG within
    JPEG's own noise (the README's sharding row measures the encoder's share of sharding).
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
