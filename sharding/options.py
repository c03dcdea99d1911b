"""The settings of one sharding run, shared by the driver and its Ray tasks."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .magnification import Magnification, parse_mags, tile_sizes
from .tissue_mask import DETECTOR

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

#: ``--low-mags-from`` choices: where a sample's lower magnifications come from. ``top``: the
#: region read once at the top magnification and box-reduced (one read per sample); ``native``:
#: each magnification read from the slide's best pyramid level at or above it (one read per
#: magnification: the pixels a cheap prediction read gives).
LOW_MAGS_FROM = ("top", "native")


def parse_size(text: str | int) -> int:
    """Bytes from ``256MB``, ``1.5GB``, ``512KiB`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}: write e.g. 256MB or 1GB")
    unit = (m[2] or "").lower()
    binary = "i" in unit
    base = unit[:1] if unit[:1] in "kmgt" else ""
    factor = (1024 ** "kmgt".index(base) * 1024 if base else 1) if binary else _UNITS[base]
    size = int(float(m[1]) * factor)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class ShardOptions:
    """What every slide task needs to cut and encode samples the same way.

    ``mags`` are highest first; ``tile_px`` is the edge at ``mags[0]``; lower magnifications get
    ``tile_px * mag / mags[0]`` pixels of the same region, made as ``low_mags_from`` says
    (:data:`LOW_MAGS_FROM`).
    """

    mags: tuple[Magnification, ...]
    tile_px: int = 224
    fmt: str = "jpeg"
    quality: int = 90
    min_tissue: float = 0.5
    mpp_override: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    low_mags_from: str = "top"

    @classmethod
    def make(
        cls,
        mags: str | list[Magnification] = "10,5,2.5,1.25",
        tile_px: int = 224,
        fmt: str = "jpeg",
        quality: int = 90,
        min_tissue: float = 0.5,
        mpp_override: float | None = None,
        low_mags_from: str = "top",
    ) -> ShardOptions:
        parsed = parse_mags(mags) if isinstance(mags, str) else list(mags)
        if fmt not in ("jpeg", "png"):
            raise ValueError(f"--format must be jpeg or png, got {fmt!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"--quality must be 1..100, got {quality}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError(f"--min-tissue must be within 0..1, got {min_tissue}")
        if tile_px < 8:
            raise ValueError(f"--tile-px must be at least 8, got {tile_px}")
        if mpp_override is not None and not mpp_override > 0:
            raise ValueError(f"--mpp must be positive, got {mpp_override}")
        if low_mags_from not in LOW_MAGS_FROM:
            raise ValueError(
                f"--low-mags-from must be one of {', '.join(LOW_MAGS_FROM)}, got {low_mags_from!r}"
            )
        return cls(
            mags=tuple(parsed),
            tile_px=tile_px,
            fmt=fmt,
            quality=quality,
            min_tissue=min_tissue,
            mpp_override=mpp_override,
            sizes=tile_sizes(parsed, tile_px),
            low_mags_from=low_mags_from,
        )

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it continues, the tissue
        detector's version included (it decides the regions). ``low_mags_from`` is left out at its
        default ``top``, so outputs begun before the option existed resume unchanged."""
        d = asdict(self)
        d["mags"] = [m.name for m in self.mags]
        d.pop("mpp_override")
        if self.low_mags_from == "top":
            d.pop("low_mags_from")
        d["tissue_detector"] = DETECTOR["version"]
        return d


#: Classes whose polygons remove the regions they touch (QuPath's own ``Ignore*`` class included).
IGNORE_CLASSES = ("Ignore*", "Exclude", "Artifact", "Pen")


@dataclass(frozen=True)
class AnnotationOptions:
    """How region annotations (see :mod:`sharding.annotations`) label and select regions.

    ``source`` is the folder or ``s3://`` prefix holding one ``<slide>.geojson`` per slide. A
    region's label is the class covering the largest fraction of it when that fraction is at least
    ``min_label_fraction``; ``ignore`` are case-insensitive shell patterns of classes whose
    polygons remove every region they overlap; ``annotated_only`` drops the regions no class
    labels; ``classes``, when given, are the only classes kept.
    """

    source: str
    min_label_fraction: float = 0.5
    ignore: tuple[str, ...] = IGNORE_CLASSES
    annotated_only: bool = False
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.min_label_fraction <= 1.0:
            raise ValueError(
                f"--min-label-fraction must be within (0, 1], got {self.min_label_fraction}"
            )

    def identity(self) -> dict:
        """The settings a resumed run must share (the source may move; files are checked apart)."""
        return {
            "min_label_fraction": self.min_label_fraction,
            "ignore": list(self.ignore),
            "annotated_only": self.annotated_only,
        }
