"""Classification metrics, tile- and slide-level (numpy only); their bootstrap intervals are in
:mod:`resdistill.measures.bootstrap`.

Conventions (shared by ``evaluate``, :mod:`~resdistill.measures.bootstrap` and the plots):

* ``y_true``: shape ``(N,)``, integer class indices ``0..K-1`` (or class names when ``classes`` is
  given to :func:`~resdistill.measures.bootstrap.evaluate_predictions`). ``y_prob``: shape
  ``(N, K)``, one score per class (softmax probabilities; any score where higher means "more
  likely" works for AUC).
* The predicted class is ``argmax(y_prob, axis=1)`` (ties -> lowest index).
* Macro averages (F1, precision, recall) are unweighted means over the classes that occur in
  ``y_true`` or ``y_pred`` (scikit-learn's default), or over ``labels`` when given. A per-class
  ratio with a zero denominator counts as 0 (scikit-learn's ``zero_division=0``).
* Balanced accuracy is the mean recall over the classes that occur in ``y_true``
  (scikit-learn's ``balanced_accuracy_score``): each true class weighs the same, whatever its
  share of the samples.
* Slide level (:func:`aggregate_slides`): a slide's prediction is the argmax of the mean of its
  tiles' probabilities (not a majority vote of the tiles' argmaxes), its label its tiles' label.
* One-vs-rest ROC AUC of class ``k`` is the Mann-Whitney statistic: the probability that a random
  positive (true class ``k``) scores higher than a random negative, ties counting 1/2. It is
  **undefined (NaN; ``None`` in** ``evaluate_predictions`` **output) when class ``k`` has no
  positive or no negative sample** - e.g. a class absent from ``y_true``, or every class when
  ``y_true`` holds a single class. ``macro_auc`` is the mean over the classes where it is defined.
* Empty input raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "SlidePredictions",
    "accuracy",
    "aggregate_slides",
    "balanced_accuracy",
    "binary_roc_auc",
    "confusion_matrix",
    "confusion_metrics",
    "confusion_scores",
    "macro_auc",
    "macro_f1",
    "macro_precision",
    "macro_recall",
    "per_class_auc",
    "precision_recall_f1",
    "prf_from_confusion",
    "roc_curve",
]

MetricFn = Callable[[np.ndarray, np.ndarray], float]


# ----------------------------------------------------------------------------- input checks
def labels_1d(y: Any, name: str = "y_true") -> np.ndarray:
    """``y`` as 1-D int64 class indices (whole floats accepted); ValueError naming ``name``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: nothing to evaluate")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} holds a negative class index ({arr.min()})")
    return arr.astype(np.int64, copy=False)


def probs_2d(y_prob: Any, n: int | None = None) -> np.ndarray:
    """``y_prob`` as finite ``(N, K)`` float64 (a 1-D score is one column), ``N == n`` if given."""
    arr = np.asarray(y_prob, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"y_prob must be (N, K), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"y_prob is empty (shape {arr.shape}): nothing to evaluate")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"y_true has {n} samples but y_prob has {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("y_prob holds NaN or infinite values")
    return arr


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = labels_1d(y_true, "y_true")
    p = labels_1d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} samples but y_pred has {p.size}")
    return t, p


# ----------------------------------------------------------------------------- label metrics
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of samples with ``y_pred == y_true``: ``(1/N) * sum_i [y_pred_i == y_true_i]``."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """``(K, K)`` int64 matrix, ``M[i, j]`` = number of samples of true class i predicted as j.

    ``K = n_classes`` when given, else ``max(y_true, y_pred) + 1``.
    """
    t, p = _pair(y_true, y_pred)
    k = int(max(t.max(), p.max())) + 1
    if n_classes is not None:
        if n_classes < k:
            raise ValueError(f"n_classes={n_classes} but a class index {k - 1} occurs")
        k = int(n_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def precision_recall_f1(
    y_true: Any, y_pred: Any, labels: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(labels, precision, recall, f1)`` with zero denominators counted as 0.

    For class k: ``tp``, ``fp``, ``fn`` from the confusion matrix; ``precision = tp/(tp+fp)``,
    ``recall = tp/(tp+fn)``, ``f1 = 2 tp / (2 tp + fp + fn)`` (equal to the harmonic mean of
    precision and recall where that is defined). ``labels`` defaults to the sorted classes that
    occur in ``y_true`` or ``y_pred``.
    """
    t, p = _pair(y_true, y_pred)
    lab = np.union1d(t, p) if labels is None else np.asarray(labels, dtype=np.int64)
    if lab.size == 0:
        raise ValueError("labels is empty")
    k = int(max(t.max(), p.max(), lab.max())) + 1
    precision, recall, f1 = prf_from_confusion(confusion_matrix(t, p, k), lab)
    return lab, precision, recall, f1


def prf_from_confusion(
    cm: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 for ``labels`` from a (possibly weighted) confusion matrix."""
    tp = np.diag(cm)[labels].astype(np.float64)
    fp = cm.sum(axis=0)[labels] - tp
    fn = cm.sum(axis=1)[labels] - tp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        out = np.zeros_like(num, dtype=np.float64)
        np.divide(num, den, out=out, where=den > 0)
        return out

    return ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)


def confusion_scores(cm: Any) -> dict[str, float]:
    """Accuracy and macro F1 of a confusion matrix (rows true, columns predicted), and its size.

    ``accuracy = trace(cm) / sum(cm)``; macro F1 as :func:`macro_f1` (over the classes that occur
    among the labels or the predictions). NaN for an empty matrix. Training validation sums the
    ranks' matrices and scores the total here, so it agrees with
    :func:`resdistill.measures.bootstrap.evaluate_predictions`.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = float(cm.sum())
    if total == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "samples": 0.0}
    present = np.flatnonzero((cm.sum(axis=0) + cm.sum(axis=1)) > 0)
    f1 = prf_from_confusion(cm, present)[2]
    return {"accuracy": float(np.trace(cm)) / total, "macro_f1": float(f1.mean()), "samples": total}


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean over the classes present in ``y_true`` of ``tp / (tp + fn)`` (their recall)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(precision_recall_f1(t, p, np.unique(t))[2]))


