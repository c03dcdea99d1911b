"""Bootstrap confidence intervals of the metrics in :mod:`resdistill.measures.metrics`, and the
all-metrics report an evaluation stores (:func:`evaluate_predictions`).

Intervals are percentile bootstrap intervals over resampling units: ``n`` resamples of the units
with replacement drawn by ``numpy.random.default_rng(seed)``, the same draws for a seed in
:func:`bootstrap_ci` and :func:`evaluate_predictions`, so their numbers agree.

Units. The unit is the sample unless ``groups`` gives each sample a cluster (its slide, or its
patient): then the cluster bootstrap draws clusters (in sorted order of id) and each drawn cluster
brings all its samples. Tiles of one slide share the patient, the stain and the scan, so they are
not independent; resampling them one by one gives intervals about ``sqrt(tiles per slide)`` times
too narrow when whole slides are right or wrong.

Strata. With ``strata`` (:func:`evaluate_predictions` uses the true class) the units are resampled
within their stratum, a unit's stratum being its samples' most frequent value (ties to the lowest):
each resample holds as many units of each class as the data (the stratified bootstrap, Davison &
Hinkley 1997, ch. 3). Without it a resample of a handful of slides often misses a class, and a
macro average over a different set of classes is a different quantity (the demo once printed a
macro F1 of ``0.899 [0.467, 0.903]``). With one stratum the draws are the unstratified ones.

Validity. An interval is reported only when every resample gives a value and the point estimate
lies inside it; otherwise both bounds are NaN (``None`` in reports) and the report says why: a
resample that misses a class the metric averages over has no value (see
:func:`~resdistill.measures.metrics.confusion_metrics`), and a percentile interval that excludes
its own estimate means the resampling distribution is not centred on it (too few units).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from resdistill.measures.metrics import (
    MetricFn,
    confusion_matrix,
    confusion_metrics,
    labels_1d,
    probs_2d,
    roc_curve,
)

__all__ = [
    "bootstrap_ci",
    "draw_stratified",
    "evaluate_predictions",
    "interval",
    "stratum_members",
    "unit_strata",
]

#: why an interval is undefined, as reports state it
MISSED_CLASS = "a resample missed a class: the metric is undefined there"
UNDEFINED = "the metric is undefined on the data"
OUTSIDE = "the estimate lies outside its resampled percentiles: too few units"


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: Any,
    y_prob: Any,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
    strata: Any = None,
) -> tuple[float, float, float]:
    """``(point, low, high)``: the metric on all data and a percentile bootstrap interval.

    ``n`` resamples of the N samples are drawn with replacement (``numpy.random.default_rng(seed)``,
    so the result is deterministic for a seed), or with ``groups`` (one cluster id per sample) of
    the clusters, ``idx`` then holding every sample of each drawn cluster, and with ``strata`` (one
    value per sample) within each unit's stratum (module doc); ``metric_fn(y_true[idx],
    y_prob[idx])`` is evaluated on each, and ``low``/``high`` are the ``alpha/2`` and
    ``1 - alpha/2`` percentiles (linear interpolation). ``low = high = NaN`` when a resample gives
    NaN (the metric is undefined there, e.g. an AUC whose class was not drawn) or when the
    interval excludes ``point`` (module doc: such an interval is not reported).
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
    unit_stratum = None if strata is None else unit_strata(inverse, n_units, _codes(strata, t))
    draws = _resamples(n_units, n, seed, unit_stratum)
    if groups is not None:  # every sample of each drawn cluster
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse, minlength=n_units))[:-1])
        draws = (np.concatenate([members[u] for u in d]) for d in draws)
    values = np.array([metric_fn(t[idx], p[idx]) for idx in draws])
    low, high, _ = interval(values, alpha, point)
    return point, low, high


def _codes(strata: Any, t: np.ndarray) -> np.ndarray:
    s = np.asarray(strata)
    if s.shape != (t.shape[0],):
        raise ValueError(f"strata has shape {s.shape} but there are {t.shape[0]} samples")
    return np.unique(s, return_inverse=True)[1].reshape(-1)


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


