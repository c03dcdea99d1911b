"""Tile-level confidence intervals resample slides, not tiles (tiles of a slide are not independent).

The constructed prediction set has whole slides right or wrong: 24 slides of 40 tiles, 18 slides
with every tile confidently right and 6 with every tile confidently wrong, all six of class 0.
Tile accuracy is then the fraction of right slides. Slides are resampled within their class
(stratified), so the interval has the width of a proportion over the 12 class-0 slides, half of
them right, out of 24 (about ``2 * 1.96 * sqrt(12 * 0.5 * 0.5) / 24 = 0.28``), not over 960 tiles
(``0.055``, the binomial width a tile bootstrap gives).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from resdistill.eval.results import TilePredictions
from resdistill.measures.bootstrap import evaluate_predictions

CLASSES = ["benign", "tumor"]
SLIDES, TILES, WRONG = 24, 40, 6


def whole_slide_predictions(tiles_per_slide: list[int] | None = None) -> TilePredictions:
    """Slides ``s00..s23``, half of each class; slides 0, 4, 8, ... (``WRONG`` of them) wrong."""
    rng = np.random.default_rng(0)
    counts = tiles_per_slide or [TILES] * SLIDES
    keys, slides, labels, probs = [], [], [], []
    for s, n in enumerate(counts):
        label = s % 2
        right = s % 4 != 0 or s // 4 >= WRONG
        predicted = label if right else 1 - label
        for t in range(n):
            keys.append(f"s{s:02d}_{t}_0")
            slides.append(f"s{s:02d}")
            labels.append(label)
            p = rng.uniform(0.8, 0.99)
            probs.append([p, 1 - p] if predicted == 0 else [1 - p, p])
    order = rng.permutation(len(keys))  # the stream order mixes slides
    return TilePredictions(
        keys=[keys[i] for i in order],
        slides=np.array(slides)[order],
        labels=np.array(labels, dtype=np.int64)[order],
        probs=np.array(probs)[order],
    )


def test_tile_interval_has_the_slide_spread_not_the_binomial_one() -> None:
    from resdistill.eval.evaluate import score_predictions

    preds = whole_slide_predictions()
    tile, slide = score_predictions(preds, CLASSES, n_boot=2000, seed=5)
    acc = tile["accuracy"]
    assert acc["value"] == pytest.approx(1 - WRONG / SLIDES)
    width = acc["high"] - acc["low"]
    binomial = 2 * 1.96 * math.sqrt(0.75 * 0.25 / (SLIDES * TILES))
    slide_spread = 2 * 1.96 * math.sqrt(SLIDES / 2 * 0.5 * 0.5) / SLIDES  # class 0 varies
    assert width == pytest.approx(slide_spread, rel=0.2)
    assert width > 4 * binomial
    # With equal tiles per slide, resampling slides gives tile accuracy exactly the slide
    # accuracy of each resample: the same draws give the same interval as the slide level.
    assert slide["accuracy"] == acc
    # The resampling unit and the number of slides are stated beside the number of tiles.
    assert tile["resample"] == slide["resample"] == "slide"
    assert (tile["n"], tile["n_slides"]) == (SLIDES * TILES, SLIDES)
    assert (slide["n"], slide["n_slides"]) == (SLIDES, SLIDES)
    json.dumps(tile, allow_nan=False)


def test_slide_bootstrap_ignores_tile_order_and_weights_tiles() -> None:
    """The same slides in another tile order give the same intervals; with unequal slides each
    resample's metric counts every tile of each drawn slide (checked against an explicit pass)."""
    counts = [10 + 7 * (s % 5) for s in range(SLIDES)]
    preds = whole_slide_predictions(counts)
    report = evaluate_predictions(
        preds.labels, preds.probs, CLASSES, n_boot=300, seed=2, groups=preds.slides, unit="slide"
    )
    flip = np.arange(len(preds))[::-1]
    again = evaluate_predictions(
        preds.labels[flip], preds.probs[flip], CLASSES, n_boot=300, seed=2,
        groups=preds.slides[flip], unit="slide",
    )  # fmt: skip
    assert again == report
    # explicit cluster bootstrap: draw slides (sorted ids) with replacement within each class
    # (class 0 first), pool their tiles
    ids = np.unique(preds.slides)
    by_class = [np.array([i for i in ids if int(i[1:]) % 2 == c]) for c in (0, 1)]
    right = preds.probs.argmax(1) == preds.labels
    rng = np.random.default_rng(2)
    accs = []
    for _ in range(300):
        drawn = np.concatenate([m[rng.integers(0, m.size, size=m.size)] for m in by_class])
        idx = np.concatenate([np.flatnonzero(preds.slides == s) for s in drawn])
        accs.append(right[idx].mean())
    low, high = np.percentile(accs, [2.5, 97.5])
    assert report["accuracy"]["low"] == pytest.approx(low)
    assert report["accuracy"]["high"] == pytest.approx(high)
    # without groups every sample is its own unit (the plain bootstrap, as before)
    plain = evaluate_predictions(preds.labels, preds.probs, CLASSES, n_boot=300, seed=2)
    assert (report["resample"], report["n_units"]) == ("slide", SLIDES)
    assert (plain["resample"], plain["n_units"]) == ("sample", len(preds))
    assert plain["accuracy"]["high"] - plain["accuracy"]["low"] < 0.5 * (high - low)