def confusion_metrics(
    cm: Any, labels: Sequence[int] | None = None, required: Sequence[int] | None = None
) -> dict[str, float]:
    """``accuracy``, ``macro_f1``, ``macro_precision``, ``macro_recall`` and
    ``balanced_accuracy`` of a (possibly weighted) confusion matrix, rows true.

    ``labels``: the classes the macro averages run over (default: those occurring among the
    labels or the predictions, as :func:`macro_f1`). ``required``: the classes the class-averaged
    metrics need a true sample of (default: the classes with one); balanced accuracy is the mean
    recall over them. When one of ``required`` has no true sample the class-averaged metrics are
    NaN, not an average over fewer classes: a bootstrap resample that missed a class measures a
    different quantity (a missing class's F1 of 0 drags the average down, leaving it out lifts
    it), so such a resample has no value.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = float(cm.sum())
    nan = math.nan
    if total == 0:
        return dict.fromkeys(_CM_KEYS, nan)
    true = cm.sum(axis=1)
    present = np.flatnonzero((cm.sum(axis=0) + true) > 0)
    lab = present if labels is None else np.asarray(labels, dtype=np.int64)
    req = np.flatnonzero(true > 0) if required is None else np.asarray(required, dtype=np.int64)
    out = {"accuracy": float(np.trace(cm)) / total}
    if req.size and np.any(true[req] == 0):
        return {**out, **dict.fromkeys(_CM_KEYS[1:], nan)}
    precision, recall, f1 = prf_from_confusion(cm, lab)
    out.update(macro_f1=float(f1.mean()), macro_precision=float(precision.mean()),
               macro_recall=float(recall.mean()))  # fmt: skip
    out["balanced_accuracy"] = float(prf_from_confusion(cm, req)[1].mean()) if req.size else nan
    return out


_CM_KEYS = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "balanced_accuracy")


def macro_precision(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean over classes of ``tp/(tp+fp)`` (0 for a class never predicted)."""
    return float(np.mean(precision_recall_f1(y_true, y_pred, labels)[1]))


