"""Open a whole-slide image with OpenSlide and read regions at a requested magnification.

Contract (DESIGN.md, "Magnification"):

* Base mpp (level 0) comes from ``openslide.mpp-x``, else from the TIFF resolution tags, else from
  ``openslide.objective-power`` (``mpp = 10 / power``), else from the user's ``--mpp``; with none
  of them the slide is refused with :class:`SlideError`, never guessed.
* A magnification is read from the best pyramid level at or above it (the level with the largest
  downsample that is still <= the wanted one) and resized with an anti-aliasing filter; a
  magnification above the slide's base is refused, never upsampled. A level downsample within
  ``LEVEL_TOLERANCE`` of a whole number counts as that number.
* Pixels must be square (``mpp-x`` and ``mpp-y`` within 1%); an anisotropic slide is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .magnification import Magnification
from .remote_slides import is_s3, local_copy
from .slide_files import SLIDE_SUFFIXES as SLIDE_SUFFIXES  # re-exported: the slide file contract
from .slide_files import SlideError

#: Levels whose downsample exceeds the wanted one by less than this factor still count as "at or
#: above" the magnification (vendors store e.g. 4.000244 for a 4x level), and a downsample within
#: this factor of a whole number is that number (3.9995 is 4: a level whose size was rounded).
LEVEL_TOLERANCE = 1e-3
#: Pixels whose width and height in microns differ by more than this fraction are not square.
ANISOTROPY_TOLERANCE = 0.01


@dataclass(frozen=True)
class SlideInfo:
    """What the tiler needs to know about a slide."""

    path: str
    width: int
    height: int
    base_mpp: float
    mpp_source: str  # "openslide.mpp-x", "tiff resolution", "objective power" or "--mpp"
    level_downsamples: tuple[float, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    vendor: str | None
    #: level-0 offset of the slide's non-empty region, ``openslide.bounds-x/-y`` (OpenSlide sets
    #: them for MIRAX and other sparse formats; (0, 0) otherwise): where QuPath, which crops a
    #: slide to those bounds when it opens it, puts its origin (see :func:`bounds_origin`)
    origin: tuple[int, int] = (0, 0)


def _float(props: dict, key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def bounds_origin(props: dict) -> tuple[int, int]:
    """``(openslide.bounds-x, openslide.bounds-y)`` of a slide's properties, (0, 0) when absent.

    Coordinates in QuPath (its annotations, GeoJSON imports and exports) are those of the image
    cropped to these bounds unless the image was added with ``--no-crop``: level-0 pixel
    ``(x, y)`` of OpenSlide is ``(x - bounds-x, y - bounds-y)`` in QuPath.
    """

    def whole(key: str) -> int:
        try:
            return int(props.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    return whole("openslide.bounds-x"), whole("openslide.bounds-y")


def base_mpp_from_properties(
    props: dict, override: float | None = None
) -> tuple[float, str] | None:
    """Microns per level-0 pixel and where it came from, or None when the slide does not say."""
    mpp = _float(props, "openslide.mpp-x")
    if mpp:
        return mpp, "openslide.mpp-x"
    xres, unit = _float(props, "tiff.XResolution"), props.get("tiff.ResolutionUnit", "")
    if xres and unit in ("centimeter", "inch"):
        # XResolution is pixels per unit; 1 cm = 1e4 um, 1 inch = 25400 um.
        per_unit_um = 1e4 if unit == "centimeter" else 25400.0
        mpp = per_unit_um / xres
        if 0.05 <= mpp <= 100:  # a scanner's range; 72 dpi defaults of image editors are not mpp
            return mpp, "tiff resolution"
    power = _float(props, "openslide.objective-power")
    if power:
        return Magnification(power).mpp, "objective power"
    if override:
        return float(override), "--mpp"
    return None


def open_slide(path: str | Path):
    """Open ``path`` with OpenSlide (not its PIL fallback), raising :class:`SlideError`.

    An ``s3://`` path is first copied to this node's slide cache (see sharding.remote_slides).
    """
    import openslide

    path = str(path)
    if is_s3(path):
        path = local_copy(path)
    if not Path(path).is_file():
        raise SlideError(f"{path}: no such file: check the path")
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{path}: not a slide OpenSlide can read (unsupported format or not an image): "
            "remove it from the input or convert it to a pyramidal TIFF"
        ) from None
    except openslide.OpenSlideError as exc:
        raise SlideError(
            f"{path}: OpenSlide cannot read it ({exc}); the file may be truncated or corrupt: "
            "copy it again from the scanner"
        ) from None


def anisotropy(props: dict) -> tuple[float, float] | None:
    """``(mpp_x, mpp_y)`` when the slide's pixels are not square (they differ by more than
    :data:`ANISOTROPY_TOLERANCE`), else None; from ``openslide.mpp-x/-y``, else the TIFF
    resolution tags."""
    mx, my = _float(props, "openslide.mpp-x"), _float(props, "openslide.mpp-y")
    if not (mx and my):
        xres, yres = _float(props, "tiff.XResolution"), _float(props, "tiff.YResolution")
        if not (xres and yres):
            return None
        per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(props.get("tiff.ResolutionUnit"), 1)
        mx, my = per_unit_um / xres, per_unit_um / yres
    return (mx, my) if abs(mx / my - 1) > ANISOTROPY_TOLERANCE else None


def slide_info(slide, path: str, mpp_override: float | None = None) -> SlideInfo:
    """Describe an open slide, refusing one whose microns per pixel cannot be known or whose
    pixels are not square (its tiles would be stretched: a square tile would not be a square
    region of tissue)."""
    props = dict(slide.properties)
    stretched = anisotropy(props)
    if stretched is not None:
        raise SlideError(
            f"{path}: anisotropic pixels (mpp-x {stretched[0]:.4g} um, mpp-y {stretched[1]:.4g} "
            "um): resdistill cuts square regions only; resample the slide to square pixels"
        )
    found = base_mpp_from_properties(props, mpp_override)
    if found is None:
        raise SlideError(
            f"{path}: the slide records neither microns per pixel nor objective power: pass --mpp "
            "(microns per level-0 pixel, e.g. --mpp 0.25 for 40x)"
        )
    width, height = slide.dimensions
    return SlideInfo(
        path=path,
        width=int(width),
        height=int(height),
        base_mpp=found[0],
        mpp_source=found[1],
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        vendor=slide.properties.get("openslide.vendor"),
        origin=bounds_origin(props),
    )


def exact_downsample(ds: float) -> float:
    """A level's downsample, snapped to the nearest whole number when within LEVEL_TOLERANCE of it
    (level sizes are rounded, so a 4x level of an odd-sized slide reports 3.9995 or 4.0004)."""
    whole = round(ds)
    return float(whole) if whole >= 1 and abs(ds - whole) <= LEVEL_TOLERANCE * ds else ds


def best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """Index of the level with the largest downsample <= ``wanted`` (within LEVEL_TOLERANCE)."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= wanted * (1 + LEVEL_TOLERANCE) and ds >= downsamples[best]:
            best = i
    return best


