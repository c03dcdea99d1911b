"""Two-level bootstrap intervals of an arm's metric over its runs, and of the paired difference
of two arms scored on the same test samples (student - teacher, distilled - baseline,
distilled - control).

Setting. An arm is one or more runs (training seeds) on one or more test sets (blocks: cohort
seeds or folds). Every run of a block scores the same samples (tiles or slides), and each sample
belongs to a resampling unit: its patient when the manifest names patients, else its slide. The
quantity reported is::

    D = mean over blocks b of [ mean over A's runs r of m(r, b) - mean over B's runs r of m(r, b) ]

(without B, the arm's own mean), ``m`` a metric of the run's confusion matrix on the block's
samples (:data:`METRICS`, :func:`~resdistill.measures.metrics.confusion_metrics`).

Resampling (a two-level, or nested, bootstrap: Davison & Hinkley 1997, sec. 3.8; Field & Welsh
2007). Each of ``n_boot`` resamples

1. draws the blocks with replacement (when there are several);
2. in each drawn block draws its units with replacement within their class (a unit's class: its
   samples' most frequent label; :mod:`resdistill.measures.bootstrap` says why), one draw for
   both arms: they score the same regions, so what the test set contributes to their
   difference cancels (a paired comparison);
3. draws the runs of each arm with replacement; where both arms hold runs of the same names in
   the block (the student of seed ``s`` and its teacher of seed ``s``; the distilled student and
   the baseline sharing seed ``s``'s labelled slides) one draw of names serves both (paired
   runs), else each arm's runs are drawn on their own.

A drawn unit brings all its samples; each run's metric is computed on the resampled samples and
the run means are averaged as in ``D``. The interval is the percentile interval of the ``n_boot``
values, reported only when every resample has a value and the interval holds the estimate
(:func:`resdistill.measures.bootstrap.interval`). Seed-to-seed variance enters through step 3:
an interval over test units alone treats three seeds as if they were the only possible ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdistill.measures.bootstrap import interval, stratum_members, unit_strata
from resdistill.measures.metrics import labels_1d

__all__ = [
    "METRICS", "Estimate", "Run", "arm_interval", "batch_metric", "paired_difference", "points",
]  # fmt: skip

#: metrics of a confusion matrix this module resamples
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class Run:
    """One trained model's predictions on one test set: per sample its key, its resampling unit,
    its true class and the predicted class. ``name`` pairs the runs of two arms (the training
    seed); ``block`` names the test set (runs of different blocks score different samples)."""

    keys: Sequence[str]
    units: Sequence[str]
    labels: Any
    preds: Any
    name: str = ""
    block: str = ""


@dataclass(frozen=True)
class Estimate:
    """A metric (or a difference of one) with its two-level bootstrap interval; ``low`` and
    ``high`` are None, and ``why`` says why, when the interval is not reported."""

    metric: str
    value: float
    low: float | None
    high: float | None
    why: str | None
    alpha: float
    n_boot: int
    unit: str  # what was resampled: patient, slide, tile
    units: int  # over all blocks
    blocks: int
    runs: tuple[int, ...]  # runs per arm, summed over blocks
    paired_runs: bool
    stratified: bool
    per_class_units: dict[str, int] = field(default_factory=dict)  # units per class

    @property
    def defined(self) -> bool:
        return self.low is not None and self.high is not None

    def resamples(self) -> str:
        """What was resampled, for a report: ``1000 resamples of 24 patients within their class
        and of 3 paired runs per arm``."""
        strat = " within their class" if self.stratified else ""
        blocks = f" in {self.blocks} test sets" if self.blocks > 1 else ""
        if self.paired_runs and len(self.runs) > 1:
            runs = f"{self.runs[0]} paired runs per arm"
        else:
            runs = " and ".join(str(r) for r in self.runs) + " runs"
        return f"{self.n_boot} resamples of {self.units} {self.unit}s{strat}{blocks} and of {runs}"


@dataclass
class _Block:
    """One test set: its units and, per arm, per run, a ``(units, K, K)`` confusion tensor."""

    members: list[np.ndarray]  # unit indices of each stratum
    unit_class: np.ndarray  # each unit's class (its samples' most frequent label)
    n_units: int
    classes: np.ndarray  # classes with a true sample (each needs one in a resample)
    tensors: list[list[np.ndarray]]  # [arm][run]
    labels: list[list[np.ndarray]]  # [arm][run]: the classes its macro averages run over
    names: list[list[str]]  # [arm][run]
    paired: bool  # then pairs[arm][j] is the arm's run named like the first arm's run j
    pairs: list[np.ndarray]


def _align(run: Run, order: dict[str, int], what: str) -> np.ndarray:
    keys = list(run.keys)
    if len(keys) != len(order) or set(keys) != set(order):
        missing = sorted(set(order) - set(keys))[:3]
        extra = sorted(set(keys) - set(order))[:3]
        raise ValueError(
            f"{what} does not score the block's samples: missing {missing}, extra {extra}"
        )
    pos = np.empty(len(keys), dtype=np.int64)
    pos[[order[k] for k in keys]] = np.arange(len(keys))
    return pos  # pos[i]: this run's index of the block's i-th sample


def _blocks(arms: Sequence[Sequence[Run]], n_classes: int, stratify: bool) -> list[_Block]:
    names = sorted({r.block for arm in arms for r in arm})
    out = []
    for b in names:
        runs = [[r for r in arm if r.block == b] for arm in arms]
        if not all(runs):
            raise ValueError(f"test set {b!r}: an arm has no run on it")
        ref = runs[0][0]
        keys = sorted(ref.keys)
        order = {k: i for i, k in enumerate(keys)}
        if len(order) != len(ref.keys):
            raise ValueError(f"test set {b!r}: a sample key occurs twice")
        pos = _align(ref, order, f"run {ref.name!r}")
        labels = labels_1d(ref.labels)[pos]
        units = np.asarray(ref.units)[pos]
        uniq, inv = np.unique(units, return_inverse=True)
        inv = inv.reshape(-1)
        tensors, label_sets, run_names = [], [], []
        for arm in runs:
            tensors.append([])
            label_sets.append([])
            run_names.append([r.name for r in arm])
            for r in arm:
                p = _align(r, order, f"run {r.name!r} on test set {b!r}")
                if not np.array_equal(labels_1d(r.labels)[p], labels) or not np.array_equal(
                    np.asarray(r.units)[p], units
                ):
                    raise ValueError(f"run {r.name!r} on test set {b!r}: other labels or units")
                pred = labels_1d(r.preds, "preds")[p]
                cells = (inv * n_classes + labels) * n_classes + pred
                cm = np.bincount(cells, minlength=uniq.size * n_classes * n_classes)
                tensors[-1].append(cm.reshape(uniq.size, n_classes, n_classes).astype(float))
                label_sets[-1].append(np.union1d(labels, pred))
        unit_class = unit_strata(inv, uniq.size, labels)
        members = stratum_members(unit_class if stratify else None, uniq.size)
        paired = len(arms) > 1 and all(
            sorted(n) == sorted(run_names[0]) and len(set(n)) == len(n) for n in run_names
        )
        pairs = [np.array([n.index(x) for x in run_names[0]]) for n in run_names] if paired else []
        out.append(_Block(members, unit_class, int(uniq.size), np.unique(labels), tensors,
                          label_sets, run_names, paired, pairs))  # fmt: skip
    return out


def batch_metric(cms: np.ndarray, metric: str, labels: Any, required: Any) -> np.ndarray:
    """``metric`` of each of a stack of ``(n, K, K)`` confusion matrices (rows true), as
    :func:`~resdistill.measures.metrics.confusion_metrics` with the same ``labels`` and
    ``required`` gives it for one: NaN for the class-averaged metrics where a required class has
    no true sample."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    if metric == "accuracy":
        return tp.sum(axis=1) / cms.sum(axis=(1, 2))
    true = cms.sum(axis=2)
    req = np.asarray(required, dtype=np.int64)
    missed = np.any(true[:, req] == 0, axis=1)
    if metric == "balanced_accuracy":
        lab, den = req, true[:, req]
    else:  # macro_f1: 2 tp / (2 tp + fp + fn) = 2 tp / (true + predicted)
        lab = np.asarray(labels, dtype=np.int64)
        den = (true + cms.sum(axis=1))[:, lab] / 2
    ratio = np.divide(tp[:, lab], den, out=np.zeros_like(den), where=den > 0)
    return np.where(missed, np.nan, ratio.mean(axis=1))


