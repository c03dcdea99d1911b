"""Region annotations in QuPath's GeoJSON export: one slide's file -> polygons by class and role.

A file is what QuPath's *File > Export objects as GeoJSON* writes: a FeatureCollection (a list of
Features and a single Feature are read too) whose Polygon / MultiPolygon geometries are in level-0
pixel coordinates (x to the right, y down), holes as interior rings; on a slide with OpenSlide
bounds (MIRAX) relative to their corner, as QuPath crops such a slide
(:meth:`SlideAnnotations.from_qupath` moves them to the slide's own level 0). Only objects QuPath calls
annotations are read (``properties.objectType`` absent or ``annotation``); exported detections
and cells are passed over. Each feature's ``properties.classification.name`` gives its role:

* a name matching an ignore pattern (case-insensitive shell patterns such as ``Ignore*``, which
  also matches QuPath's own ``Ignore*`` class): an area to leave out (pen, fold, blur);
* no classification, or QuPath's own ``Region*`` class: a region of interest (when a slide has
  any, only regions inside are tiled);
* any other name: a class, whose area fraction of each region labels it.

Polygons of one class are merged (``union_all``), so overlapping strokes are not counted twice.
Invalid polygons (self-intersections, QuPath's brush loops) are repaired with ``make_valid`` and
said. Each problem is one line naming the file; a file that cannot be used at all raises
:class:`AnnotationError`, which fails that slide alone: a file over :data:`MAX_BYTES`, nested
deeper than :data:`MAX_DEPTH` (checked without recursion before decoding), holding a coordinate
that is not a finite number (``Infinity``, ``NaN``, ``1e999``: GEOS cannot measure them), or a
class name that is not text (a number would otherwise be read as "unclassified", a region of
interest). Areas are measured only on the slide (:meth:`SlideAnnotations.clip`): a polygon off
the slide never decides its majority class.
"""

from __future__ import annotations

import fnmatch
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import shape

AREA_TYPES = ("Polygon", "MultiPolygon")
#: QuPath's built-in class for regions of interest (the star is part of the name).
ROI_CLASS = "Region*"
EXPORT_HINT = "export it again with QuPath's File > Export objects as GeoJSON"
#: Largest annotation file read (bytes): QuPath's annotations of a slide take a few MB; a file this
#: large holds detections or cells, which would take ~10x its size in memory to decode.
MAX_BYTES = 256 * 2**20
#: Deepest ``[`` / ``{`` nesting accepted: GeoJSON needs 8 (a MultiPolygon's point in a feature
#: in a collection), QuPath's properties a few more; far below Python's recursion limit.
MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCAN_CHUNK = 1 << 24
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


class AnnotationError(Exception):
    """One slide's annotation file cannot be used at all (one line naming the file and the fix)."""


@dataclass(frozen=True)
class SlideAnnotations:
    """One slide's polygons by role, in level-0 pixels, each role or class merged into one geometry.

    ``labels_regions`` says whether the file names any class (even one left out as unknown): then
    its regions take their labels from the polygons, not from the slide's row in the labels CSV.
    """

    classes: dict[str, shapely.Geometry]
    roi: shapely.Geometry | None = None
    ignore: shapely.Geometry | None = None
    labels_regions: bool = False

    def geometries(self) -> list[shapely.Geometry]:
        return [g for g in (*self.classes.values(), self.roi, self.ignore) if g is not None]

    def areas(self) -> dict[str, float]:
        """Area of each class in level-0 square pixels (of the polygons as drawn: clip first)."""
        return {c: float(shapely.area(g)) for c, g in self.classes.items()}

    def clip(self, width: int, height: int) -> SlideAnnotations:
        """The annotations within a ``width`` x ``height`` slide (level-0 pixels)."""
        slide = shapely.box(0, 0, width, height)
        return self.map(lambda g: shapely.intersection(g, slide))

    def majority(self, width: int, height: int) -> str | None:
        """The class covering the most area of the ``width`` x ``height`` slide (the first name on
        a tie), None without classes on it.

        Regions are equal squares, so this is the class that labels the most regions, up to the
        regions an outline cuts: it needs only the slide's size, which lets splits be assigned
        before any slide is tiled. Polygons are clipped first: area off the slide labels nothing.
        """
        areas = {c: a for c, a in self.clip(width, height).areas().items() if a > 0}
        return min(areas, key=lambda c: (-areas[c], c)) if areas else None

    def bounds(self) -> tuple[float, float, float, float] | None:
        """``(minx, miny, maxx, maxy)`` over every polygon, None when there is none."""
        geoms = [g for g in self.geometries() if not g.is_empty]
        if not geoms:
            return None
        b = shapely.bounds(np.array(geoms, dtype=object))
        return (
            float(b[:, 0].min()),
            float(b[:, 1].min()),
            float(b[:, 2].max()),
            float(b[:, 3].max()),
        )

    def from_qupath(self, origin: tuple[int, int]) -> SlideAnnotations:
        """These annotations, drawn in QuPath on a slide whose level-0 ``origin`` is not
        (0, 0), moved to OpenSlide's level-0 pixels: QuPath crops a slide to OpenSlide's bounds
        (``openslide.bounds-x/-y``, :func:`sharding.slide.bounds_origin`), so its pixel (0, 0)
        is ``origin``."""
        if not any(origin):
            return self
        shift = np.asarray(origin, dtype=np.float64)
        return self.map(lambda g: shapely.transform(g, lambda xy: xy + shift))

    def map(self, fn) -> SlideAnnotations:
        """The same annotations with ``fn`` applied to every geometry (e.g. a clip to the slide)."""
        return SlideAnnotations(
            classes={c: fn(g) for c, g in self.classes.items()},
            roi=None if self.roi is None else fn(self.roi),
            ignore=None if self.ignore is None else fn(self.ignore),
            labels_regions=self.labels_regions,
        )


