"""Annotation outlines drawn over a picture of a whole slide, in one colour scheme.

:func:`outline_colour` gives each outline its colour (a class the model predicts takes
:data:`CLASS_COLOURS` by its index, so the heatmaps' class map and the outlines agree; regions of
interest white, ignored areas grey) and :data:`DASHES` its line style; :func:`draw_outlines` draws
them (a black halo under each line), :func:`draw_annotations` adds a legend strip below.
Pillow is imported inside the drawing functions.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sharding.annotations import Outline

__all__ = [
    "CLASS_COLOURS",
    "DASHES",
    "HALO_COLOUR",
    "IGNORE_COLOUR",
    "ROI_COLOUR",
    "draw_annotations",
    "draw_outlines",
    "outline_colour",
    "outline_width",
]

RGB = tuple[int, int, int]
#: Outline colours of annotation classes: matplotlib's tab10 less its grey (left to ignored areas).
CLASS_COLOURS: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
ROI_COLOUR: RGB = (255, 255, 255)  # regions of interest: white dashes
IGNORE_COLOUR: RGB = (150, 150, 150)  # ignored areas: grey short dashes
HALO_COLOUR: RGB = (0, 0, 0)  # under every line, so that it reads on any heatmap colour
#: (on, off) pixels of each role's dashes; None draws a solid line.
DASHES: dict[str, tuple[int, int] | None] = {"class": None, "roi": (8, 5), "ignore": (3, 3)}


def outline_colour(name: str, role: str, classes: Sequence[str]) -> RGB:
    """The colour of an outline (see :func:`sharding.annotations.annotation_outlines`).

    A class the model predicts takes ``CLASS_COLOURS[i % 9]`` for its index ``i`` in ``classes``
    (the model's, so distinct up to 9 classes); any other class the colour its name's crc32
    picks. Either way a class has one colour on every slide a model predicts. Regions of interest
    are white, ignored areas grey.
    """
    if role == "roi":
        return ROI_COLOUR
    if role == "ignore":
        return IGNORE_COLOUR
    i = classes.index(name) if name in classes else zlib.crc32(name.encode())
    return CLASS_COLOURS[i % len(CLASS_COLOURS)]


def _dashes(ring: np.ndarray, on: int, off: int) -> list[np.ndarray]:
    """The dashes of polyline ``ring`` ((N, 2) pixels): the ring sampled every pixel along its
    length, cut into runs ``on`` pixels long every ``on + off``."""
    seg = np.hypot(*np.diff(ring, axis=0).T)
    along = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.append(np.arange(0.0, along[-1], 1.0), along[-1])
    pts = np.column_stack([np.interp(s, along, ring[:, 0]), np.interp(s, along, ring[:, 1])])
    idx = np.flatnonzero(s % (on + off) < on)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    return [pts[r] for r in runs if r.size > 1]


def _stroke(
    draw: Any, ring: np.ndarray, dash: tuple[int, int] | None, fill: RGB, width: int
) -> None:
    for part in [ring] if dash is None else _dashes(ring, *dash):
        draw.line(part.ravel().tolist(), fill=fill, width=width, joint="curve")


def draw_outlines(
    image: np.ndarray,
    slide_size: tuple[int, int],
    outlines: Sequence[Outline],
    classes: Sequence[str],
) -> np.ndarray:
    """``image`` (a ``(th, tw, 3)`` uint8 picture of a whole slide) with the annotation
    ``outlines`` drawn on it, as a new uint8 RGB array of the same size.

    ``outlines`` are in level-0 pixels of a slide of ``slide_size = (width, height)``; a point
    ``(x, y)`` lands on ``(x / sx, y / sy)`` with ``sx = width / tw``, ``sy = height / th`` (as
    :func:`render_heatmap` places tiles). Each ring is a line ``w = max(2, round(max(th, tw) /
    500))`` pixels wide in :func:`outline_colour`, dashed per :data:`DASHES`, over a black halo
    ``w + 2`` wide; halos go first so that no halo hides another outline.
    """
    from PIL import Image, ImageDraw

    th, tw = image.shape[:2]
    scale = np.array([slide_size[0] / tw, slide_size[1] / th])
    width = outline_width(image.shape)
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    draw = ImageDraw.Draw(picture)
    for halo in (True, False):
        for outline in outlines:
            colour = outline_colour(outline.name, outline.role, classes)
            for ring in outline.rings:
                fill, w = (HALO_COLOUR, width + 2) if halo else (colour, width)
                _stroke(draw, ring / scale, DASHES.get(outline.role), fill, w)
    return np.asarray(picture)


def outline_width(shape: tuple[int, ...]) -> int:
    """Width in pixels of an outline on a picture of ``shape[:2] = (th, tw)``:
    ``max(2, round(max(th, tw) / 500))``."""
    return max(2, round(max(shape[:2]) / 500))


def draw_annotations(
    image: np.ndarray,
    slide_size: tuple[int, int],
    outlines: Sequence[Outline],
    classes: Sequence[str],
) -> np.ndarray:
    """:func:`draw_outlines` on ``image``, and a legend strip below, as a new uint8 RGB array.

    The picture keeps its pixels at the top left of the result; below it one legend row per
    outline (a line sample and its name), the result widened with white if a name needs it.
    """
    from PIL import Image, ImageDraw, ImageFont

    th, tw = image.shape[:2]
    width = outline_width(image.shape)
    picture = Image.fromarray(draw_outlines(image, slide_size, outlines, classes))
    styles = [(o, outline_colour(o.name, o.role, classes), DASHES.get(o.role)) for o in outlines]
    font = ImageFont.load_default()
    row = 16
    measure = ImageDraw.Draw(picture)
    text_w = max((measure.textlength(o.name, font=font) for o, _, _ in styles), default=0)
    canvas = Image.new("RGB", (max(tw, 40 + int(text_w) + 6), th + row * len(styles) + 6), "white")
    canvas.paste(picture, (0, 0))
    legend = ImageDraw.Draw(canvas)
    for i, (outline, colour, dash) in enumerate(styles):
        y = th + 3 + i * row + row // 2
        sample = np.array([[4.0, y], [32.0, y]])
        _stroke(legend, sample, dash, HALO_COLOUR, width + 2)
        _stroke(legend, sample, dash, colour, width)
        legend.text((40, y), outline.name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)
