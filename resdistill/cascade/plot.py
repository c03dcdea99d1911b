"""``cascade.png``: accuracy against compute of each student-teacher cascade.

Two panels sharing a log x axis of mean counted FLOPs per tile (``F_s + share * F_t``; the top
axis gives the same as a ratio to the teacher's ``F_t``): tile accuracy with its slide-bootstrap
band on the left, slide accuracy on the right. Per student one curve over the thresholds (each
point labelled with its threshold where labels do not collide), the pure student (``t = 0``) as
a large circle, the every-tile point (``>1``) as a cross; the teacher alone is a star at ``F_t``
with dashed lines at its accuracy, and on the tile panel a dotted line 1 point below it; the
cheapest threshold within that point is ringed. Magnifications read as users write them (2.5x).

Matplotlib is imported inside :func:`plot_cascade` and draws on a bare ``Figure`` (headless).
"""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["plot_cascade"]

#: Threshold labels closer than these fractions of the axes (x in log decades, y) are skipped.
LABEL_GAP = (0.045, 0.035)


def _label_points(
    ax: Any, xs: list[float], ys: list[float], labels: list[str], colour: str
) -> None:
    """Label each point with its threshold unless a label was placed too close already
    (distances as fractions of the curve's span: decades of x, and y down to 5 points under
    its lowest accuracy, as the axes are drawn)."""
    logs = [math.log10(x) for x in xs]
    xr = max(max(logs) - min(logs), 0.3)
    yr = max(1.02 - min(ys) + 0.05, 0.05)
    placed: list[tuple[float, float]] = []
    order = [0, len(xs) - 1, *range(1, len(xs) - 1)]  # the endpoints' labels first
    for i in order:
        lx, y, x, text = logs[i], ys[i], xs[i], labels[i]
        pos = (lx / xr, y / yr)
        if any(
            abs(pos[0] - a) < LABEL_GAP[0] and abs(pos[1] - b) < LABEL_GAP[1] for a, b in placed
        ):
            continue
        placed.append(pos)
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7.5, color=colour
        )


def plot_cascade(doc: dict[str, Any]) -> bytes:
    """PNG of the ``cascade.json`` document ``doc`` (see :mod:`resdistill.eval.cascade_eval`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from resdistill.measures.compute import human_flops
    from sharding.magnification import display_mag

    teacher = doc["teacher"]
    t_flops = float(teacher["flops"])
    t_name = f"{teacher['name']} {display_mag(teacher['mag'])}"
    pct = int(round(100 * (1 - doc["alpha"])))
    fig = Figure(figsize=(13.0, 5.8), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    lows: list[float] = []
    spread = [p["flops_per_tile"] for c in doc["curves"] for p in c["points"]] + [t_flops]
    decades = math.log10(max(spread) / min(spread)) if min(spread) > 0 else 2.0
    subs = (1.0, 2.0, 3.0, 5.0, 7.0) if decades <= 1.5 else (1.0, 2.0, 5.0)
    for i, c in enumerate(doc["curves"]):
        colour = f"C{i % 10}"
        pts = c["points"]
        xs = [p["flops_per_tile"] for p in pts]
        s_name = f"{c['student']} {display_mag(c['mag'])}"
        for ax, key in zip(axes, ("tile_accuracy", "slide_accuracy"), strict=True):
            ys = [p[key]["value"] for p in pts]
            ax.plot(xs, ys, "-o", color=colour, ms=4, lw=1.6, label=f"cascade {s_name} -> {t_name}")
            if key == "tile_accuracy":
                lo = [p[key]["low"] if p[key]["low"] is not None else p[key]["value"] for p in pts]
                hi = [
                    p[key]["high"] if p[key]["high"] is not None else p[key]["value"] for p in pts
                ]
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.12, lw=0)
                lows.extend(lo)
            lows.extend(ys)
            first, last = pts[0], pts[-1]
            if first["kind"] == "student":
                ax.plot(xs[0], ys[0], "o", ms=11, color=colour, mfc="white", mew=2,
                        label=f"{s_name} alone (t=0)")  # fmt: skip
            ax.plot(xs[-1], ys[-1], "X", ms=9, color=colour,
                    label=f"every tile escalated ({last['label']})")  # fmt: skip
            best = c["best"]
            if best is not None and key == "tile_accuracy":
                ax.plot(best["flops_per_tile"], best[key]["value"], "o", ms=17, mfc="none",
                        color="tab:green", mew=2,
                        label=f"cheapest within {100 * c['within']:g} pt: t={best['label']} "
                        f"({best['compute_ratio']:.2f}x teacher)")  # fmt: skip
            _label_points(ax, xs, ys, [p["label"] for p in pts], colour)
    for ax, key, title in zip(
        axes, ("tile_accuracy", "slide_accuracy"), ("tile accuracy", "slide accuracy"), strict=True
    ):
        ref = doc["curves"][0]["teacher"][key]["value"] if doc["curves"] else None
        if ref is not None:
            ax.plot(t_flops, ref, "*", ms=17, color="black", label=f"{t_name} alone")
            ax.axhline(ref, color="black", lw=0.9, ls="--", alpha=0.6)
            lows.append(ref)
            if key == "tile_accuracy":
                within = doc["within"]
                ax.axhline(ref - within, color="black", lw=0.9, ls=":", alpha=0.6,
                           label=f"{t_name} - {100 * within:g} point")  # fmt: skip
        ax.set_xscale("log")
        ax.margins(x=0.08)
        ax.xaxis.set_major_locator(LogLocator(subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_flops(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("mean FLOPs per tile (counted, 2 per multiply-accumulate)")
        band = f", band: {pct}% CI resampling slides" if key == "tile_accuracy" else ""
        ax.set_ylabel(f"{title}{band}")
        ax.set_title(f"{title} vs compute, {doc['split']} split", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / t_flops, lambda r: r * t_flops))
        top.xaxis.set_major_locator(LogLocator(subs=subs))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
        top.xaxis.set_minor_formatter(NullFormatter())
        top.set_xlabel(f"compute relative to the {teacher['name']} alone")
        ax.legend(fontsize=8, loc="lower right")
    bottom = max(0.0, min((v for v in lows if v is not None), default=0.0) - 0.05)
    for ax in axes:
        ax.set_ylim(bottom, 1.02)
    fig.suptitle(
        "student-teacher cascade: tiles whose top student probability is under the threshold "
        "(labels) go to the teacher",
        fontsize=11,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