def is_ignored(name: str, patterns: Collection[str]) -> bool:
    """Whether class ``name`` matches one of the case-insensitive shell ``patterns``."""
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """The polygon parts of ``geom`` (make_valid may add lines or points) merged into one."""
    parts = shapely.get_parts(geom)
    keep = [p for p in parts if shapely.get_type_id(p) in (3, 6)]  # Polygon, MultiPolygon
    return shapely.union_all(keep) if keep else shapely.Polygon()


def _features(doc: Any, name: str) -> list:
    if isinstance(doc, list):
        return doc
    kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
    if kind == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if kind == "Feature":
        return [doc]
    raise AnnotationError(
        f"{name}: not a GeoJSON FeatureCollection (top level is {kind!r}): {EXPORT_HINT}"
    )


def _class_name(props: Mapping, i: int, name: str) -> str | None:
    """The feature's class name (QuPath: ``classification.name``; a bare string is read too), None
    when unclassified; :class:`AnnotationError` for a name that is not one line of text."""
    cls = props.get("classification")
    what = "classification"
    if isinstance(cls, Mapping):
        cls, what = cls.get("name"), "class name"
    if cls is None:
        return None
    if not isinstance(cls, str):
        raise AnnotationError(
            f"{name}: feature {i}'s {what} is {type(cls).__name__} {_short(cls)}, not text: "
            f"name its class in QuPath and {EXPORT_HINT}"
        )
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in cls):
        raise AnnotationError(
            f"{name}: feature {i}'s class name {_short(cls)} holds a line break or control "
            "character: rename the class in QuPath and export again"
        )
    return cls.strip() or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_size(size: int, name: str) -> None:
    """:class:`AnnotationError` when a file of ``size`` bytes is over :data:`MAX_BYTES`."""
    if size > MAX_BYTES:
        raise AnnotationError(
            f"{name}: larger than {MAX_BYTES} bytes: export annotations only (not detections or "
            "cells) with QuPath's File > Export objects as GeoJSON"
        )


def nesting_depth(utf8: bytes) -> int:
    """Deepest ``[`` / ``{`` nesting outside strings of UTF-8 JSON: a regex drops the strings,
    then a running sum over the brackets of fixed-size chunks, so neither recursion nor memory
    grow with the depth."""
    bare = np.frombuffer(_STRING.sub(b'""', utf8), np.uint8)
    deepest = level = 0
    for start in range(0, bare.size, _SCAN_CHUNK):
        steps = _BRACKET_STEP[bare[start : start + _SCAN_CHUNK]]
        steps = steps[steps != 0]
        if steps.size:
            run = np.cumsum(steps, dtype=np.int64) + level
            deepest, level = max(deepest, int(run.max())), int(run[-1])
    return deepest


def _not_a_number(literal: str) -> float:
    raise ValueError(f"{literal} is not a JSON number")


