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
milliseconds; matplotlib only adds the text, colorbar and legend, on a bare ``Figure`` (no
pyplot), and the image is pasted into the drawn figure unresampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sharding.annotations import Outline

__all__ = ["CLASS_MAP", "DEFAULT_HEATMAP_PX", "LEFT_PX", "TOP_PX", "Marks", "heatmap_pngs", "paint"]

#: Long side, in pixels, of the slide picture under a heatmap (``--heatmap-px``).
DEFAULT_HEATMAP_PX = 1600
#: The name of the argmax class map among the pictures.
CLASS_MAP = "classes"
DPI = 100
#: Margin around the figure and between the image and its right column, in pixels.
MARGIN_PX = 12
GAP_PX = 18
#: Where the slide image's top left pixel lies in every PNG.
LEFT_PX, TOP_PX = MARGIN_PX, 64
#: Room for the scale bar under the image, in pixels.
SCALE_BAR_PX = 30
#: Colorbar width and the room its ticks and label take to its right, in pixels.
CBAR_PX, CBAR_TEXT_PX = 22, 62
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

    from resdistill.predict.outlines import outline_colour
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
        edges=edge_mask(owner) if tile_px >= EDGE_MIN_PX else None,
        hatch=hatch_mask(owner, marked) if n_esc else None,
        outlines=list(outlines or ()),
        slide_size=slide_size,
        classes=classes,
    )
    shown = display_mag(mag)
    counts = f"{n:,} tissue tiles" + (f", {n_esc:,} escalated to the teacher" if n_esc else "")
    overlay = _overlay_handles(classes, n_esc, marks.outlines)
    scale = None if mpp is None else mpp * slide_size[0] / background.shape[1]
    pngs = {}
    for name in which:
        if name == CLASS_MAP:
            lut = np.array([outline_colour(c, "class", classes) for c in classes], np.float64)
            colours = lut[probs.argmax(axis=1)] if n else np.zeros((0, 3))
            a = alpha * probs.max(axis=1) if confidence_opacity and n else alpha
            title = f"{slide_id}: predicted class per tile at {shown}"
            sub = counts + ("; opacity = the tile's top probability" if confidence_opacity else "")
            handles, colorbar = _class_handles(classes) + overlay, None
        else:
            p = np.clip(probs[:, classes.index(name)], 0.0, 1.0)
            colours, a = matplotlib.colormaps[cmap](p)[:, :3] * 255.0, alpha
            title, sub = f"{slide_id}: P({name}) per tile at {shown}", counts
            handles, colorbar = overlay, (name, cmap)
        img = paint(background, owner, colours, a, marks)
        fig = _figure(img, title, sub, handles, colorbar=colorbar, scale_um_per_px=scale)
        pngs[name] = _png(fig)
    return pngs


def _png(fig: Figure) -> bytes:
    """The figure drawn once by Agg and encoded by :func:`resdistill.predict.png.encode_png`.

    Its slide images (``figimage``, uint8 RGB, unresampled) are pasted into the drawn buffer
    instead of drawn, which is the same pixels for a fraction of the time.
    """
    from resdistill.predict.png import encode_png

    images = [im for im in fig.images if im.get_visible()]
    for im in images:
        im.set_visible(False)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # type: ignore[attr-defined]
    for im in images:
        arr = np.asarray(im.get_array())
        top = rgb.shape[0] - int(im.oy) - arr.shape[0]
        rgb[top : top + arr.shape[0], int(im.ox) : int(im.ox) + arr.shape[1]] = arr[..., :3]
        im.set_visible(True)
    return encode_png(rgb)


