"""Region labels from one slide's annotations: each region's class fractions, label and fate.

Regions are the level-0 squares of the tiling plan (:func:`sharding.tissue.grid`). For each class
``c`` of the slide::

    fraction_c(region) = area(region & polygons_c) / area(region)

computed with shapely 2 over arrays: an STRtree of the squares finds those a class overlaps;
squares wholly inside count 1 with no geometry work and only the squares an outline crosses are
intersected, so the cost follows the outlines' length, not the slide's area. Classes are measured
one by one, so overlapping classes may both cover a region. Then, in this order:

1. a region that overlaps an ignored polygon (any positive area in common) is removed;
2. its label is the class with the largest fraction when that is at least ``min_label_fraction``
   (the first class name on a tie), else none;
3. when the slide has regions of interest, an unlabelled region is kept only if they cover at
   least ``min_label_fraction`` of it;
4. with ``annotated_only`` unlabelled regions are removed; otherwise they stay, unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.errors import ShapelyError

from .annotation_set import AnnotationRef, load_annotations
from .annotations import EXPORT_HINT, AnnotationError, SlideAnnotations
from .options import AnnotationOptions

#: Annotations reaching past this multiple of the slide's size, with most of their area outside
#: it, are taken to be in the pixels of a larger image (another scan, or a wrong scale).
LEVEL_TOO_LARGE = 1.5
#: Annotations that all lie within this fraction of the slide's width and height (from its top-left
#: corner) are taken to be in the pixels of a downsampled level (pyramids step by 4 or more; a
#: factor 2 is too close to a genuinely small annotation to tell).
LEVEL_TOO_SMALL = 1 / 3
#: Slack on ``min_label_fraction`` for the rounding of areas (a region exactly half covered counts).
FRACTION_EPS = 1e-6


class ExtentError(ValueError):
    """The annotations do not fit the slide (coordinates at another level or of another image)."""


@dataclass(frozen=True)
class RegionLabels:
    """Per region of the plan (same order): kept or not, label (or None), class fractions."""

    keep: np.ndarray  # bool
    labels: np.ndarray  # object: class name or None
    fractions: dict[str, np.ndarray]  # class -> float32 fraction of each region


def fit_to_slide(
    ann: SlideAnnotations, width: int, height: int, name: str
) -> tuple[SlideAnnotations, list[str]]:
    """Clip the annotations to the slide; one line for polygons wholly outside it.

    Raises :class:`ExtentError` when the coordinates look like another level's: all polygons
    within the top-left ``LEVEL_TOO_SMALL`` of the slide, or reaching past ``LEVEL_TOO_LARGE``
    times its size with less than half their area on it.
    """
    bounds = ann.bounds()
    if bounds is None:
        return ann, []
    _, _, maxx, maxy = bounds
    reach = max(maxx / width, maxy / height)
    slide = shapely.box(0, 0, width, height)
    geoms = ann.geometries()
    total = float(shapely.area(np.array(geoms, dtype=object)).sum())
    on_slide = float(shapely.area(shapely.intersection(np.array(geoms, dtype=object), slide)).sum())
    if reach > LEVEL_TOO_LARGE and on_slide < 0.5 * total:
        raise ExtentError(
            f"{name}: polygons reach ({maxx:.0f}, {maxy:.0f}) but the slide is {width}x{height} px "
            "at level 0: the coordinates look like those of a larger image; export them in this "
            "slide's level-0 pixels"
        )
    if reach < LEVEL_TOO_SMALL:
        raise ExtentError(
            f"{name}: every polygon lies within the top-left {reach:.0%} of the slide "
            f"({width}x{height} px at level 0): the coordinates look like those of a downsampled "
            f"level (about {1 / reach:.0f}x smaller); export them in level-0 (full-resolution) pixels"
        )
    parts = np.concatenate([shapely.get_parts(g) for g in geoms])
    outside = int((shapely.area(shapely.intersection(parts, slide)) <= 0).sum())
    problems = []
    if outside:
        problems.append(
            f"{name}: {outside} polygon(s) lie outside the slide ({width}x{height} px at level 0) "
            "and are left out: check they were drawn on this slide"
        )
    return ann.clip(width, height), problems


def coverage(
    geom: shapely.Geometry | None, boxes: np.ndarray, tree: shapely.STRtree, cell_area: float
) -> np.ndarray:
    """Fraction of each box's area that ``geom`` covers (see the module docstring)."""
    out = np.zeros(len(boxes), np.float64)
    if geom is None or geom.is_empty:
        return out
    shapely.prepare(geom)
    touched = tree.query(geom, predicate="intersects")
    inside = tree.query(geom, predicate="contains")
    out[inside] = 1.0
    edge = np.setdiff1d(touched, inside)
    if edge.size:
        out[edge] = shapely.area(shapely.intersection(boxes[edge], geom)) / cell_area
    return np.clip(out, 0.0, 1.0)


def label_regions(
    ann: SlideAnnotations, xs: np.ndarray, ys: np.ndarray, size0: int, opts: AnnotationOptions
) -> RegionLabels:
    """Label and select the ``size0`` squares at ``(xs, ys)`` (see the module docstring)."""
    n = len(xs)
    boxes = shapely.box(xs, ys, xs + size0, ys + size0)
    tree = shapely.STRtree(boxes)
    cell = float(size0) ** 2
    names = sorted(ann.classes)
    fractions = {c: coverage(ann.classes[c], boxes, tree, cell).astype(np.float32) for c in names}
    threshold = opts.min_label_fraction - FRACTION_EPS
    labels = np.full(n, None, dtype=object)
    if names and n:
        stack = np.stack([fractions[c] for c in names])
        best = stack.argmax(0)  # the first maximum: the first class name on a tie
        labelled = stack[best, np.arange(n)] >= threshold
        labels[labelled] = np.array(names, dtype=object)[best[labelled]]
    keep = coverage(ann.ignore, boxes, tree, cell) <= 0.0
    has_label = labels != None  # noqa: E711 - elementwise on an object array
    if ann.roi is not None:
        keep &= has_label | (coverage(ann.roi, boxes, tree, cell) >= threshold)
    if opts.annotated_only:
        keep &= has_label
    return RegionLabels(keep=keep, labels=labels, fractions=fractions)


def slide_region_labels(
    opts: AnnotationOptions,
    ref: AnnotationRef,
    width: int,
    height: int,
    xs: np.ndarray,
    ys: np.ndarray,
    size0: int,
    origin: tuple[int, int] = (0, 0),
) -> tuple[RegionLabels, list[str]]:
    """Read a slide's annotation file (in a slide task), move it from QuPath's pixels to the
    slide's level 0 (``origin``: :attr:`sharding.slide.SlideInfo.origin`), fit it to the slide,
    label its regions.

    Raises :class:`sharding.annotations.AnnotationError` or :class:`ExtentError` (one line each;
    a geometry error GEOS raises on this file is an AnnotationError naming it, so that it fails
    this slide's plan with its file's name).
    """
    ann, name = load_annotations(opts, ref)
    try:
        fitted, problems = fit_to_slide(ann.from_qupath(origin), width, height, name)
        return label_regions(fitted, xs, ys, size0, opts), problems
    except ShapelyError as exc:
        raise AnnotationError(f"{name}: unusable geometry ({exc}): {EXPORT_HINT}") from None