def unit_strata(inverse: np.ndarray, n_units: int, codes: np.ndarray) -> np.ndarray:
    """Each unit's stratum: the most frequent of its samples' non-negative integer ``codes``
    (ties to the lowest), for samples whose unit index is ``inverse``."""
    votes = np.zeros((n_units, int(codes.max()) + 1), dtype=np.int64)
    np.add.at(votes, (inverse, codes), 1)
    return votes.argmax(axis=1)


def stratum_members(strata: np.ndarray | None, size: int) -> list[np.ndarray]:
    """The unit indices of each stratum, strata in sorted order (one stratum without ``strata``)."""
    if strata is None:
        return [np.arange(size)]
    s = np.asarray(strata)
    return [np.flatnonzero(s == v) for v in np.unique(s)]


def draw_stratified(members: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw: from each stratum as many of its units as it has, with replacement."""
    return np.concatenate([m[rng.integers(0, m.size, size=m.size)] for m in members])


def _resamples(
    size: int, n: int, seed: int, strata: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """The ``n`` bootstrap draws of unit indices used everywhere in this module (same seed, same
    draws; with a single stratum, ``rng.integers(0, size, size)``)."""
    rng = np.random.default_rng(seed)
    members = stratum_members(strata, size)
    for _ in range(n):
        yield draw_stratified(members, rng)


def interval(values: Any, alpha: float, point: float) -> tuple[float, float, str | None]:
    """``(low, high, why)``: the ``alpha/2`` and ``1 - alpha/2`` percentiles of the resampled
    ``values``, or NaN bounds and the reason when a value is NaN or the interval excludes
    ``point`` (module doc); ``why`` is None for a valid interval."""
    values = np.asarray(values, dtype=np.float64)
    if not math.isfinite(point):
        return math.nan, math.nan, UNDEFINED
    if values.size == 0 or not np.all(np.isfinite(values)):
        return math.nan, math.nan, MISSED_CLASS
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    eps = 1e-12 * max(1.0, abs(point))
    if not low - eps <= point <= high + eps:
        return math.nan, math.nan, OUTSIDE
    return float(low), float(high), None


class _WeightedMetrics:
    """All report metrics of one sample set under integer sample weights, in O(N K) per call.

    A bootstrap resample ``idx`` is the original samples weighted by ``w = bincount(idx)``; every
    metric here is a function of such weights: the confusion matrix is a weighted count, and the
    Mann-Whitney AUC is ``sum_pos w_i (W_neg below s_i + W_neg tied with s_i / 2) / (W_pos W_neg)``
    over tie groups of the scores sorted once. The classes are fixed by the full data: macro
    averages run over the classes occurring among its labels or predictions, a resample without
    a true sample of one of its classes has no class-averaged value
    (:func:`~resdistill.measures.metrics.confusion_metrics`), and ``macro_auc`` needs every class
    whose AUC the full data defines.
    """

    def __init__(self, y_true: np.ndarray, y_prob: np.ndarray) -> None:
        self.k = y_prob.shape[1]
        pred = y_prob.argmax(axis=1)
        self.cells = y_true * self.k + pred
        self.labels = np.union1d(y_true, pred)
        self.required = np.unique(y_true)
        self.sorted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for c in range(self.k):
            order = np.argsort(y_prob[:, c], kind="mergesort")
            scores = y_prob[order, c]
            starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
            self.sorted.append((order, y_true[order] == c, starts))
        self.auc_classes = np.flatnonzero(np.isfinite(self._aucs(np.ones(y_true.size))))

    def _aucs(self, w: np.ndarray) -> np.ndarray:
        aucs = np.empty(self.k)
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
        return aucs

    def __call__(self, w: np.ndarray) -> dict[str, Any]:
        k = self.k
        cm = np.bincount(self.cells, weights=w, minlength=k * k).reshape(k, k)
        aucs = self._aucs(w)
        chosen = aucs[self.auc_classes]
        macro_auc = float(chosen.mean()) if chosen.size else math.nan
        return {**confusion_metrics(cm, self.labels, self.required), "macro_auc": macro_auc,
                "auc": aucs}  # fmt: skip


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
    stratify: bool = True,
) -> dict[str, Any]:
    """All metrics with ``1 - alpha`` bootstrap intervals, as a JSON-serialisable dict.

    ``y_true``: class indices or class names (from ``classes``); ``y_prob``: ``(N, len(classes))``;
    ``groups``: one cluster id per sample (its slide or patient) to resample clusters (module
    doc), else each sample is a unit; ``unit``: the name of the resampling unit stated in the
    report (default ``"cluster"`` with groups, ``"sample"`` without); ``stratify``: resample the
    units within their class (a unit's class: its samples' most frequent label), so that no
    resample misses a class that is some unit's majority. Returns::

        {"n": N, "classes": [...], "alpha": alpha, "n_boot": n_boot, "seed": seed,
         "resample": unit, "n_units": number of units, "stratified": stratify,
         "units_per_class": {class: units whose majority it is},
         "support": {class: count},
         "accuracy" | "balanced_accuracy" | "macro_f1" | "macro_precision" | "macro_recall" |
         "macro_auc": {"value": v, "low": lo, "high": hi},
         "auc": {class: {"value", "low", "high"}},      # None where undefined (see module doc)
         "undefined": {metric: why},                   # a value without its interval
         "confusion_matrix": [[...]],                  # rows true, columns predicted
         "roc": {class: {"fpr": [...], "tpr": [...]}}  # only if with_roc and AUC defined
        }

    Macro F1/precision/recall average over the classes that occur in the true or predicted labels
    of all the data, balanced accuracy over its true classes, in every resample alike. Every
    interval uses the same resampled units as :func:`bootstrap_ci` with the same ``seed``,
    ``groups`` and ``strata=y_true`` (when stratified), so the numbers agree with it, computed by
    reweighting the samples (each by the number of times its unit was drawn) rather than
    re-sorting them for each resample; an interval is left out as the module doc says.
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
    majority = unit_strata(inverse, n_units, t)
    stats = _WeightedMetrics(t, p)
    point = stats(np.ones(t.size))
    boots = [
        stats(np.bincount(draw, minlength=n_units)[inverse])
        for draw in _resamples(n_units, n_boot, seed, majority if stratify else None)
    ]
    undefined: dict[str, str] = {}

    def ci(key: str, column: int | None = None) -> dict[str, float | None]:
        if column is None:
            value, values = point[key], np.array([b[key] for b in boots])
        else:
            value, values = point[key][column], np.array([b[key][column] for b in boots])
        low, high, why = interval(values, alpha, value)
        if why is not None and math.isfinite(value):
            undefined[key if column is None else f"auc {classes[column]}"] = why
        return _ci_dict(value, low, high)

    out: dict[str, Any] = {
        "n": int(t.size),
        "classes": classes,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        "resample": unit or ("sample" if groups is None else "cluster"),
        "n_units": n_units,
        "stratified": stratify,
        "units_per_class": _per_class(majority, classes),
        "support": _per_class(t, classes),
    }
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "macro_recall",
                "macro_auc"):  # fmt: skip
        out[key] = ci(key)
    auc: dict[str, dict[str, float | None]] = {}
    roc: dict[str, dict[str, list[float]]] = {}
    for k, name in enumerate(classes):
        auc[name] = ci("auc", k)
        if with_roc and auc[name]["value"] is not None:
            fpr, tpr, _ = roc_curve(t == k, p[:, k])
            roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    out["auc"] = auc
    out["undefined"] = undefined
    out["confusion_matrix"] = confusion_matrix(t, pred, len(classes)).tolist()
    if with_roc:
        out["roc"] = roc
    return out


def _per_class(codes: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    counts = np.bincount(codes, minlength=len(classes))
    return {c: int(v) for c, v in zip(classes, counts, strict=True)}