@dataclass(frozen=True)
class Marks:
    """What goes over every picture of a slide besides the tile colours: one-pixel lines between
    tiles (``edges``), hatching of escalated tiles (``hatch``), both ``(h, w)`` bool masks or
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
    if marks.edges is not None:
        e = img[marks.edges].astype(np.float32)
        img[marks.edges] = (e + EDGE_LIGHTEN * (255.0 - e) + 0.5).astype(np.uint8)
    if marks.hatch is not None:
        img[marks.hatch] = (HATCH_KEEP * img[marks.hatch] + 0.5).astype(np.uint8)
    if marks.outlines:
        img = draw_outlines(img, marks.slide_size, marks.outlines, marks.classes)
    return img


def _class_handles(classes: Sequence[str]) -> list[Any]:
    from matplotlib.patches import Patch

    from resdistill.predict.outlines import outline_colour

    return [
        Patch(facecolor=np.array(outline_colour(c, "class", classes)) / 255, label=c)
        for c in classes
    ]


def _overlay_handles(classes: Sequence[str], n_escalated: int, outlines: Sequence[Outline]) -> list:
    """Legend entries for the hatching of escalated tiles and for each annotation outline."""
    from matplotlib import patheffects
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from resdistill.predict.outlines import DASHES, outline_colour

    handles: list[Any] = []
    if n_escalated:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////",
                             label=f"escalated to the teacher ({n_escalated:,})"))  # fmt: skip
    halo = [patheffects.withStroke(linewidth=4, foreground="black")]
    for o in outlines:
        dash = DASHES.get(o.role)
        handles.append(Line2D(
            [], [], color=np.array(outline_colour(o.name, o.role, classes)) / 255, lw=2.5,
            linestyle="-" if dash is None else (0, (dash[0] / 2, dash[1] / 2)),
            path_effects=halo, label=f"{o.name} (annotation)" if o.role == "class" else o.name,
        ))  # fmt: skip
    return handles


def _figure(
    img: np.ndarray,
    title: str,
    subtitle: str,
    handles: list[Any],
    *,
    colorbar: tuple[str, str] | None,
    scale_um_per_px: float | None,
) -> Figure:
    """``img`` at ``(LEFT_PX, TOP_PX)``, unresampled, with the title band above it, the scale bar
    below it, and on its right the colorbar (``(class, cmap)``) over the legend; sizes in pixels
    at :data:`DPI`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = img.shape[:2]
    fig = Figure(dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    legend = None
    leg_w = leg_h = 0.0
    if handles:
        legend = fig.legend(handles=handles, loc="upper left", frameon=False, fontsize=11)
        box = legend.get_window_extent(canvas.get_renderer())
        leg_w, leg_h = box.width, box.height
    cbar_h = min(h, max(160, int(0.6 * h))) if colorbar else 0
    col_w = max(leg_w, CBAR_PX + CBAR_TEXT_PX if colorbar else 0)
    col_h = cbar_h + (GAP_PX if colorbar and legend else 0) + leg_h
    below = SCALE_BAR_PX if scale_um_per_px else 0
    fw = int(math.ceil(LEFT_PX + w + (GAP_PX + col_w if col_w else 0) + MARGIN_PX))
    fh = int(math.ceil(TOP_PX + max(h + below, col_h) + MARGIN_PX))
    fig.set_size_inches(fw / DPI, fh / DPI)

    def frac(x: float, y_from_top: float) -> tuple[float, float]:
        return x / fw, 1.0 - y_from_top / fh

    fig.figimage(img[..., :3], xo=LEFT_PX, yo=fh - TOP_PX - h, origin="upper")  # unresampled
    fig.text(*frac(LEFT_PX, 10), title, va="top", ha="left", fontsize=15, weight="bold")
    fig.text(*frac(LEFT_PX, 38), subtitle, va="top", ha="left", fontsize=11, color="0.25")
    x_col = LEFT_PX + w + GAP_PX
    if colorbar:
        cls, cmap = colorbar
        left, top = frac(x_col, TOP_PX)
        cax = fig.add_axes((left, top - cbar_h / fh, CBAR_PX / fw, cbar_h / fh))
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
        bar.set_label(f"P({cls})", fontsize=12)
    if legend is not None:
        y = TOP_PX + (cbar_h + GAP_PX if colorbar else 0)
        legend.set_bbox_to_anchor(frac(x_col, y), transform=fig.transFigure)
    if scale_um_per_px:
        _scale_bar(fig, w, h, fw, fh, scale_um_per_px)
    return fig


def _scale_bar(fig: Figure, w: int, h: int, fw: int, fh: int, um_per_px: float) -> None:
    """Under the image's bottom left: a bar of a round length (1, 2 or 5 x 10^k um) near a sixth
    of the image's width, and that length."""
    from matplotlib.lines import Line2D

    want = um_per_px * w / 6
    step = 10 ** math.floor(math.log10(want))
    um = max(m * step for m in (1, 2, 5) if m * step <= want)
    px = um / um_per_px
    y = 1.0 - (TOP_PX + h + SCALE_BAR_PX / 2) / fh
    x0, x1 = LEFT_PX / fw, (LEFT_PX + px) / fw
    fig.add_artist(Line2D([x0, x1], [y, y], color="black", lw=4, solid_capstyle="butt"))
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
    fig.text(x1 + 8 / fw, y, label, va="center", ha="left", fontsize=11)
