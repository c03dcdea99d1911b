"""Pictures of an evaluation and of a slide prediction, as PNG bytes or RGB arrays.

* :func:`plot_roc` (:func:`roc_figure`) - one panel per class, one-vs-rest ROC of every model
  (tiles solid, slides dashed).
* :func:`plot_accuracy_vs_flops` (:func:`accuracy_vs_flops_figure`) - tile accuracy with its
  bootstrap interval against FLOPs per tile (log scale), slide accuracy as an open square.

Magnifications are written as users write them (2.5x, :func:`sharding.magnification.display_mag`).
* :func:`render_heatmap` - a slide thumbnail with one value per tissue tile painted over the
  thumbnail pixels the tile covers.
* :func:`draw_outlines` - a slide's annotation outlines over such a picture (colour scheme:
  :data:`CLASS_COLOURS`, :func:`outline_colour`); :func:`draw_annotations` adds a legend strip
  below it.

Matplotlib is imported inside each function and draws on a bare ``Figure`` (no pyplot, no
display backend), so plotting works on headless nodes and does not slow the CLI down.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from resdistill.eval.results import EvaluationReport
from sharding.magnification import display_mag

if TYPE_CHECKING:
    from sharding.annotations import Outline

__all__ = [
    "CLASS_COLOURS",
    "DEFAULT_CMAP",
    "accuracy_vs_flops_figure",
    "draw_annotations",
    "draw_outlines",
    "outline_colour",
    "outline_width",
    "plot_accuracy_vs_flops",
    "plot_roc",
    "render_heatmap",
    "roc_figure",
]

DEFAULT_CMAP = "viridis"

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


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(report: EvaluationReport) -> bytes:
    """PNG of :func:`roc_figure`."""
    return _png(roc_figure(report))


def roc_figure(report: EvaluationReport) -> Any:
    """One panel per class; per model its one-vs-rest ROC (tile level solid, slide dashed)."""
    from matplotlib.figure import Figure

    from resdistill.measures.metrics import roc_curve

    classes = report.models[0].model.classes
    k = len(classes)
    cols = min(k, 3)
    rows = int(math.ceil(k / cols))
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours = [f"C{i % 10}" for i in range(len(report.models))]
    for c, name in enumerate(classes):
        ax = axes[c]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        for ev, colour in zip(report.models, colours, strict=True):
            auc = ev.tile["auc"][name]["value"]
            if auc is not None:
                fpr, tpr, _ = roc_curve(ev.predictions.labels == c, ev.predictions.probs[:, c])
                ax.plot(
                    fpr,
                    tpr,
                    color=colour,
                    lw=1.5,
                    label=f"{ev.name} {display_mag(ev.model.mag)} tiles AUC {auc:.3f}",
                )
            s_auc = ev.slide["auc"][name]["value"]
            if s_auc is not None and ev.slide.get("roc", {}).get(name):
                r = ev.slide["roc"][name]
                ax.plot(
                    r["fpr"],
                    r["tpr"],
                    color=colour,
                    lw=1.0,
                    ls="--",
                    label=f"{ev.name} slides AUC {s_auc:.3f}",
                )
        ax.set_title(f"{name} vs rest")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7)
    for ax in axes[k:]:
        ax.set_visible(False)
    fig.suptitle(f"ROC on {report.split} of {report.data}", fontsize=9)
    return fig


def plot_accuracy_vs_flops(report: EvaluationReport) -> bytes:
    """PNG of :func:`accuracy_vs_flops_figure`."""
    return _png(accuracy_vs_flops_figure(report))


def accuracy_vs_flops_figure(report: EvaluationReport) -> Any:
    """Tile accuracy (with its slide-bootstrap interval) against FLOPs per tile, log x axis; each
    model's point labelled with its magnification as users write it (2.5x)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    for i, ev in enumerate(report.models):
        acc = ev.tile["accuracy"]
        x = ev.compute["flops"]
        lo = acc["low"] if acc["low"] is not None else acc["value"]
        hi = acc["high"] if acc["high"] is not None else acc["value"]
        ax.errorbar(
            [x], [acc["value"]], yerr=[[acc["value"] - lo], [hi - acc["value"]]],
            fmt="o", color=f"C{i % 10}", capsize=4, label=f"{ev.name} ({display_mag(ev.model.mag)})",
        )  # fmt: skip
        s = ev.slide["accuracy"]["value"]
        if s is not None:
            ax.plot([x], [s], marker="s", mfc="none", color=f"C{i % 10}", ls="none")
        ax.annotate(
            display_mag(ev.model.mag),
            (x, acc["value"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.margins(x=0.25)
    lows = [
        v
        for ev in report.models
        for v in (ev.tile["accuracy"]["low"], ev.slide["accuracy"]["value"])
        if v is not None
    ]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.02)
    ax.set_xlabel("FLOPs per tile (counted, 2 per multiply-accumulate)")
    pct = int(round(100 * (1 - report.alpha)))
    ax.set_ylabel(f"accuracy (tiles: dot, {pct}% CI resampling slides; slides: square)")
    ax.set_title(f"accuracy vs compute on {report.split}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def render_heatmap(
    thumbnail: np.ndarray,
    slide_size: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    size0: int,
    values: np.ndarray,
    *,
    alpha: float = 0.55,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """The ``(th, tw, 3)`` uint8 ``thumbnail`` with tile ``i``'s ``values[i]`` in [0, 1] painted on.

    Tile ``i`` is the level-0 square at ``(xs[i], ys[i])`` of side ``size0`` on a slide of
    ``slide_size = (width, height)`` level-0 pixels. It covers thumbnail columns
    ``round(x / sx) .. round((x + size0) / sx)`` and rows
    ``round(y / sy) .. round((y + size0) / sy)`` with ``sx = width / tw``, ``sy = height / th``
    (adjacent tiles share edges, no gaps; :mod:`resdistill.eval.tile_paint`); there the pixel
    becomes ``(1 - alpha) * thumbnail + alpha * colormap(value)``. Pixels of no tile keep the
    thumbnail.
    """
    import matplotlib

    from resdistill.eval.tile_paint import blend, owner_map, tile_boxes

    owner = owner_map(thumbnail.shape, tile_boxes(thumbnail.shape, slide_size, xs, ys, size0))
    colours = matplotlib.colormaps[cmap](np.asarray(values, dtype=np.float64))[:, :3] * 255.0
    return blend(thumbnail, owner, colours, alpha)


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
