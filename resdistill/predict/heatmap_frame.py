"""The frame around a heatmap's slide image: the title band, the colorbar and legend column, the
scale bar; drawn by matplotlib as separate white strips and put together with numpy.

A picture (:mod:`resdistill.predict.heatmaps`) is the slide image at ``(LEFT_PX, TOP_PX)``,
unresampled, inside :func:`frame`: the canvas is white; the title band (title and subtitle,
``(fw, TOP_PX)``), the scale bar strip under the image and the column right of it are laid in
by per-pixel minimum (dark on white, so where two strips overlap each keeps its ink), then the
image over its rectangle. Each strip is drawn at the pixel offsets it has in a whole figure of
``(fw, fh)``, so the picture is the one a single matplotlib figure of that size would give.

Only the title band differs from picture to picture. The column (:func:`column`: a colorbar of
``P(class)`` over ``cmap``, a legend of :class:`Entry`) depends on the class, colormap, the
legend entries and the colorbar's height, and the scale bar strip on the image's width, the
picture's and the microns per pixel; both are kept per process (:data:`KEPT` of each), as
read-only arrays, so a cohort of slides of one scan size draws them once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "CBAR_PX", "CBAR_TEXT_PX", "DPI", "GAP_PX", "KEPT", "LEFT_PX", "MARGIN_PX", "SCALE_BAR_PX",
    "TOP_PX", "Entry", "column", "frame", "scale_bar", "scale_strip", "title_band",
]  # fmt: skip

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
#: Columns and scale bar strips kept per process (distinct scan sizes, colormaps, legends).
KEPT = 32


@dataclass(frozen=True)
class Entry:
    """A legend entry: ``kind`` ``"patch"`` (a swatch of ``rgb``), ``"hatch"`` (white, black
    hatching) or ``"line"`` (a line of ``rgb`` with a black halo, solid or ``dash`` = (on, off)
    pixels), and its ``label``."""

    kind: str
    rgb: tuple[int, int, int]
    label: str
    dash: tuple[int, int] | None = None


def _handle(e: Entry) -> Any:
    from matplotlib import patheffects
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if e.kind == "patch":
        return Patch(facecolor=np.array(e.rgb) / 255, label=e.label)
    if e.kind == "hatch":
        return Patch(facecolor="white", edgecolor="black", hatch="////", label=e.label)
    halo = [patheffects.withStroke(linewidth=4, foreground="black")]
    style = "-" if e.dash is None else (0, (e.dash[0] / 2, e.dash[1] / 2))
    return Line2D([], [], color=np.array(e.rgb) / 255, lw=2.5, linestyle=style,
                  path_effects=halo, label=e.label)  # fmt: skip


def _canvas(width: int, height: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    return fig, FigureCanvasAgg(fig)


def _pixels(canvas: Any) -> np.ndarray:
    canvas.draw()
    rgb = np.array(np.asarray(canvas.buffer_rgba())[..., :3])
    rgb.setflags(write=False)
    return rgb


@lru_cache(maxsize=KEPT)
def column(colorbar: tuple[str, str] | None, cbar_h: int, entries: tuple[Entry, ...]) -> np.ndarray:
    """The strip right of the image, ``(ch, cw, 3)`` uint8, its left edge at the image's right
    edge and its top at the picture's: the colorbar ``P(class)`` over ``cmap`` (``colorbar =
    (class, cmap)``, ``cbar_h`` px high, its top at ``TOP_PX``) over the legend of ``entries``,
    ``GAP_PX`` from the image and ``MARGIN_PX`` from the picture's right and bottom. ``(0,
    MARGIN_PX, 3)`` when there is neither."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig, canvas = _canvas(640, 480)
    legend = None
    leg_w = leg_h = 0.0
    if entries:
        handles = [_handle(e) for e in entries]
        legend = fig.legend(handles=handles, loc="upper left", frameon=False, fontsize=11)
        box = legend.get_window_extent(canvas.get_renderer())
        leg_w, leg_h = box.width, box.height
    cbar_h = cbar_h if colorbar else 0
    col_w = max(leg_w, CBAR_PX + CBAR_TEXT_PX if colorbar else 0)
    if not col_w:
        return np.zeros((0, MARGIN_PX, 3), np.uint8)
    col_h = cbar_h + (GAP_PX if colorbar and legend else 0) + leg_h
    cw = int(math.ceil(GAP_PX + col_w + MARGIN_PX))
    ch = int(math.ceil(TOP_PX + col_h + MARGIN_PX))
    fig.set_size_inches(cw / DPI, ch / DPI)
    if colorbar:
        cls, cmap = colorbar
        left, top = GAP_PX / cw, 1.0 - TOP_PX / ch
        cax = fig.add_axes((left, top - cbar_h / ch, CBAR_PX / cw, cbar_h / ch))
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
        bar.set_label(f"P({cls})", fontsize=12)
    if legend is not None:
        y = TOP_PX + (cbar_h + GAP_PX if colorbar else 0)
        legend.set_bbox_to_anchor((GAP_PX / cw, 1.0 - y / ch), transform=fig.transFigure)
    return _pixels(canvas)