def _unit_weights(members: Sequence[np.ndarray], n_units: int, n: int,
                  rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """``(n, n_units)``: how often each unit is drawn in each of ``n`` stratified draws."""
    w = np.zeros(n * n_units)
    rows = (np.arange(n) * n_units)[:, None]
    for m in members:
        drawn = m[rng.integers(0, m.size, size=(n, m.size))]
        w += np.bincount((drawn + rows).ravel(), minlength=n * n_units)
    return w.reshape(n, n_units)


def _run_counts(n_runs: int, picks: np.ndarray) -> np.ndarray:
    """``(n, n_runs)`` counts of each run among the rows of drawn run indices ``picks``."""
    n = picks.shape[0]
    flat = (picks + (np.arange(n) * n_runs)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_runs).reshape(n, n_runs).astype(float)


def _block_values(block: _Block, metric: str, w: np.ndarray,
                  rng: np.random.Generator | None) -> np.ndarray:  # fmt: skip
    """The block's term of ``D`` for each row of unit weights ``w``: runs drawn by ``rng``
    (paired by name where the block's runs are), or every run once when ``rng`` is None."""
    n = w.shape[0]
    if rng is None:
        counts = [np.ones((n, len(t))) for t in block.tensors]
    elif block.paired:
        r = len(block.names[0])
        picks = rng.integers(0, r, size=(n, r))
        counts = [_run_counts(r, order[picks]) for order in block.pairs]
    else:
        counts = [_run_counts(len(t), rng.integers(0, len(t), size=(n, len(t))))
                  for t in block.tensors]  # fmt: skip
    out = np.zeros(n)
    for arm, (tensors, c) in enumerate(zip(block.tensors, counts, strict=True)):
        k = tensors[0].shape[1]
        m = np.stack([
            batch_metric((w @ t.reshape(t.shape[0], -1)).reshape(n, k, k), metric,
                         block.labels[arm][i], block.classes)
            for i, t in enumerate(tensors)
        ], axis=1)  # fmt: skip
        value = (m * c).sum(axis=1) / c.sum(axis=1)
        out += value if arm == 0 else -value
    return out


def _estimate(
    arms: Sequence[Sequence[Run]], metric: str, n_boot: int, alpha: float, seed: int,
    unit: str, stratify: bool, n_classes: int | None, class_names: Sequence[str] | None,
) -> Estimate:  # fmt: skip
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not all(arms):
        raise ValueError("every arm needs at least one run")
    k = n_classes or 1 + max(
        int(max(labels_1d(r.labels).max(), labels_1d(r.preds, "preds").max()))
        for arm in arms for r in arm
    )  # fmt: skip
    blocks = _blocks(arms, k, stratify)
    point = float(np.mean([_block_values(b, metric, np.ones((1, b.n_units)), None)[0]
                           for b in blocks]))  # fmt: skip
    rng = np.random.default_rng(seed)
    nb = len(blocks)
    chosen = rng.integers(0, nb, size=(n_boot, nb)) if nb > 1 else np.zeros((n_boot, 1), int)
    values = np.zeros(n_boot)
    for j, b in enumerate(blocks):  # every drawn copy of a block gets its own draws
        rows = np.nonzero(chosen == j)[0]
        if rows.size:
            w = _unit_weights(b.members, b.n_units, rows.size, rng)
            np.add.at(values, rows, _block_values(b, metric, w, rng))
    values /= nb
    low, high, why = interval(values, alpha, point)
    per_class: dict[str, int] = {}
    for b in blocks:
        for c, count in enumerate(np.bincount(b.unit_class)):
            if not count:
                continue
            name = class_names[c] if class_names else str(c)
            per_class[name] = per_class.get(name, 0) + int(count)
    return Estimate(
        metric, point, None if why else low, None if why else high, why, alpha, n_boot, unit,
        sum(b.n_units for b in blocks), len(blocks),
        tuple(sum(len(b.tensors[a]) for b in blocks) for a in range(len(arms))),
        all(b.paired for b in blocks), stratify, per_class,
    )  # fmt: skip


def arm_interval(
    runs: Sequence[Run], metric: str = "accuracy", *, n_boot: int = 1000, alpha: float = 0.05,
    seed: int = 0, unit: str = "slide", stratify: bool = True, n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Estimate:  # fmt: skip
    """An arm's metric, the mean over blocks and runs, with its two-level bootstrap interval
    (units and runs resampled: module doc). ``unit`` names what ``Run.units`` holds."""
    return _estimate([runs], metric, n_boot, alpha, seed, unit, stratify, n_classes, class_names)


def paired_difference(
    a: Sequence[Run], b: Sequence[Run], metric: str = "accuracy", *, n_boot: int = 1000,
    alpha: float = 0.05, seed: int = 0, unit: str = "slide", stratify: bool = True,
    n_classes: int | None = None, class_names: Sequence[str] | None = None,
) -> Estimate:  # fmt: skip
    """``metric(a) - metric(b)`` (each the mean over blocks and runs) with its paired two-level
    bootstrap interval: the same units drawn for both arms, runs of the same name drawn together
    (module doc). Every run of a block must score the same samples with the same labels and
    units (a ValueError names the run that does not)."""
    if not a or not b:
        raise ValueError("paired_difference needs runs of both arms")
    return _estimate([a, b], metric, n_boot, alpha, seed, unit, stratify, n_classes, class_names)


def points(x: float | None) -> str:
    """A difference of fractions in percentage points, signed: ``+1.2``."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}"