def check_magnification(info: SlideInfo, mag: Magnification) -> None:
    """Refuse a magnification the slide can only give by upsampling."""
    if mag.mpp < info.base_mpp * (1 - LEVEL_TOLERANCE):
        base = Magnification.from_mpp(info.base_mpp)
        raise SlideError(
            f"{info.path}: scanned at {base} ({info.base_mpp:.3g} um/px) but {mag} was asked; "
            f"resdistill never upsamples: use magnifications of {base} or lower in --mags"
        )


def opaque(region: Image.Image) -> bool:
    """Whether an OpenSlide RGBA region has no transparent (unscanned) pixel: its alpha band's
    minimum, found in C (a numpy ``min`` over the strided alpha column costs more than the
    conversion it guards)."""
    return region.mode != "RGBA" or region.getchannel("A").getextrema()[0] == 255


def to_rgb(region: Image.Image) -> np.ndarray:
    """RGBA from OpenSlide -> uint8 RGB, with transparent (unscanned) pixels shown as white glass."""
    if opaque(region):
        return np.array(region.convert("RGB"))
    arr = np.asarray(region)
    rgb = arr[..., :3]
    a = arr[..., 3:4].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def rgb_image(region: Image.Image) -> Image.Image:
    """:func:`to_rgb` as a PIL image; an opaque region (the usual case) is converted by PIL alone,
    without a numpy round trip: the same pixels, since the alpha band is then dropped unused."""
    return region.convert("RGB") if opaque(region) else Image.fromarray(to_rgb(region))


def downsample(image: Image.Image, size: int) -> Image.Image:
    """Anti-aliased reduction of a square image to ``size`` px: box average for whole factors
    (each output pixel the mean of a k x k block), Lanczos otherwise. Never enlarges."""
    if image.width == size and image.height == size:
        return image
    if image.width < size or image.height < size:
        raise ValueError(f"refusing to upsample {image.size} to {size}px")
    factor = image.width / size
    if image.width == image.height and abs(factor - round(factor)) < 1e-9:
        return image.reduce(int(round(factor)))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def read_level(info: SlideInfo, size0: int, out_px: int) -> tuple[int, int]:
    """``(level, read_px)``: the best level at or above the requested scale (``size0 / out_px``
    level-0 pixels per output pixel) and the square it holds the region in, never under
    ``out_px``: ``read_px = max(out_px, ceil(size0 / downsample[level]))``."""
    level = best_level(info.level_downsamples, size0 / out_px)
    ds = exact_downsample(info.level_downsamples[level])
    return level, max(out_px, int(math.ceil(size0 / ds - 1e-6)))


def read_region_at(slide, info: SlideInfo, x: int, y: int, size0: int, out_px: int) -> Image.Image:
    """The level-0 square ``(x, y, size0)`` as an ``out_px`` RGB image.

    Reads the region at :func:`read_level`, then reduces it with :func:`downsample`.
    """
    level, read_px = read_level(info, size0, out_px)
    region = slide.read_region((int(x), int(y)), level, (read_px, read_px))
    return downsample(rgb_image(region), out_px)