def macro_recall(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean over classes of ``tp/(tp+fn)`` (0 for a class absent from y_true)."""
    return float(np.mean(precision_recall_f1(y_true, y_pred, labels)[2]))


def macro_f1(y_true: Any, y_pred: Any, labels: Sequence[int] | None = None) -> float:
    """Unweighted mean over classes of ``2 tp / (2 tp + fp + fn)``."""
    return float(np.mean(precision_recall_f1(y_true, y_pred, labels)[3]))


# ----------------------------------------------------------------------------- ROC / AUC
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of (starts+1 .. ends)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _binary_input(y_binary: Any, score: Any, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bool labels, float64 scores)``, 1-D and of equal, non-zero length (else ValueError)."""
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(
            f"y_binary and score must be 1-D of equal length, got {y.shape}, {s.shape}"
        )
    if y.size == 0:
        raise ValueError(f"{caller}: empty input")
    return y, s


def binary_roc_auc(y_binary: Any, score: Any) -> float:
    """Tie-aware ROC AUC (Mann-Whitney U / (n_pos * n_neg)); NaN when a class is missing.

    ``AUC = (sum of ranks of the positives - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)`` with
    average ranks for tied scores, i.e. ``P(score_pos > score_neg) + 0.5 P(equal)``. This equals
    the area under the (trapezoidal) ROC curve of :func:`roc_curve`.
    """
    y, s = _binary_input(y_binary, score, "binary_roc_auc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_binary: Any, score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve points ``(fpr, tpr, thresholds)`` for one binary problem.

    One point per distinct score ``s`` (descending): predicting positive when ``score >= s``.
    The first point is ``(0, 0)`` with threshold ``+inf``; the last is ``(1, 1)``. With no
    positive (negative) sample, ``tpr`` (``fpr``) is NaN. Matches scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``.
    """
    y, s = _binary_input(y_binary, score, "roc_curve")
    order = np.argsort(-s, kind="mergesort")
    ss, ys = s[order], y[order]
    last_of_run = np.r_[ss[1:] != ss[:-1], True]
    tps = np.cumsum(ys)[last_of_run].astype(np.float64)
    fps = np.cumsum(~ys)[last_of_run].astype(np.float64)
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, ss[last_of_run]]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    return fpr, tpr, thresholds


def per_class_auc(y_true: Any, y_prob: Any) -> np.ndarray:
    """One-vs-rest AUC for each of the K columns of ``y_prob``; NaN where undefined."""
    t = labels_1d(y_true)
    p = probs_2d(y_prob, t.size)
    return np.array([binary_roc_auc(t == k, p[:, k]) for k in range(p.shape[1])])


def macro_auc(y_true: Any, y_prob: Any) -> float:
    """Mean of :func:`per_class_auc` over the classes where it is defined (NaN if none is)."""
    aucs = per_class_auc(y_true, y_prob)
    ok = np.isfinite(aucs)
    return float(aucs[ok].mean()) if ok.any() else math.nan


class SlidePredictions(NamedTuple):
    """Slide-level predictions from :func:`aggregate_slides` (slides in sorted order)."""

    slide_ids: np.ndarray  # (S,) slide identifiers, sorted
    y_prob: np.ndarray  # (S, K) mean tile probability per slide
    y_true: np.ndarray | None  # (S,) the slide's label (its tiles' common label), or None
    n_tiles: np.ndarray  # (S,) number of tiles per slide


def aggregate_slides(
    slide_ids: Any, y_prob: Any, y_true: Any = None, *, mixed_labels: bool = False
) -> SlidePredictions:
    """Aggregate tile predictions to slides: ``P(slide) = mean over its tiles of P(tile)``.

    With slide-level labels every tile carries its slide's label, and a slide whose tiles
    disagree raises ``ValueError`` naming it (labels were mixed up somewhere). With
    ``mixed_labels`` (region labels from annotations, where a slide holds several classes) the
    slide's label is its tiles' most frequent one, ties to the lowest class index: the slide is
    graded by its predominant pattern. ``y_true`` may be omitted (``None``) for unlabeled
    predictions. Slides are returned in sorted order of id.
    """
    ids = np.asarray(slide_ids)
    if ids.ndim != 1:
        raise ValueError(f"slide_ids must be 1-D, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("aggregate_slides: no tiles given")
    p = probs_2d(y_prob, ids.size)
    uniq, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(-1)
    counts = np.bincount(inv, minlength=uniq.size)
    sums = np.zeros((uniq.size, p.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, p)
    slide_prob = sums / counts[:, None]
    slide_true = None
    if y_true is not None:
        t = labels_1d(y_true)
        if t.shape != ids.shape:
            raise ValueError(f"y_true has shape {t.shape} but slide_ids has {ids.shape}")
        votes = np.zeros((uniq.size, int(t.max()) + 1), dtype=np.int64)
        np.add.at(votes, (inv, t), 1)
        slide_true = votes.argmax(axis=1)  # argmax: the first (lowest) class on ties
        mismatch = t != slide_true[inv]
        if not mixed_labels and np.any(mismatch):
            bad = sorted({str(s) for s in ids[mismatch].tolist()})
            raise ValueError(f"tiles of a slide carry different labels: slides {bad[:5]}")
    return SlidePredictions(uniq, slide_prob, slide_true, counts)
