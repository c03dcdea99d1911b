"""The settings of one sharding run: :class:`ShardConfig` (every option of ``resdistill
shard``, declared once with its default and help), and what the driver derives from it for its
Ray tasks (:class:`ShardOptions`, :class:`AnnotationOptions`).

This module imports no torch and no Ray: CPU-only sharding nodes and ``resdistill --help`` load
it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from resdistill.fields import ConfigError, check, opt

from .magnification import Magnification, parse_mags, tile_sizes
from .tissue_mask import DETECTOR

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}

#: ``--low-mags-from`` choices: where a sample's lower magnifications come from. ``top``: the
#: region read once at the top magnification and box-reduced (one read per sample); ``native``:
#: each magnification read from the slide's best pyramid level at or above it (one read per
#: magnification: the pixels a cheap prediction read gives).
LOW_MAGS_FROM = ("top", "native")
#: ``--format`` choices: how tiles are encoded.
FORMATS = ("jpeg", "png")
#: ``--on-conflict`` choices: what happens to a slide whose id another slide (other bytes) holds,
#: in this run or in the output (see :mod:`sharding.slide_ids`).
ON_CONFLICT = ("refuse", "suffix")


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
    """What every slide task needs to cut and encode samples the same way (derived from a
    :class:`ShardConfig` by :meth:`make`, which validates it).

    ``mags`` are highest first; ``tile_px`` is the edge at ``mags[0]``; lower magnifications get
    ``tile_px * mag / mags[0]`` pixels of the same region, made as ``low_mags_from`` says
    (:data:`LOW_MAGS_FROM`).
    """

    mags: tuple[Magnification, ...]
    tile_px: int
    fmt: str
    quality: int
    min_tissue: float
    mpp_override: float | None
    sizes: dict[str, int]
    low_mags_from: str

    @classmethod
    def make(
        cls,
        mags: str | Sequence[Magnification] | None = None,
        tile_px: int | None = None,
        fmt: str | None = None,
        quality: int | None = None,
        min_tissue: float | None = None,
        mpp_override: float | None = None,
        low_mags_from: str | None = None,
    ) -> ShardOptions:
        """The validated settings; an argument left None takes :class:`ShardConfig`'s default
        (``mpp_override``: none). :class:`~resdistill.fields.ConfigError` (a ValueError) names
        the flag of a bad value. This is the one place these settings are checked."""
        given = {"mags": mags, "tile_px": tile_px, "fmt": fmt, "quality": quality,
                 "min_tissue": min_tissue, "low_mags_from": low_mags_from}  # fmt: skip
        s = {k: _DEFAULTS[k] if v is None else v for k, v in given.items()}
        try:
            parsed = parse_mags(s["mags"]) if isinstance(s["mags"], str) else list(s["mags"])
        except ValueError as exc:
            raise ConfigError(f"--mags: {exc}") from None
        check(s["fmt"] in FORMATS, "--format", f"must be one of {', '.join(FORMATS)}, "
              f"got {s['fmt']!r}")  # fmt: skip
        check(1 <= s["quality"] <= 100, "--quality", f"must be 1..100, got {s['quality']}")
        check(0.0 <= s["min_tissue"] <= 1.0, "--min-tissue",
              f"must be within 0..1, got {s['min_tissue']}")  # fmt: skip
        check(s["tile_px"] >= 8, "--tile-px", f"must be at least 8, got {s['tile_px']}")
        check(mpp_override is None or mpp_override > 0, "--mpp",
              f"must be positive, got {mpp_override}")  # fmt: skip
        check(s["low_mags_from"] in LOW_MAGS_FROM, "--low-mags-from",
              f"must be one of {', '.join(LOW_MAGS_FROM)}, got {s['low_mags_from']!r}")  # fmt: skip
        try:
            sizes = tile_sizes(parsed, s["tile_px"])
        except ValueError as exc:  # the message names --tile-px
            raise ConfigError(str(exc)) from None
        return cls(
            mags=tuple(parsed),
            tile_px=s["tile_px"],
            fmt=s["fmt"],
            quality=s["quality"],
            min_tissue=s["min_tissue"],
            mpp_override=mpp_override,
            sizes=sizes,
            low_mags_from=s["low_mags_from"],
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
        check(0.0 < self.min_label_fraction <= 1.0, "--min-label-fraction",
              f"must be within (0, 1], got {self.min_label_fraction}")  # fmt: skip

    def identity(self) -> dict:
        """The settings a resumed run must share (the source may move; files are checked apart)."""
        return {
            "min_label_fraction": self.min_label_fraction,
            "ignore": list(self.ignore),
            "annotated_only": self.annotated_only,
        }


def parse_resources(text: str) -> dict[str, float]:
    """``shard=1,gpu=0.5`` -> ``{"shard": 1.0, "gpu": 0.5}`` (a bare name counts 1)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip():
            out[name.strip()] = float(value or 1)
    return out


