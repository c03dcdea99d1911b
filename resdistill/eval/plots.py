"""Pictures of an evaluation, as PNG bytes.

* :func:`plot_roc` (:func:`roc_figure`) - one panel per class, one-vs-rest ROC of every model
  (tiles solid, slides dashed).
* :func:`plot_accuracy_vs_flops` (:func:`accuracy_vs_flops_figure`) - tile accuracy with its
  bootstrap interval against FLOPs per tile (log scale), slide accuracy as an open square.

Magnifications are written as users write them (2.5x, :func:`sharding.magnification.display_mag`).
Pictures of a slide prediction (heatmaps, annotation outlines) are drawn by
:mod:`resdistill.predict`.

Matplotlib is imported inside each function and draws on a bare ``Figure`` (no pyplot, no
display backend), so plotting works on headless nodes and does not slow the CLI down.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from resdistill.eval.results import EvaluationReport
from sharding.magnification import display_mag

__all__ = [
    "accuracy_vs_flops_figure",
    "plot_accuracy_vs_flops",
    "plot_roc",
    "roc_figure",
]


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
