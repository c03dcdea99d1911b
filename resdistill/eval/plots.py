"""Pictures of an evaluation and of a slide prediction, as PNG bytes or RGB arrays.

* :func:`plot_roc` - one panel per class, one-vs-rest ROC of every model (tiles solid, slides
  dashed).
* :func:`plot_accuracy_vs_flops` - tile accuracy with its bootstrap interval against FLOPs per
  tile (log scale), slide accuracy as an open square.
* :func:`render_heatmap` - a slide thumbnail with one value per tissue tile painted over the
  thumbnail pixels the tile covers.

Matplotlib is imported inside each function and draws on a bare ``Figure`` (no pyplot, no
display backend), so plotting works on headless nodes and does not slow the CLI down.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from resdistill.eval.results import EvaluationReport

__all__ = ["DEFAULT_CMAP", "plot_accuracy_vs_flops", "plot_roc", "render_heatmap"]

DEFAULT_CMAP = "viridis"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(report: EvaluationReport) -> bytes:
    """PNG: one panel per class; per model its one-vs-rest ROC (tile level solid, slide dashed)."""
    from matplotlib.figure import Figure

    from resdistill.eval.metrics import roc_curve

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
                    label=f"{ev.name} {ev.model.mag} tiles AUC {auc:.3f}",
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
    return _png(fig)


def plot_accuracy_vs_flops(report: EvaluationReport) -> bytes:
    """PNG: tile accuracy (with its bootstrap interval) against FLOPs per tile, log x axis."""
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
            fmt="o", color=f"C{i % 10}", capsize=4, label=f"{ev.name} ({ev.model.mag})",
        )  # fmt: skip
        s = ev.slide["accuracy"]["value"]
        if s is not None:
            ax.plot([x], [s], marker="s", mfc="none", color=f"C{i % 10}", ls="none")
        ax.annotate(
            f"{ev.model.mag}",
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
    ax.set_ylabel("accuracy (tiles: dot with 95% CI; slides: square)")
    ax.set_title(f"accuracy vs compute on {report.split}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


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
    (adjacent tiles share edges, no gaps); there the pixel becomes
    ``(1 - alpha) * thumbnail + alpha * colormap(value)``. Pixels of no tile keep the thumbnail.
    """
    import matplotlib

    thumb = thumbnail.astype(np.float32)
    th, tw = thumb.shape[:2]
    sx, sy = slide_size[0] / tw, slide_size[1] / th
    colours = matplotlib.colormaps[cmap](values)[:, :3] * 255.0
    out = thumb.copy()
    for x, y, colour in zip(xs, ys, colours, strict=True):
        x, y = int(x), int(y)
        x0, x1 = int(round(x / sx)), int(round((x + size0) / sx))
        y0, y1 = int(round(y / sy)), int(round((y + size0) / sy))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        region = out[y0:y1, x0:x1]
        region[:] = (1.0 - alpha) * thumb[y0:y1, x0:x1] + alpha * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
