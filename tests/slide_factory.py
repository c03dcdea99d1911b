"""Small odd slides for edge cases (blank glass, no mpp, truncated), written with tifffile.

The realistic synthetic slides come from ``sharding.synthetic`` (fixtures_slides); these are the
malformed or minimal ones a user might feed by mistake.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def blob_image(width: int, height: int, seed: int = 0, blank: bool = False) -> np.ndarray:
    """Glass (RGB ~240) with one stained elliptical island (pink/purple noise) unless blank."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 240, np.uint8)
    img += rng.integers(0, 6, img.shape, dtype=np.uint8)
    if not blank:
        yy, xx = np.mgrid[:height, :width]
        inside = ((yy - height / 2) / (0.4 * height)) ** 2 + (
            (xx - width / 2) / (0.4 * width)
        ) ** 2 < 1
        stain = np.array([205, 110, 175]) + rng.integers(-40, 40, (int(inside.sum()), 3))
        img[inside] = stain.clip(0, 255).astype(np.uint8)
    return img


def write_slide(
    path: Path,
    img: np.ndarray,
    *,
    app_mag: float | None = 20,
    mpp: float | None = 0.5,
    factors: tuple[int, ...] = (4, 16),
) -> Path:
    """A tiled pyramidal TIFF: Aperio description when ``app_mag`` is given, else generic TIFF
    with no resolution (so OpenSlide knows no mpp)."""
    h, w = img.shape[:2]
    desc = None
    if app_mag is not None:
        desc = f"Aperio Image Library v12.0.0\n{w}x{h} (256x256) RGB|AppMag = {app_mag:g}"
        if mpp is not None:
            desc += f"|MPP = {mpp:g}"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            img,
            tile=(256, 256),
            photometric="rgb",
            compression="zlib",
            description=desc,
            metadata=None,
        )
        for f in factors:
            sub = img[::f, ::f]
            tile = (256, 256) if min(sub.shape[:2]) >= 256 else (16, 16)
            tw.write(
                sub, tile=tile, photometric="rgb", compression="zlib", subfiletype=1, metadata=None
            )
    return path


def truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