def title_band(fw: int, title: str, subtitle: str) -> np.ndarray:
    """The band above the image, ``(TOP_PX, fw, 3)`` uint8: ``title`` in bold and ``subtitle``
    under it, from ``LEFT_PX``."""
    fig, canvas = _canvas(fw, TOP_PX)
    fig.text(LEFT_PX / fw, 1.0 - 10 / TOP_PX, title, va="top", ha="left", fontsize=15,
             weight="bold")  # fmt: skip
    fig.text(LEFT_PX / fw, 1.0 - 38 / TOP_PX, subtitle, va="top", ha="left", fontsize=11,
             color="0.25")  # fmt: skip
    return _pixels(canvas)


@lru_cache(maxsize=KEPT)
def scale_strip(fw: int, w: int, um_per_px: float) -> np.ndarray:
    """The strip under the image, ``(SCALE_BAR_PX, fw, 3)`` uint8: from ``LEFT_PX``, the
    :func:`scale_bar` of an image ``w`` pixels wide at ``um_per_px``, and its label."""
    from matplotlib.lines import Line2D

    px, label = scale_bar(w, um_per_px)
    fig, canvas = _canvas(fw, SCALE_BAR_PX)
    y = 0.5
    x0, x1 = LEFT_PX / fw, (LEFT_PX + px) / fw
    fig.add_artist(Line2D([x0, x1], [y, y], color="black", lw=4, solid_capstyle="butt"))
    fig.text(x1 + 8 / fw, y, label, va="center", ha="left", fontsize=11)
    return _pixels(canvas)


def scale_bar(w: int, um_per_px: float) -> tuple[float, str]:
    """The scale bar of an image ``w`` pixels wide at ``um_per_px``: its length in pixels, a
    round length (1, 2 or 5 x 10^k um) near a sixth of the width, and its label."""
    want = um_per_px * w / 6
    step = 10 ** math.floor(math.log10(want))
    um = max(m * step for m in (1, 2, 5) if m * step <= want)
    return um / um_per_px, f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def frame(
    img: np.ndarray,
    title: str,
    subtitle: str,
    entries: tuple[Entry, ...],
    *,
    colorbar: tuple[str, str] | None,
    scale_um_per_px: float | None,
) -> np.ndarray:
    """The whole picture, ``(fh, fw, 3)`` uint8 (module docstring): ``img`` at ``(LEFT_PX,
    TOP_PX)``, the title band above it, the scale bar below it when ``scale_um_per_px``, and on
    its right the colorbar (``(class, cmap)``) over the legend of ``entries``."""
    h, w = img.shape[:2]
    cbar_h = min(h, max(160, int(0.6 * h))) if colorbar else 0
    col = column(colorbar, cbar_h, entries)
    below = SCALE_BAR_PX if scale_um_per_px else 0
    fw = LEFT_PX + w + col.shape[1]
    fh = max(TOP_PX + h + below + MARGIN_PX, col.shape[0])
    out = np.full((fh, fw, 3), 255, np.uint8)
    _lay(out, title_band(fw, title, subtitle), 0, 0)
    if scale_um_per_px:
        _lay(out, scale_strip(fw, w, float(scale_um_per_px)), TOP_PX + h, 0)
    _lay(out, col, 0, LEFT_PX + w)
    out[TOP_PX : TOP_PX + h, LEFT_PX : LEFT_PX + w] = img[..., :3]
    return out


def _lay(out: np.ndarray, strip: np.ndarray, top: int, left: int) -> None:
    """``strip`` into ``out`` at ``(top, left)`` by per-pixel minimum (both white-based)."""
    h, w = strip.shape[:2]
    region = out[top : top + h, left : left + w]
    np.minimum(region, strip[: region.shape[0], : region.shape[1]], out=region)
