"""Tile-level confidence intervals resample slides, not tiles (tiles of a slide are not independent).

The constructed prediction set has whole slides right or wrong: 24 slides of 40 tiles, 18 slides
with every tile confidently right and 6 with every tile confidently wrong. Tile accuracy is then
the fraction of right slides, so its interval must have the width of a proportion over 24 slides
(about ``2 * 1.96 * sqrt(0.75 * 0.25 / 24) = 0.35``), not over 960 tiles (``0.055``, the
binomial width a tile bootstrap gives).
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
    slide_spread = 2 * 1.96 * math.sqrt(0.75 * 0.25 / SLIDES)
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
    # explicit cluster bootstrap: draw slides (sorted ids) with replacement, pool their tiles
    ids = np.unique(preds.slides)
    right = preds.probs.argmax(1) == preds.labels
    rng = np.random.default_rng(2)
    accs = []
    for _ in range(300):
        drawn = ids[rng.integers(0, ids.size, size=ids.size)]
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
