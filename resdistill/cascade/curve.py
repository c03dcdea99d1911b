"""The accuracy-vs-compute curve of a student-teacher cascade, from both models' tile predictions.

The dataset holds every sample at every magnification, so the cascade is computed offline: the
student and the teacher each score every tile of the split once, and each threshold ``t`` of the
grid applies :func:`resdistill.cascade.rules.escalate` / :func:`~resdistill.cascade.rules.combine`
to those scores. Per point (:func:`cascade_curve`):

* ``share = e / n``, the fraction of the ``n`` tiles escalated (student top probability ``< t``);
* tile accuracy of the combined probabilities, its interval from the slide (cluster) bootstrap of
  :func:`resdistill.measures.bootstrap.bootstrap_ci` with the draws ``evaluate`` uses, so the
  ``t = 0`` point repeats the student's own tile accuracy and interval;
* slide accuracy of ``P(slide) = mean of its tiles' combined probabilities``, slides resampled;
* ``flops_per_tile = cascade_flops(n, e, F_s, F_t) / n = F_s + share * F_t`` (counted FLOPs) and
  ``compute_ratio = flops_per_tile / F_t``, the cost relative to running the teacher alone.

``t = 0`` escalates nothing (the pure student). The every-tile point (``threshold`` ``None``,
label ``>1``) escalates all tiles: the teacher's accuracy at ``F_s + F_t``. The teacher alone
(``F_t``, ratio 1) is reported beside the curve; the *best* point is the cheapest threshold of
the grid whose tile accuracy is within ``within`` (default 1 point) of the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from resdistill.cascade.rules import cascade_flops, check_threshold, combine, escalate

__all__ = [
    "DEFAULT_THRESHOLDS",
    "TileScores",
    "WITHIN",
    "align_teacher",
    "best_point",
    "cascade_curve",
    "parse_thresholds",
    "slide_bootstrap_accuracy",
]


class TileScores(Protocol):
    """One model's scores of the labelled tiles of a split, as evaluation records them
    (:class:`resdistill.eval.results.TilePredictions`): sample keys, and per tile its slide id,
    class index and ``(K,)`` probabilities."""

    keys: list[str]
    slides: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


#: Thresholds on the student's top probability drawn by default (the every-tile point is added).
DEFAULT_THRESHOLDS: tuple[float, ...] = (
    0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99,
)  # fmt: skip
#: "Within 1 point of the teacher": the tile-accuracy tolerance of the best threshold.
WITHIN = 0.01
#: Label of the point where every tile is escalated (any threshold above 1).
ALL_LABEL = ">1"


def parse_thresholds(text: str) -> list[float]:
    """A comma list of thresholds in ``[0, 1]`` -> sorted, without duplicates.

    Raises ``ValueError`` (one line) for a value that is not a number or lies outside ``[0, 1]``
    (:func:`~resdistill.cascade.rules.check_threshold`); the every-tile point (``>1``) is
    always on the curve without being asked for.
    """
    values: list[float] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number") from None
        values.append(check_threshold(v))
    if not values:
        raise ValueError("no threshold given: use e.g. 0,0.5,0.8,0.9")
    return sorted(set(values))


def align_teacher(student: TileScores, teacher: TileScores) -> np.ndarray:
    """The teacher's ``(n, K)`` probabilities in the student's tile order, matched by sample key.

    Raises ``ValueError`` when the two did not score the same tiles (another split or dataset)."""
    index = {k: i for i, k in enumerate(teacher.keys)}
    missing = [k for k in student.keys if k not in index]
    if missing or len(index) != len(student.keys):
        raise ValueError(
            f"the teacher scored {len(index)} tiles and the student {len(student.keys)}, "
            f"{len(missing)} of the student's not by the teacher (e.g. {missing[:1]})"
        )
    order = np.fromiter((index[k] for k in student.keys), dtype=np.int64, count=len(student.keys))
    if not np.array_equal(np.asarray(teacher.labels)[order], student.labels):
        raise ValueError("the teacher's and the student's tiles carry different labels")
    return np.asarray(teacher.probs, dtype=np.float64)[order]


def _ci(point: float, low: float, high: float) -> dict[str, float | None]:
    def num(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    return {"value": num(point), "low": num(low), "high": num(high)}


def slide_bootstrap_accuracy(
    correct: np.ndarray, slides: np.ndarray, *, n_boot: int, alpha: float, seed: int,
    labels: np.ndarray | None = None,
) -> dict[str, float | None]:  # fmt: skip
    """Tile accuracy ``mean(correct)`` with the slide (cluster) bootstrap interval.

    Each slide is reduced to ``(tiles right, tiles)`` in sorted order of id and those rows are
    resampled by :func:`~resdistill.measures.bootstrap.bootstrap_ci` (within each slide's class,
    its tiles' most frequent ``labels``, when given): the same draws, and so the same interval,
    as ``evaluate``'s resampling of slides with all their tiles, in O(slides) per resample
    instead of O(tiles)."""
    from resdistill.measures.bootstrap import bootstrap_ci, unit_strata

    _, inv = np.unique(np.asarray(slides), return_inverse=True)
    inv = inv.reshape(-1)
    strata = None if labels is None else unit_strata(inv, int(inv.max()) + 1, np.asarray(labels))
    per_slide = np.stack(
        [np.bincount(inv, weights=correct.astype(np.float64)), np.bincount(inv).astype(np.float64)],
        axis=1,
    )
    return _ci(
        *bootstrap_ci(
            lambda t, _p: float(t[:, 0].sum() / t[:, 1].sum()),
            per_slide,
            np.zeros((per_slide.shape[0], 1)),
            n=n_boot,
            alpha=alpha,
            seed=seed,
            strata=strata,
        )
    )


def _slide_accuracy(
    slides: np.ndarray, probs: np.ndarray, labels: np.ndarray, mixed: bool, kw: dict[str, Any]
) -> dict[str, float | None]:
    """Accuracy of the slides' mean tile probabilities, slides resampled (as ``evaluate``)."""
    from resdistill.measures.bootstrap import bootstrap_ci
    from resdistill.measures.metrics import accuracy, aggregate_slides

    agg = aggregate_slides(slides, probs, labels, mixed_labels=mixed)
    fn = lambda t, p: accuracy(t, p.argmax(1))  # noqa: E731
    return _ci(*bootstrap_ci(fn, agg.y_true, agg.y_prob, strata=agg.y_true, **kw))


def cascade_curve(
    student: TileScores,
    teacher: TileScores,
    student_flops: int,
    teacher_flops: int,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    within: float = WITHIN,
    mixed: bool = False,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """The cascade's points over ``thresholds`` plus the every-tile point, as a JSON-ready dict::

        {"n_tiles", "n_slides", "student_flops", "teacher_flops", "within",
         "points": [{"threshold": t | None, "label", "kind": "student" | "cascade" | "all",
                     "escalated", "share", "tile_accuracy": {value, low, high},
                     "slide_accuracy": {...}, "flops_per_tile", "compute_ratio"}, ...],
         "teacher": {"tile_accuracy", "slide_accuracy", "flops_per_tile", "compute_ratio": 1},
         "best": the cheapest grid point with tile accuracy >= teacher's - within, or None}

    ``teacher`` is matched to ``student`` by sample key (:func:`align_teacher`); the formulas are
    in the module docstring. Intervals: ``n_boot`` resamples of slides at level ``1 - alpha``.
    """
    t_probs = align_teacher(student, teacher)
    s_probs = np.asarray(student.probs, dtype=np.float64)
    labels = np.asarray(student.labels)
    slides = np.asarray(student.slides)
    n = len(student.keys)
    kw = {"n_boot": n_boot, "alpha": alpha, "seed": seed}
    sk = {"n": n_boot, "alpha": alpha, "seed": seed}

    def measure(probs: np.ndarray) -> dict[str, Any]:
        return {
            "tile_accuracy": slide_bootstrap_accuracy(
                probs.argmax(1) == labels, slides, labels=labels, **kw
            ),
            "slide_accuracy": _slide_accuracy(slides, probs, labels, mixed, sk),
        }

    teacher_point = {**measure(t_probs), "flops_per_tile": float(teacher_flops)}
    teacher_point["compute_ratio"] = 1.0
    points: list[dict[str, Any]] = []
    grid: list[float | None] = [*sorted(set(float(t) for t in thresholds)), None]
    for t in grid:
        mask = escalate(s_probs, math.inf if t is None else t)
        e = int(mask.sum())
        if t is None:
            scores = {k: teacher_point[k] for k in ("tile_accuracy", "slide_accuracy")}
        else:
            scores = measure(combine(s_probs, t_probs, mask))
        flops = cascade_flops(n, e, student_flops, teacher_flops) / n
        points.append(
            {
                "threshold": t,
                "label": ALL_LABEL if t is None else f"{t:g}",
                "kind": "all" if t is None else ("student" if t == 0 else "cascade"),
                "escalated": e,
                "share": e / n,
                **scores,
                "flops_per_tile": flops,
                "compute_ratio": flops / teacher_flops,
            }
        )
    return {
        "n_tiles": n,
        "n_slides": int(np.unique(slides).size),
        "student_flops": int(student_flops),
        "teacher_flops": int(teacher_flops),
        "within": within,
        "points": points,
        "teacher": teacher_point,
        "best": best_point(points, teacher_point, within),
    }


def best_point(
    points: Sequence[dict[str, Any]], teacher: dict[str, Any], within: float = WITHIN
) -> dict[str, Any] | None:
    """The cheapest point with a threshold (the every-tile point excluded) whose tile accuracy is
    at least the teacher's minus ``within``; ties in FLOPs go to the more accurate. ``None`` when
    no threshold gets that close."""
    floor = teacher["tile_accuracy"]["value"] - within - 1e-12
    ok = [p for p in points if p["threshold"] is not None and p["tile_accuracy"]["value"] >= floor]
    if not ok:
        return None
    return min(ok, key=lambda p: (p["flops_per_tile"], -p["tile_accuracy"]["value"]))