def few_slides(seed: int, n: int = 5, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` slide-level predictions of ``k`` classes (each class at least once), a few wrong:
    the demo's size, where a plain resample of slides often misses a class."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(k), rng.integers(0, k, size=n - k)]
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_a_point_estimate_is_never_outside_its_interval() -> None:
    """With 5 slides and 3 classes a resample of slides often misses a class (the demo printed
    macro F1 0.899 [0.467, 0.903]). Stratified or not, every reported interval contains its
    estimate, or is left out with the reason stated."""
    from resdistill.measures.bootstrap import MISSED_CLASS

    keys = ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "macro_recall",
            "macro_auc")  # fmt: skip
    classes = ["a", "b", "c"]
    missed = 0
    for seed in range(40):
        y, prob = few_slides(seed)
        for stratify in (True, False):
            report = evaluate_predictions(y, prob, classes, n_boot=200, seed=seed,
                                          stratify=stratify)  # fmt: skip
            entries = [report[k] for k in keys] + list(report["auc"].values())
            for e in entries:
                if e["low"] is not None:
                    assert e["low"] <= e["value"] <= e["high"], (seed, stratify, e)
            if not stratify and report["undefined"].get("macro_f1") == MISSED_CLASS:
                missed += 1
                assert report["macro_f1"]["low"] is None and report["macro_f1"]["value"]
            if stratify:  # each class is one slide's: no resample misses one
                assert "macro_f1" not in report["undefined"]
                assert report["units_per_class"] == report["support"]
    assert missed > 20  # unstratified, most of these small sets lose a class in some resample


def test_an_interval_that_excludes_its_estimate_is_left_out() -> None:
    """A statistic the bootstrap cannot resample (the share of distinct samples: 1 on the data,
    about 0.63 in every resample) gives percentiles that exclude the estimate: no interval."""
    from resdistill.measures.bootstrap import MISSED_CLASS, OUTSIDE, bootstrap_ci, interval

    x = np.arange(50)
    point, low, high = bootstrap_ci(lambda t, _p: np.unique(t).size / t.size, x, x, n=200)
    assert point == 1.0 and math.isnan(low) and math.isnan(high)
    low, high, why = interval([0.5, 0.6, 0.7], 0.05, 0.9)
    assert math.isnan(low) and math.isnan(high) and why == OUTSIDE
    low, high, why = interval([0.5, 0.6, 0.7], 0.05, 0.6)
    assert why is None and low < 0.6 < high
    assert interval([0.5, math.nan], 0.05, 0.5)[2] == MISSED_CLASS  # a resample without a value
