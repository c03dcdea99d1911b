"""evaluate resamples patients when the manifest names them: a patient's slides move together."""

from __future__ import annotations

import numpy as np

from resdistill.eval.evaluate import score_predictions
from resdistill.eval.results import TilePredictions


def _preds() -> TilePredictions:
    rng = np.random.default_rng(0)
    slides = np.repeat([f"s{i}" for i in range(8)], 5)
    labels = np.repeat([0, 1] * 4, 5)
    probs = rng.dirichlet([1, 1], size=slides.size)
    return TilePredictions([f"k{i}" for i in range(slides.size)], slides, labels, probs)


def test_the_unit_is_the_patient_when_every_slide_names_one() -> None:
    patients = {f"s{i}": f"p{i // 2}" for i in range(8)}  # two slides per patient
    tile, slide = score_predictions(_preds(), ["a", "b"], n_boot=50, patients=patients)
    assert tile["resample"] == slide["resample"] == "patient"
    assert tile["n_units"] == slide["n_units"] == 4
    tile, slide = score_predictions(_preds(), ["a", "b"], n_boot=50, patients={"s0": "p0"})
    assert tile["resample"] == "slide" and tile["n_units"] == 8  # not every slide has one
    assert score_predictions(_preds(), ["a", "b"], n_boot=50)[0]["resample"] == "slide"
