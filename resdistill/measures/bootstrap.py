"""Bootstrap confidence intervals of the metrics in :mod:`resdistill.measures.metrics`, and the
all-metrics report an evaluation stores (:func:`evaluate_predictions`).

Intervals are percentile bootstrap intervals over resampling units: ``n`` resamples of the units
with replacement drawn by ``numpy.random.default_rng(seed)``, the same draws for a seed in
:func:`bootstrap_ci` and :func:`evaluate_predictions`, so their numbers agree.

The unit is the sample unless ``groups`` gives each sample a cluster (its slide): then the
cluster bootstrap draws clusters (in sorted order of id) and each drawn cluster brings all its
samples. Tiles of one slide share the patient, the stain and the scan, so they are not independent;
resampling them one by one gives intervals about ``sqrt(tiles per slide)`` times too narrow when
whole slides are right or wrong. Every tile-level interval of ``evaluate`` is therefore a slide
bootstrap; slide-level intervals resample slides, each its own unit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from resdistill.measures.metrics import (
    MetricFn,
    confusion_matrix,
    labels_1d,
    prf_from_confusion,
    probs_2d,
    roc_curve,
)

__all__ = ["bootstrap_ci", "evaluate_predictions"]


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: Any,
    y_prob: Any,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the metric on all data and a percentile bootstrap interval.

    ``n`` resamples of the N samples are drawn with replacement (``numpy.random.default_rng(seed)``,
    so the result is deterministic for a seed), or with ``groups`` (one cluster id per sample) of
    the clusters, ``idx`` then holding every sample of each drawn cluster;
    ``metric_fn(y_true[idx], y_prob[idx])`` is evaluated on each, and ``low``/``high`` are the ``alpha/2`` and ``1 - alpha/2`` percentiles
    (linear interpolation) of the finite values. Resamples where the metric is undefined (NaN,
    e.g. an AUC whose class was not drawn) are left out; if none is finite, low = high = NaN.
    The point estimate is *not* forced into the interval (with a skewed distribution a percentile
    interval can in principle exclude it).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = np.asarray(y_true)
    p = np.asarray(y_prob)
    if t.shape[0] == 0:
        raise ValueError("bootstrap_ci: empty input")
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"y_true has {t.shape[0]} samples but y_prob has {p.shape[0]}")
    point = float(metric_fn(t, p))
    inverse, n_units = _units(groups, t.shape[0])
    if groups is None:
        draws = _resamples(n_units, n, seed)
    else:  # every sample of each drawn cluster
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse, minlength=n_units))[:-1])
        draws = (np.concatenate([members[u] for u in d]) for d in _resamples(n_units, n, seed))
    values = np.array([metric_fn(t[idx], p[idx]) for idx in draws])
    low, high = _percentile_interval(values, alpha)
    return point, low, high


def _units(groups: Any, size: int) -> tuple[np.ndarray, int]:
    """``(unit index of each sample, number of units)``: each sample its own unit without
    ``groups``, else the clusters in sorted order of id (so the draws do not depend on the order
    of the samples)."""
    if groups is None:
        return np.arange(size), size
    g = np.asarray(groups)
    if g.shape != (size,):
        raise ValueError(f"groups has shape {g.shape} but there are {size} samples")
    uniq, inverse = np.unique(g, return_inverse=True)
    return inverse.reshape(-1), int(uniq.size)


def _resamples(size: int, n: int, seed: int) -> Iterator[np.ndarray]:
    """The ``n`` bootstrap draws of unit indices used everywhere in this module (same seed, same
    draws)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, size, size=size)


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """``alpha/2`` and ``1 - alpha/2`` percentiles of the finite ``values`` (NaN, NaN if none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


class _WeightedMetrics:
    """All report metrics of one sample set under integer sample weights, in O(N K) per call.

    A bootstrap resample ``idx`` is the original samples weighted by ``w = bincount(idx)``; every
    metric here is a function of such weights: the confusion matrix is a weighted count, and the
    Mann-Whitney AUC is ``sum_pos w_i (W_neg below s_i + W_neg tied with s_i / 2) / (W_pos W_neg)``
    over tie groups of the scores sorted once. Gives the same numbers as the plain functions on
    ``(y_true[idx], y_prob[idx])`` without re-sorting for each resample.
    """

    def __init__(self, y_true: np.ndarray, y_prob: np.ndarray) -> None:
        self.k = y_prob.shape[1]
        self.cells = y_true * self.k + y_prob.argmax(axis=1)
        self.sorted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for c in range(self.k):
            order = np.argsort(y_prob[:, c], kind="mergesort")
            scores = y_prob[order, c]
            starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
            self.sorted.append((order, y_true[order] == c, starts))

    def __call__(self, w: np.ndarray) -> dict[str, Any]:
        k = self.k
        cm = np.bincount(self.cells, weights=w, minlength=k * k).reshape(k, k)
        labels = np.flatnonzero((cm.sum(axis=0) + cm.sum(axis=1)) > 0)
        precision, recall, f1 = prf_from_confusion(cm, labels)
        aucs = np.empty(k)
        for c, (order, positive, starts) in enumerate(self.sorted):
            ws = w[order]
            pos = np.add.reduceat(np.where(positive, ws, 0.0), starts)
            neg = np.add.reduceat(np.where(positive, 0.0, ws), starts)
            w_pos, w_neg = pos.sum(), neg.sum()
            if w_pos == 0 or w_neg == 0:
                aucs[c] = math.nan
                continue
            neg_below = np.cumsum(neg) - neg
            aucs[c] = float(np.sum(pos * (neg_below + 0.5 * neg)) / (w_pos * w_neg))
        defined = np.isfinite(aucs)
        return {
            "accuracy": float(np.trace(cm) / cm.sum()),
            "macro_f1": float(f1.mean()),
            "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()),
            "macro_auc": float(aucs[defined].mean()) if defined.any() else math.nan,
            "auc": aucs,
        }


# ----------------------------------------------------------------------------- reports
def _num(x: float) -> float | None:
    """JSON-friendly float: NaN -> None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _ci_dict(point: float, low: float, high: float) -> dict[str, float | None]:
    return {"value": _num(point), "low": _num(low), "high": _num(high)}


