"""The paired two-level bootstrap (:mod:`resdistill.measures.paired`) on synthetic predictions whose
answers are known: what is resampled (patients with all their slides, runs paired by name) shows
as intervals of exactly zero width where that level carries no variation, and of non-zero width
where it does."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resdistill.measures.bootstrap import MISSED_CLASS
from resdistill.measures.paired import Run, arm_interval, paired_difference, points


def run(right: list[list[bool]], name: str = "0", block: str = "", units: str = "u",
        classes: int = 2) -> Run:  # fmt: skip
    """Unit ``i`` (class ``i % classes``) holds one tile per entry of ``right[i]``, predicted
    right or as the next class."""
    keys, unit_ids, labels, preds = [], [], [], []
    for i, tiles in enumerate(right):
        for j, ok in enumerate(tiles):
            keys.append(f"{block}s{i}_{j}")
            unit_ids.append(f"{units}{i:02d}")
            labels.append(i % classes)
            preds.append(i % classes if ok else (i + 1) % classes)
    return Run(keys, unit_ids, np.array(labels), np.array(preds), name, block)


def test_a_difference_of_exactly_zero_has_an_interval_holding_zero() -> None:
    rng = np.random.default_rng(0)
    right = [list(rng.random(6) < 0.7) for _ in range(20)]
    arm = [run(right, name=str(s)) for s in range(3)]
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        d = paired_difference(arm, arm, metric, n_boot=300)
        assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0), metric
        assert d.paired_runs and d.runs == (3, 3) and d.units == 20
    # two arms equal in expectation, not sample by sample: the interval still holds 0
    other = [run([list(rng.random(6) < 0.7) for _ in range(20)], name=str(s)) for s in range(3)]
    for o in other:  # the same samples and labels, other predictions
        assert list(o.keys) == list(arm[0].keys)
    d = paired_difference(arm, other, n_boot=500)
    assert d.low < 0 < d.high and d.low <= d.value <= d.high


def test_patients_are_resampled_with_all_their_slides() -> None:
    """Every patient has two slides, one right and one wrong: any resample of patients scores
    exactly 0.5, a resample of slides does not."""
    right = [[i % 4 < 2] for i in range(24)]  # slides 0, 1 right; 2, 3 wrong; ...
    by_slide = run(right)
    patients = [f"p{i // 4}{i % 2}" for i in range(24)]  # slides i and i + 2: one patient
    by_patient = Run(by_slide.keys, [patients[int(k[1:].split("_")[0])] for k in by_slide.keys],
                     by_slide.labels, by_slide.preds)  # fmt: skip
    p = arm_interval([by_patient], n_boot=400, unit="patient")
    assert (p.value, p.low, p.high) == (0.5, 0.5, 0.5)
    assert p.units == 12 and p.resamples().startswith("400 resamples of 12 patients")
    s = arm_interval([by_slide], n_boot=400)
    assert s.value == 0.5 and s.high - s.low > 0.2


def test_seed_variance_enters_the_interval() -> None:
    """Each seed is equally right on every unit, so units carry no variation: one run gives a
    zero-width interval, three runs of different accuracy the spread of their resampled mean."""
    seeds = [run([[True] * k + [False] * (10 - k) for _ in range(16)], name=str(k))
             for k in (6, 8, 9)]  # fmt: skip
    single = arm_interval(seeds[:1], n_boot=300)
    assert (single.value, single.low, single.high) == (0.6, 0.6, 0.6)
    three = arm_interval(seeds, n_boot=2000)
    assert three.value == pytest.approx(23 / 30)
    assert 0.6 <= three.low < three.value < three.high <= 0.9
    assert three.runs == (3,)


def test_runs_of_one_name_are_drawn_together() -> None:
    """Arm B is arm A five points worse, seed by seed: paired by name every resample gives
    exactly +5 points; under other names the seeds are drawn apart and the interval widens."""
    acc = {"0": 12, "1": 16, "2": 18}  # right tiles of 20 per unit
    a = [run([[True] * k + [False] * (20 - k)] * 10, name=n) for n, k in acc.items()]
    b = [run([[True] * (k - 1) + [False] * (21 - k)] * 10, name=n) for n, k in acc.items()]
    d = paired_difference(a, b, n_boot=500)
    assert d.paired_runs and d.value == pytest.approx(0.05)
    assert d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)
    assert points(d.value) == "+5.0"
    renamed = [Run(r.keys, r.units, r.labels, r.preds, f"x{r.name}") for r in b]
    apart = paired_difference(a, renamed, n_boot=500)
    assert not apart.paired_runs and apart.value == pytest.approx(0.05)
    assert apart.low < 0.05 - 0.02 and apart.high > 0.05 + 0.02


def test_a_missing_class_never_puts_the_estimate_outside_its_interval() -> None:
    """Five units of three classes (the demo's size): drawn within their class, every resample
    holds each class and macro F1 has an interval holding its estimate; drawn plainly, some
    resample misses a class and the interval is left out, saying why."""
    rng = np.random.default_rng(3)
    for trial in range(10):
        right = [list(rng.random(8) < 0.8) for _ in range(5)]
        arm = [run(right, name=str(s), classes=3) for s in range(2)]
        est = arm_interval(arm, "macro_f1", n_boot=300, seed=trial)
        assert est.defined and est.low <= est.value <= est.high
        assert est.per_class_units == {"0": 2, "1": 2, "2": 1}
        plain = arm_interval(arm, "macro_f1", n_boot=300, seed=trial, stratify=False)
        assert not plain.defined and plain.why == MISSED_CLASS and math.isfinite(plain.value)
        base = [run([[True] * 8] * 5, name=str(s), classes=3) for s in range(2)]
        diff = paired_difference(arm, base, "balanced_accuracy", n_boot=300, seed=trial)
        assert diff.defined and diff.low <= diff.value <= diff.high <= 0


def test_blocks_average_and_runs_must_score_the_same_samples() -> None:
    a = [run([[True, False]] * 6, block="c0"), run([[True, True]] * 6, block="c1")]
    b = [run([[False, False]] * 6, block="c0"), run([[True, False]] * 6, block="c1")]
    d = paired_difference(a, b, n_boot=200)
    assert d.value == pytest.approx(0.5) and d.blocks == 2 and d.units == 12
    assert d.low == pytest.approx(0.5) and d.high == pytest.approx(0.5)  # each block +0.5
    short = run([[True, False]] * 5, block="c0")
    with pytest.raises(ValueError, match="does not score the block's samples"):
        paired_difference([a[0]], [short], n_boot=10)
    with pytest.raises(ValueError, match="an arm has no run"):
        paired_difference(a, b[:1], n_boot=10)
    with pytest.raises(ValueError, match="metric must be one of"):
        arm_interval(a, "auc")


def test_batch_metric_is_confusion_metrics_on_a_stack() -> None:
    from resdistill.measures.metrics import confusion_metrics
    from resdistill.measures.paired import batch_metric

    rng = np.random.default_rng(5)
    cms = rng.integers(0, 4, size=(50, 4, 4)).astype(float)
    cms[:10, 2, :] = 0  # class 2 never true in the first ten
    cms[10:20, :, 3] = 0  # class 3 never predicted
    labels, required = [0, 1, 2, 3], [0, 1, 2]
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        got = batch_metric(cms, metric, labels, required)
        want = [confusion_metrics(cm, labels, required)[metric] for cm in cms]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        if metric != "accuracy":
            assert np.isnan(got[:10]).all() and np.isfinite(got[10:]).all()
