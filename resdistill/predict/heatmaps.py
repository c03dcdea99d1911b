"""Heatmap pictures of one slide's prediction, readable at slide scale.

:func:`heatmap_pngs` is what the prediction pipeline calls once per slide. Every picture is the
slide image given (long side about ``--heatmap-px``, :data:`DEFAULT_HEATMAP_PX`) placed pixel for
pixel, unresampled, with its top left corner at ``(LEFT_PX, TOP_PX)`` of the PNG: a title band
above it, a column on its right for the colorbar and the legend, :data:`MARGIN_PX` elsewhere (the
figure grows downwards when a long legend needs more room than the image's height).

* ``<class>``: each tissue tile's ``P(class)`` through ``cmap`` over the fixed range 0..1, blended
  at ``alpha`` (:func:`resdistill.predict.tile_paint.blend`), with a colorbar ``P(<class>)``;
* ``classes``: each tile in its argmax class's colour
  (:func:`resdistill.predict.outlines.outline_colour`, the same colour on every slide, the one its
  annotation outlines have), with a legend.

On every picture (:func:`paint`): one-pixel light lines between tiles when tiles are at least
:data:`EDGE_MIN_PX` pixels wide, dark diagonal hatching over tiles the cascade escalated to the
teacher (named in the legend), the slide's annotation outlines
(:func:`resdistill.predict.outlines.draw_outlines`, named in the legend), and a scale bar under
the image when the level-0 microns per pixel are known. Painting is numpy over the whole image
(one owner map per slide, :mod:`resdistill.predict.tile_paint`), so thousands of tiles cost
milliseconds; matplotlib only draws the text, colorbar and legend, as strips put together around
the image by :func:`resdistill.predict.heatmap_frame.frame` (the column and the scale bar drawn
once per process for each size and legend).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from resdistill.predict.heatmap_frame import LEFT_PX, TOP_PX, Entry

if TYPE_CHECKING:
    from sharding.annotations import Outline

__all__ = ["CLASS_MAP", "DEFAULT_HEATMAP_PX", "LEFT_PX", "TOP_PX", "Marks", "heatmap_pngs", "paint"]

#: Long side, in pixels, of the slide picture under a heatmap (``--heatmap-px``).
DEFAULT_HEATMAP_PX = 1600
#: The name of the argmax class map among the pictures.
CLASS_MAP = "classes"
#: Tiles at least this many pixels wide get lines between them.
EDGE_MIN_PX = 8
#: Edge lines: the painted colour moved this far to white; hatching: kept at this share (dark).
EDGE_LIGHTEN, HATCH_KEEP = 0.45, 0.15


def heatmap_pngs(
    background: np.ndarray,
    slide_size: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    size0: int,
    tile_probs: np.ndarray,
    classes: Sequence[str],
    *,
    slide_id: str,
    mag: str,
    which: Sequence[str],
    cmap: str = "viridis",
    alpha: float = 0.55,
    escalated: np.ndarray | None = None,
    outlines: Sequence[Outline] | None = None,
    mpp: float | None = None,
    confidence_opacity: bool = False,
) -> dict[str, bytes]:
    """PNG bytes per picture: ``{class_name: png}`` for each class in ``which`` (its probability
    over every tissue tile, with a colorbar, titled with the slide, the class and the
    magnification as users write it, e.g. 2.5x) and ``{"classes": png}``, the argmax class map with
    a legend. ``background`` is the slide image (``(h, w, 3)`` uint8, long side about
    ``--heatmap-px``) covering level-0 ``slide_size`` ``(width, height)``; tile ``i`` covers level-0
    ``[xs[i], xs[i] + size0) x [ys[i], ys[i] + size0)`` and has ``tile_probs[i]`` ``(K,)``;
    ``escalated[i]`` marks tiles the cascade sent to the teacher; ``outlines`` are annotation
    outlines drawn over every picture.

    ``mpp``: level-0 microns per pixel, for a scale bar (none without it). ``confidence_opacity``:
    on the class map, tile ``i`` is blended at ``alpha * max_k tile_probs[i, k]`` instead of
    ``alpha``, so uncertain calls fade. The image lies at ``(LEFT_PX, TOP_PX)`` of each PNG, one
    PNG pixel per ``background`` pixel; the PNG is ``w + 126`` px wide for a per-class picture
    without a legend (the colorbar), ``w + 42`` plus the legend's width otherwise when that is
    wider, and ``h + 76`` high (``+ 30`` with a scale bar) or more when the legend is longer.
    """
    import matplotlib

    from resdistill.predict.heatmap_frame import frame
    from resdistill.predict.outlines import outline_colour
    from resdistill.predict.png import encode_png
    from resdistill.predict.tile_paint import edge_mask, hatch_mask, owner_map, tile_boxes
    from sharding.magnification import display_mag

    classes = list(classes)
    unknown = [w for w in which if w != CLASS_MAP and w not in classes]
    if unknown:
        raise ValueError(
            f"heatmap pictures {unknown} are neither a class ({', '.join(classes)}) nor "
            f"{CLASS_MAP!r}"
        )
    n = len(xs)
    probs = np.asarray(tile_probs, dtype=np.float64).reshape(n, len(classes))
    boxes = tile_boxes(background.shape, slide_size, xs, ys, size0)
    owner = owner_map(background.shape, boxes)
    tile_px = int((boxes[:, 1] - boxes[:, 0]).min()) if n else 0
    marked = np.zeros(n, bool) if escalated is None else np.asarray(escalated, bool).reshape(n)
    n_esc = int(marked.sum())
    marks = Marks(
        edges=np.flatnonzero(edge_mask(owner)) if tile_px >= EDGE_MIN_PX else None,
        hatch=np.flatnonzero(hatch_mask(owner, marked)) if n_esc else None,
        outlines=list(outlines or ()),
        slide_size=slide_size,
        classes=classes,
    )
    shown = display_mag(mag)
    counts = f"{n:,} tissue tiles" + (f", {n_esc:,} escalated to the teacher" if n_esc else "")
    overlay = _overlay_entries(classes, n_esc, marks.outlines)
    scale = None if mpp is None else mpp * slide_size[0] / background.shape[1]
    pngs = {}
    for name in which:
        if name == CLASS_MAP:
            lut = np.array([outline_colour(c, "class", classes) for c in classes], np.float64)
            colours = lut[probs.argmax(axis=1)] if n else np.zeros((0, 3))
            a = alpha * probs.max(axis=1) if confidence_opacity and n else alpha
            title = f"{slide_id}: predicted class per tile at {shown}"
            sub = counts + ("; opacity = the tile's top probability" if confidence_opacity else "")
            entries, colorbar = _class_entries(classes) + overlay, None
        else:
            p = np.clip(probs[:, classes.index(name)], 0.0, 1.0)
            colours, a = matplotlib.colormaps[cmap](p)[:, :3] * 255.0, alpha
            title, sub = f"{slide_id}: P({name}) per tile at {shown}", counts
            entries, colorbar = overlay, (name, cmap)
        img = paint(background, owner, colours, a, marks)
        picture = frame(img, title, sub, entries, colorbar=colorbar, scale_um_per_px=scale)
        pngs[name] = encode_png(picture)
    return pngs


@dataclass(frozen=True)
class Marks:
    """What goes over every picture of a slide besides the tile colours: one-pixel lines between
    tiles (``edges``), hatching of escalated tiles (``hatch``), both the row-major indices of
    their pixels in the ``(h, w)`` picture (found once per slide, shared by its pictures) or
    None, and annotation ``outlines`` of a slide of ``slide_size`` level-0 pixels."""

    edges: np.ndarray | None
    hatch: np.ndarray | None
    outlines: list[Outline]
    slide_size: tuple[int, int]
    classes: list[str]


def paint(
    background: np.ndarray,
    owner: np.ndarray,
    colours: np.ndarray,
    alpha: float | np.ndarray,
    marks: Marks,
) -> np.ndarray:
    """One picture's ``(h, w, 3)`` uint8 image, before the title, colorbar and legend.

    Tile ``i``'s pixels (``owner == i``, :func:`resdistill.predict.tile_paint.owner_map`) are
    ``(1 - a_i) * background + a_i * colours[i]`` (:func:`resdistill.predict.tile_paint.blend`);
    then each edge pixel ``c`` becomes ``c + EDGE_LIGHTEN * (255 - c)``, each hatch pixel
    ``HATCH_KEEP * c``, and the outlines are drawn over it
    (:func:`resdistill.predict.outlines.draw_outlines`).
    """
    from resdistill.predict.outlines import draw_outlines
    from resdistill.predict.tile_paint import blend

    img = blend(background, owner, colours, alpha)
    pixels = img.reshape(-1, 3)  # a view: the marks' flat indices address it
    if marks.edges is not None:
        e = pixels[marks.edges].astype(np.float32)
        pixels[marks.edges] = (e + EDGE_LIGHTEN * (255.0 - e) + 0.5).astype(np.uint8)
    if marks.hatch is not None:
        pixels[marks.hatch] = (HATCH_KEEP * pixels[marks.hatch] + 0.5).astype(np.uint8)
    if marks.outlines:
        img = draw_outlines(img, marks.slide_size, marks.outlines, marks.classes)
    return img


def _class_entries(classes: Sequence[str]) -> tuple[Entry, ...]:
    from resdistill.predict.outlines import outline_colour

    return tuple(Entry("patch", outline_colour(c, "class", classes), c) for c in classes)


def _overlay_entries(
    classes: Sequence[str], n_escalated: int, outlines: Sequence[Outline]
) -> tuple[Entry, ...]:
    """Legend entries for the hatching of escalated tiles and for each annotation outline."""
    from resdistill.predict.outlines import DASHES, outline_colour

    entries = []
    if n_escalated:
        entries.append(
            Entry("hatch", (255, 255, 255), f"escalated to the teacher ({n_escalated:,})")
        )
    for o in outlines:
        label = f"{o.name} (annotation)" if o.role == "class" else o.name
        entries.append(
            Entry("line", outline_colour(o.name, o.role, classes), label, DASHES.get(o.role))
        )
    return tuple(entries)