def decode_json(data: bytes, name: str) -> Any:
    """The JSON document in ``data``, bounded: size, then nesting depth (without recursion), then
    strict decoding (``NaN`` / ``Infinity`` refused); :class:`AnnotationError` naming the file."""
    check_size(len(data), name)
    try:
        encoding = json.detect_encoding(data)
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{name}: not valid JSON ({exc}): {EXPORT_HINT}") from None
    depth = nesting_depth(data if encoding.startswith("utf-8") else text.encode())
    if depth > MAX_DEPTH:
        raise AnnotationError(
            f"{name}: nested deeper than {MAX_DEPTH} levels ({depth}), which no GeoJSON needs: "
            f"{EXPORT_HINT}"
        )
    try:
        return json.loads(text, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise AnnotationError(f"{name}: not valid JSON ({exc}): {EXPORT_HINT}") from None


def parse_geojson(
    data: bytes,
    name: str,
    ignore: Collection[str],
    classes: Collection[str] | None = None,
) -> tuple[SlideAnnotations, list[str]]:
    """Parse one slide's GeoJSON; returns the annotations and one line per problem.

    Problems that leave features out or change them (unknown class, unreadable or non-area
    geometry, invalid polygon repaired) are lines; a file that is not JSON (or is out of the bounds
    of :func:`decode_json`), not GeoJSON features, holds no polygon at all, a non-finite
    coordinate or a class name that is not text raises :class:`AnnotationError`.
    """
    doc = decode_json(data, name)
    try:
        return _read_features(doc, name, ignore, classes)
    except ShapelyError as exc:  # GEOS on input it cannot handle: this file only
        raise AnnotationError(f"{name}: unusable geometry ({exc}): {EXPORT_HINT}") from None


def _read_features(
    doc: Any, name: str, ignore: Collection[str], classes: Collection[str] | None
) -> tuple[SlideAnnotations, list[str]]:
    polygons: dict[str, list] = {}  # "class:<name>" | "roi" | "ignore" -> geometries
    unknown: Counter[str] = Counter()
    no_area: Counter[str] = Counter()
    unreadable: list[str] = []
    repaired: list[str] = []
    labels_regions = False
    for i, feat in enumerate(_features(doc, name), start=1):
        props = feat.get("properties") if isinstance(feat, dict) else None
        props = props if isinstance(props, Mapping) else {}
        if props.get("objectType", "annotation") != "annotation":
            continue
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        kind = geom.get("type") if isinstance(geom, dict) else None
        if kind not in AREA_TYPES:
            no_area[kind if isinstance(kind, str) else "geometry-less"] += 1
            continue
        try:
            g = shape(geom)
        except Exception:  # shapely raises TypeError/ValueError/GEOSException on bad coordinates
            unreadable.append(str(i))
            continue
        if not np.isfinite(shapely.get_coordinates(g)).all():
            raise AnnotationError(
                f"{name}: feature {i} has a coordinate that is not a finite number: {EXPORT_HINT}"
            )
        cls = _class_name(props, i, name)
        if cls is None or cls == ROI_CLASS:
            role = "roi"
        elif is_ignored(cls, ignore):
            role = "ignore"
        else:
            labels_regions = True
            if classes and cls not in classes:
                unknown[cls] += 1
                continue
            role = f"class:{cls}"
        if not g.is_valid:
            repaired.append(f"{i} ({shapely.is_valid_reason(g)})")
            g = polygonal(shapely.make_valid(g))
        polygons.setdefault(role, []).append(g)

    problems: list[str] = []
    if unreadable:
        problems.append(
            f"{name}: feature(s) {', '.join(unreadable)} have unreadable coordinates and are left "
            f"out: {EXPORT_HINT}"
        )
    if no_area:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(no_area.items()))
        problems.append(
            f"{name}: {kinds} feature(s) have no area and are left out: draw regions as areas "
            "(polygon, rectangle, brush)"
        )
    if repaired:
        problems.append(
            f"{name}: invalid polygon(s) repaired with make_valid, feature(s) "
            f"{'; '.join(repaired)}: check those outlines in QuPath"
        )
    if unknown:
        listed = ", ".join(f"{c!r} ({n} polygons)" for c, n in sorted(unknown.items()))
        problems.append(
            f"{name}: classes {listed} are not among --classes ({', '.join(sorted(classes or ()))})"
            ": their polygons are left out; rename them in QuPath or add them to --classes"
        )
    if not polygons and not labels_regions:
        raise AnnotationError(
            f"{name}: holds no Polygon or MultiPolygon annotation: remove the file or {EXPORT_HINT}"
        )
    merged = {role: shapely.union_all(gs) for role, gs in polygons.items()}
    ann = SlideAnnotations(
        classes={
            r[len("class:") :]: g for r, g in sorted(merged.items()) if r.startswith("class:")
        },
        roi=merged.get("roi"),
        ignore=merged.get("ignore"),
        labels_regions=labels_regions,
    )
    return ann, problems


class Outline(NamedTuple):
    """Rings of one class or role to draw: ``role`` is ``class``, ``roi`` or ``ignore``."""

    name: str
    role: str
    rings: list[np.ndarray]  # (N, 2) float arrays of x, y in the drawing's pixels


def annotation_outlines(ann: SlideAnnotations, downsample: float) -> list[Outline]:
    """Every exterior and interior ring of a slide's annotations, in pixels of an image
    ``downsample`` times smaller than level 0 (a heatmap or thumbnail): ``xy / downsample``."""

    def rings(geom: shapely.Geometry) -> list[np.ndarray]:
        out = []
        for poly in shapely.get_parts(geom):
            for ring in (poly.exterior, *poly.interiors):
                out.append(np.asarray(ring.coords, dtype=np.float64)[:, :2] / downsample)
        return out

    outlines = [Outline(c, "class", rings(g)) for c, g in ann.classes.items()]
    if ann.roi is not None:
        outlines.append(Outline("region of interest", "roi", rings(ann.roi)))
    if ann.ignore is not None:
        outlines.append(Outline("ignored", "ignore", rings(ann.ignore)))
    return outlines
