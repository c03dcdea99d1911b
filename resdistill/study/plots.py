"""The study's two figures, from the report's rows (:class:`resdistill.study.results_table.Row`).

* ``accuracy_vs_flops.png``: test accuracy against FLOPs per tile (log axis), one panel per
  label fraction: the teacher, and per student magnification the baseline, the distilled
  student (every unlabelled slide) and the controls, error bars the 95% two-level bootstrap
  intervals of the mean over seeds, each point named by its magnification.
* ``accuracy_vs_unlabeled.png``: the distilled student's accuracy against the share of unlabelled
  slides it read, one line per magnification and label fraction, the baseline of the same
  magnification and labels dashed, the controls as single points at the share they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: kind -> (colour, marker); the controls after the arms they control
STYLES = {
    "teacher": ("k", "s"),
    "same-res-teacher": ("tab:gray", "s"),
    "baseline": ("tab:blue", "o"),
    "distilled": ("tab:orange", "^"),
    "same-res-distilled": ("tab:green", "v"),
    "self-training": ("tab:purple", "D"),
}


def _has_shares(kind: str) -> bool:
    """Whether ``kind`` has an unlabelled-share axis (several rows per magnification)."""
    return kind in ("distilled", "same-res-distilled", "self-training")


def _err(rows: Sequence[Any]) -> list[list[float]]:
    return [
        [r.accuracy - r.accuracy_low for r in rows],
        [r.accuracy_high - r.accuracy for r in rows],
    ]


def _save(fig: Any, path: Path) -> None:
    from resdistill.eval.plots import _png

    path.write_bytes(_png(fig))


def plot_flops(rows: Sequence[Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fractions = sorted({r.label_fraction for r in rows}, reverse=True)
    fig = Figure(figsize=(5.5 * len(fractions), 4.2))
    axes = fig.subplots(1, len(fractions), squeeze=False)[0]
    for ax, fraction in zip(axes, fractions, strict=True):
        for kind, (colour, marker) in STYLES.items():
            picked = [r for r in rows if r.kind == kind and r.label_fraction == fraction]
            if _has_shares(kind):  # every unlabelled slide: the claims' point
                top = {}
                for r in picked:
                    if r.mag not in top or (r.unlabelled_share or 0) > (
                        top[r.mag].unlabelled_share or 0
                    ):
                        top[r.mag] = r
                picked = list(top.values())
            if not picked:
                continue
            picked.sort(key=lambda r: r.flops)
            ax.errorbar([r.flops for r in picked], [r.accuracy for r in picked], yerr=_err(picked),
                        color=colour, marker=marker, capsize=3, label=kind,
                        linestyle="-" if len(picked) > 1 else "none")  # fmt: skip
            for r in picked:
                ax.annotate(r.mag, (r.flops, r.accuracy), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per tile")
        ax.set_ylabel("test accuracy (mean over seeds, 95% CI)")
        ax.set_title(f"{100 * fraction:g}% of the training slides labelled")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_unlabelled(rows: Sequence[Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    curves = sorted({(r.mag, r.label_fraction) for r in rows if r.kind == "distilled"})
    colours = [f"C{i}" for i in range(10)]
    for i, (mag, fraction) in enumerate(curves):
        colour = colours[i % len(colours)]
        pts = sorted((r for r in rows if r.kind == "distilled" and r.mag == mag
                      and r.label_fraction == fraction), key=lambda r: r.unlabelled_share or 0)  # fmt: skip
        ax.errorbar([100 * (r.unlabelled_share or 0) for r in pts], [r.accuracy for r in pts],
                    yerr=_err(pts), color=colour, marker="o", capsize=3,
                    label=f"distilled {mag}, {100 * fraction:g}% labelled")  # fmt: skip
        base = [
            r
            for r in rows
            if r.kind == "baseline" and r.mag == mag and r.label_fraction == fraction
        ]
        if base:
            ax.axhline(base[0].accuracy, color=colour, linestyle="--", alpha=0.7,
                       label=f"baseline {mag}, {100 * fraction:g}% labelled")  # fmt: skip
        for kind in ("same-res-distilled", "self-training"):
            ctl = [r for r in rows if r.kind == kind and r.mag == mag
                   and r.label_fraction == fraction]  # fmt: skip
            if ctl:
                ax.errorbar([100 * (r.unlabelled_share or 0) for r in ctl],
                            [r.accuracy for r in ctl], yerr=_err(ctl), color=colour,
                            marker=STYLES[kind][1], linestyle="none", capsize=3,
                            label=f"{kind} {mag}, {100 * fraction:g}% labelled")  # fmt: skip
    ax.set_xlabel("unlabelled training slides used by distillation (%)")
    ax.set_ylabel("test accuracy (mean over seeds, 95% CI)")
    ax.set_title("accuracy vs unlabelled data")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