@dataclass(frozen=True)
class ShardConfig:
    """Every option of a sharding run (``resdistill shard``; :func:`sharding.pipeline.shard`).

    Validated when built (:class:`~resdistill.fields.ConfigError` naming the flag); paths and
    lists given as ``Path`` or lists are stored as text and tuples, so the config is plain data
    that writes to YAML and reads back equal.
    """

    slides: tuple[str, ...] = opt(
        help="slide files, or folders scanned for slide files (local or s3://)",
        positional=True, required=True)  # fmt: skip
    out: str = opt(help="output folder or s3://bucket/prefix", metavar="DIR_OR_URL", required=True)
    mags: str = opt("10,5,2.5,1.25", "magnifications, highest first, each as 10x, 2.5 or 0.5um",
                    metavar="M1,M2,...")  # fmt: skip
    tile_px: int = opt(224, "tile edge at the highest magnification")
    low_mags_from: str = opt(
        "top", "where lower magnifications come from: 'top' reduces each region's read at the "
        "highest magnification (one read per region, the same pixels whatever the slide's "
        "pyramid); 'native' reads each from the slide's best pyramid level at or above it (one "
        "read per magnification), the pixels 'predict --read native' serves a student, so "
        "train on them when the student will be served native reads",
        choices=LOW_MAGS_FROM)  # fmt: skip
    labels: str | None = opt(
        None, "CSV with columns slide,label[,patient]; a row 'slide,,patient' puts an unlabelled "
        "slide in its patient's split; other slides not labelled go to 'unlabeled'",
        metavar="CSV")  # fmt: skip
    classes: tuple[str, ...] | None = opt(
        None, "comma list of allowed labels (rows with others are refused)", metavar="A,B,..."
    )
    annotations: str | None = opt(
        None, "folder or s3:// prefix of QuPath GeoJSON exports, one <slide>.geojson per slide: "
        "their classes label the regions they cover (winning over --labels for those slides' "
        "tiles), unclassified polygons mark regions of interest", metavar="DIR_OR_URL")  # fmt: skip
    min_label_fraction: float = opt(
        0.5, "a region takes the class covering at least this fraction of it; also the share "
        "of a region that regions of interest must cover")  # fmt: skip
    ignore_classes: tuple[str, ...] = opt(
        IGNORE_CLASSES, "comma list of classes (shell patterns, any case) whose polygons remove "
        "the regions they overlap", metavar="A,B,...")  # fmt: skip
    annotated_only: bool = opt(
        False, "keep only regions an annotation class labels; slides without one are skipped"
    )
    splits: tuple[float, ...] = opt((0.7, 0.15, 0.15), "train,val,test ratios by slide/patient",
                                    metavar="TRAIN,VAL,TEST")  # fmt: skip
    mpp: float | None = opt(None, "microns per level-0 pixel for slides that do not record it")
    min_tissue: float = opt(0.5, "minimum tissue fraction of a region")
    shard_size: str | int = opt("256MB", "target shard size (e.g. 256MB, 1GB)", parse=str,
                                metavar="SIZE")  # fmt: skip
    fmt: str = opt("jpeg", "tile encoding", flag="--format", choices=FORMATS)
    quality: int = opt(90, "JPEG quality (1..100)")
    address: str | None = opt(
        None, "Ray cluster address (e.g. auto); default starts a local Ray", metavar="ADDRESS"
    )
    workers: int | None = opt(
        None, "CPUs for a local Ray (default: all); 0 runs in-process without Ray"
    )
    resources: Mapping[str, float] | None = opt(
        None, "custom Ray resources each slide task needs, e.g. shard=1", parse=parse_resources,
        metavar="NAME=N,...")  # fmt: skip
    seed: int = opt(0, "seed of the split assignment and shard mixing")
    overwrite: bool = opt(False, "replace an existing dataset at --out")
    on_conflict: str = opt(
        "refuse", "a slide whose id (its file stem, '.' and spaces folded to '-') another slide "
        "with other bytes holds, in this run or in --out: 'refuse' stops the run naming both "
        "files; 'suffix' shards it as <id>-<first 8 hex digits of its fingerprint>, the same "
        "id on every rerun", choices=ON_CONFLICT)  # fmt: skip
    progress: bool = opt(True, "progress bars while stderr is a terminal (--no-progress: logs, CI)")

    def __post_init__(self) -> None:
        plain = {
            "slides": tuple(str(s) for s in self.slides),
            "out": str(self.out),
            "labels": None if self.labels is None else str(self.labels),
            "classes": None if self.classes is None else tuple(self.classes),
            "ignore_classes": tuple(self.ignore_classes),
            "splits": tuple(float(r) for r in self.splits),
            "resources": None if self.resources is None else
                         {str(k): float(v) for k, v in self.resources.items()},
        }  # fmt: skip
        for name, value in plain.items():
            object.__setattr__(self, name, value)
        check(bool(self.out), "--out", "must name a folder or s3://bucket/prefix")
        self.shard_options()  # checks --mags, --tile-px, --format, --quality, --min-tissue, ...
        try:
            parse_size(self.shard_size)
        except ValueError as exc:
            raise ConfigError(f"--shard-size {exc}") from None
        splits = self.splits
        check(len(splits) == 3 and min(splits) >= 0 and sum(splits) > 0, "--splits",
              f"takes three non-negative train,val,test ratios, got {splits}")  # fmt: skip
        check(bool(self.annotations) or not self.annotated_only, "--annotated-only",
              "needs --annotations")  # fmt: skip
        self.annotation_options()  # checks --min-label-fraction when annotations are given
        check(self.workers is None or self.workers >= 0, "--workers",
              f"must be 0 or more, got {self.workers}")  # fmt: skip
        check(self.on_conflict in ON_CONFLICT, "--on-conflict",
              f"must be one of {', '.join(ON_CONFLICT)}, got {self.on_conflict!r}")  # fmt: skip

    def shard_options(self) -> ShardOptions:
        """The cut-and-encode settings every slide task gets."""
        return ShardOptions.make(self.mags, self.tile_px, self.fmt, self.quality,
                                 self.min_tissue, self.mpp, self.low_mags_from)  # fmt: skip

    def annotation_options(self) -> AnnotationOptions | None:
        """How annotations label regions (None without ``--annotations``); ``classes`` is
        filled in from ``--classes``."""
        if not self.annotations:
            return None
        return AnnotationOptions(
            source=self.annotations,
            min_label_fraction=self.min_label_fraction,
            ignore=self.ignore_classes,
            annotated_only=self.annotated_only,
            classes=self.classes or None,
        )


#: Field name -> default of :class:`ShardConfig` (what :meth:`ShardOptions.make` falls back to).
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ShardConfig)}