def _encode_labels(y_true: Any, classes: Sequence[str]) -> np.ndarray:
    arr = np.asarray(y_true)
    if arr.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("y_true is empty: nothing to evaluate")
    if arr.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in arr.tolist() if v not in index})
        if unknown:
            raise ValueError(f"y_true holds labels not in classes {list(classes)}: {unknown[:5]}")
        return np.array([index[v] for v in arr.tolist()], dtype=np.int64)
    t = labels_1d(arr)
    if t.max() >= len(classes):
        raise ValueError(f"class index {t.max()} out of range for {len(classes)} classes")
    return t


def evaluate_predictions(
    y_true: Any,
    y_prob: Any,
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    with_roc: bool = True,
    groups: Any = None,
    unit: str | None = None,
) -> dict[str, Any]:
    """All metrics with ``1 - alpha`` bootstrap intervals, as a JSON-serialisable dict.

    ``y_true``: class indices or class names (from ``classes``); ``y_prob``: ``(N, len(classes))``;
    ``groups``: one cluster id per sample (its slide) to resample clusters (module doc), else each
    sample is a unit; ``unit``: the name of the resampling unit stated in the report (default
    ``"cluster"`` with groups, ``"sample"`` without). Returns::

        {"n": N, "classes": [...], "alpha": alpha, "n_boot": n_boot, "seed": seed,
         "resample": unit, "n_units": number of units,
         "support": {class: count},
         "accuracy" | "macro_f1" | "macro_precision" | "macro_recall" | "macro_auc":
             {"value": v, "low": lo, "high": hi},
         "auc": {class: {"value", "low", "high"}},      # None where undefined (see module doc)
         "confusion_matrix": [[...]],                  # rows true, columns predicted
         "roc": {class: {"fpr": [...], "tpr": [...]}}  # only if with_roc and AUC defined
        }

    Macro F1/precision/recall average over all ``classes`` that occur in the (resampled) true or
    predicted labels. Every interval uses the same resampled units as :func:`bootstrap_ci` with
    the same ``seed`` and ``groups`` (so the numbers agree with it), computed by reweighting the
    samples (each by the number of times its unit was drawn) rather than re-sorting them for each
    resample.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty")
    t = _encode_labels(y_true, classes)
    p = probs_2d(y_prob, t.size)
    if p.shape[1] != len(classes):
        raise ValueError(f"y_prob has {p.shape[1]} columns but there are {len(classes)} classes")
    pred = p.argmax(axis=1)

    inverse, n_units = _units(groups, t.size)
    stats = _WeightedMetrics(t, p)
    point = stats(np.ones(t.size))
    boots = [
        stats(np.bincount(draw, minlength=n_units)[inverse])
        for draw in _resamples(n_units, n_boot, seed)
    ]

    def ci(key: str, column: int | None = None) -> dict[str, float | None]:
        if column is None:
            value, values = point[key], np.array([b[key] for b in boots])
        else:
            value, values = point[key][column], np.array([b[key][column] for b in boots])
        if not math.isfinite(value):
            return _ci_dict(math.nan, math.nan, math.nan)
        return _ci_dict(value, *_percentile_interval(values, alpha))

    out: dict[str, Any] = {
        "n": int(t.size),
        "classes": classes,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        "resample": unit or ("sample" if groups is None else "cluster"),
        "n_units": n_units,
        "support": {
            c: int(v) for c, v in zip(classes, np.bincount(t, minlength=len(classes)), strict=True)
        },
    }
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "macro_auc"):
        out[key] = ci(key)
    auc: dict[str, dict[str, float | None]] = {}
    roc: dict[str, dict[str, list[float]]] = {}
    for k, name in enumerate(classes):
        auc[name] = ci("auc", k)
        if with_roc and auc[name]["value"] is not None:
            fpr, tpr, _ = roc_curve(t == k, p[:, k])
            roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["auc"] = auc
    out["confusion_matrix"] = confusion_matrix(t, pred, len(classes)).tolist()
    if with_roc:
        out["roc"] = roc
    return out
