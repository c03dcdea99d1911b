"""Metrics against scikit-learn (an independent implementation, test-only) on fixed inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from resdistill.measures.bootstrap import bootstrap_ci, evaluate_predictions
from resdistill.measures.metrics import (
    accuracy,
    aggregate_slides,
    balanced_accuracy,
    binary_roc_auc,
    confusion_matrix,
    confusion_metrics,
    macro_auc,
    macro_f1,
    macro_precision,
    macro_recall,
    per_class_auc,
    roc_curve,
)

CLASSES = ["acinar", "lepidic", "solid"]


def random_case(seed: int, n: int = 300, k: int = 3, skill: float = 1.5):
    """Labels and softmax probabilities that are informative but imperfect."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_metrics_match_sklearn(seed: int) -> None:
    y, prob = random_case(seed, k=4, skill=0.7)
    pred = prob.argmax(1)
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert macro_f1(y, pred) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert macro_precision(y, pred) == pytest.approx(
        skm.precision_score(y, pred, average="macro", zero_division=0)
    )
    assert macro_recall(y, pred) == pytest.approx(
        skm.recall_score(y, pred, average="macro", zero_division=0)
    )
    np.testing.assert_array_equal(
        confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4))
    )


def test_label_metrics_with_zero_divisions_match_sklearn() -> None:
    # class 3 is never predicted (precision 0/0), class 2 never occurs in y_true (recall 0/0)
    y = np.array([0, 0, 1, 1, 3, 3, 0, 1])
    pred = np.array([0, 2, 1, 0, 1, 0, 2, 1])
    for labels in (None, [0, 1, 2, 3]):
        kw = {"labels": labels, "average": "macro", "zero_division": 0}
        assert macro_precision(y, pred, labels) == pytest.approx(skm.precision_score(y, pred, **kw))
        assert macro_recall(y, pred, labels) == pytest.approx(skm.recall_score(y, pred, **kw))
        assert macro_f1(y, pred, labels) == pytest.approx(skm.f1_score(y, pred, **kw))
    # with an explicit label list that adds a class absent from both, it counts as 0
    assert macro_f1(y, pred, [0, 1, 2, 3, 4]) == pytest.approx(
        skm.f1_score(y, pred, labels=[0, 1, 2, 3, 4], average="macro", zero_division=0)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_auc_matches_sklearn(seed: int) -> None:
    y, exact = random_case(seed)
    assert macro_auc(y, exact) == pytest.approx(skm.roc_auc_score(y, exact, multi_class="ovr"))
    prob = np.round(exact, 2)  # force many ties
    aucs = per_class_auc(y, prob)
    for k in range(3):
        assert aucs[k] == pytest.approx(skm.roc_auc_score(y == k, prob[:, k]), abs=1e-12)
    assert macro_auc(y, prob) == pytest.approx(np.mean(aucs))


def test_auc_by_hand_with_ties() -> None:
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5) (0.8>0.2) (0.5=0.5 -> 1/2) (0.5>0.2)
    assert binary_roc_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(3.5 / 4)
    assert binary_roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert binary_roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert math.isnan(binary_roc_auc([1, 1], [0.1, 0.2]))


def test_roc_curve_matches_sklearn() -> None:
    y, prob = random_case(3, n=120)
    prob = np.round(prob, 2)
    for k in range(3):
        fpr, tpr, thr = roc_curve(y == k, prob[:, k])
        sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y == k, prob[:, k], drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        np.testing.assert_array_equal(thr[1:], sk_thr[1:])
        assert thr[0] == np.inf
        assert np.trapezoid(tpr, fpr) == pytest.approx(binary_roc_auc(y == k, prob[:, k]))


def test_absent_class_and_single_class() -> None:
    y = np.array([0, 1, 0, 1, 1])  # class 2 absent
    prob = np.array(
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    )
    aucs = per_class_auc(y, prob)
    assert math.isnan(aucs[2]) and np.isfinite(aucs[:2]).all()
    report = evaluate_predictions(y, prob, CLASSES, n_boot=50)
    assert report["auc"]["solid"] == {"value": None, "low": None, "high": None}
    assert "solid" not in report["roc"]
    assert report["macro_auc"]["value"] == pytest.approx(np.mean(aucs[:2]))
    # a single class: accuracy defined, every AUC undefined
    single = evaluate_predictions([1, 1, 1], prob[:3], CLASSES, n_boot=20)
    # predictions 0, 1, 0 (the tie in row 3 goes to the lowest index)
    assert single["accuracy"]["value"] == pytest.approx(1 / 3)
    assert all(v["value"] is None for v in single["auc"].values())
    assert single["macro_auc"]["value"] is None
    json.dumps(single, allow_nan=False)  # serialisable, no NaN


def test_empty_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="empty"):
        per_class_auc(np.array([], dtype=int), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="empty"):
        evaluate_predictions([], np.zeros((0, 3)), CLASSES)
    with pytest.raises(ValueError, match="no tiles"):
        aggregate_slides([], np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match="samples"):
        accuracy([0, 1], [0])


def test_bootstrap_ci_contains_point_and_is_deterministic() -> None:
    y, prob = random_case(4, n=200)

    def acc(t: np.ndarray, p: np.ndarray) -> float:
        return accuracy(t, p.argmax(1))

    point, low, high = bootstrap_ci(acc, y, prob, n=500, seed=7)
    assert point == pytest.approx(skm.accuracy_score(y, prob.argmax(1)))
    assert low < point < high
    assert bootstrap_ci(acc, y, prob, n=500, seed=7) == (point, low, high)
    assert bootstrap_ci(acc, y, prob, n=500, seed=8) != (point, low, high)
    # the bootstrap standard error of a proportion is about sqrt(p(1-p)/n)
    se = math.sqrt(point * (1 - point) / y.size)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_bootstrap_ci_narrows_with_more_data() -> None:
    widths = []
    for n in (100, 1600):
        y, prob = random_case(5, n=n)
        _, low, high = bootstrap_ci(lambda t, p: macro_auc(t, p), y, prob, n=300, seed=0)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(16) = 1/4 in theory


def test_evaluate_predictions_report() -> None:
    y, prob = random_case(6, n=150)
    names = np.array(CLASSES)[y]  # class names are accepted as well as indices
    report = evaluate_predictions(names, prob, CLASSES, n_boot=200, seed=3)
    assert report == evaluate_predictions(y, prob, CLASSES, n_boot=200, seed=3)
    pred = prob.argmax(1)
    assert report["n"] == 150
    assert report["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert report["macro_f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    for k, name in enumerate(CLASSES):
        entry = report["auc"][name]
        assert entry["value"] == pytest.approx(skm.roc_auc_score(y == k, prob[:, k]))
        assert entry["low"] <= entry["value"] <= entry["high"]
        assert report["roc"][name]["fpr"][0] == 0.0 and report["roc"][name]["tpr"][-1] == 1.0
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "macro_auc"):
        assert report[key]["low"] <= report[key]["value"] <= report[key]["high"], key
    assert report["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert sum(report["support"].values()) == 150
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="not in classes"):
        evaluate_predictions(["acinar", "papillary"], prob[:2], CLASSES)


def test_evaluate_intervals_agree_with_bootstrap_ci() -> None:
    # evaluate_predictions reweights samples instead of indexing them: same draws (stratified by
    # the true class), same numbers; macro averages over the full data's classes in every resample
    y, prob = random_case(7, n=90)
    prob = np.round(prob, 1)  # ties in the scores and in the argmax
    report = evaluate_predictions(y, prob, CLASSES, n_boot=150, seed=11, alpha=0.1)
    labels = np.union1d(y, prob.argmax(1))
    fns = {
        "accuracy": lambda t, p: accuracy(t, p.argmax(1)),
        "balanced_accuracy": lambda t, p: balanced_accuracy(t, p.argmax(1)),
        "macro_f1": lambda t, p: macro_f1(t, p.argmax(1), labels),
        "macro_precision": lambda t, p: macro_precision(t, p.argmax(1), labels),
        "macro_recall": lambda t, p: macro_recall(t, p.argmax(1), labels),
        "macro_auc": macro_auc,
    }
    for k in range(3):
        fns[CLASSES[k]] = lambda t, p, k=k: binary_roc_auc(t == k, p[:, k])
    for key, fn in fns.items():
        entry = report["auc"][key] if key in CLASSES else report[key]
        expected = bootstrap_ci(fn, y, prob, n=150, alpha=0.1, seed=11, strata=y)
        got = (entry["value"], entry["low"], entry["high"])
        assert got == pytest.approx(expected, abs=1e-12), key
    assert report["stratified"] and report["units_per_class"] == report["support"]
    assert report["undefined"] == {}
    # unstratified draws are bootstrap_ci's plain ones
    plain = evaluate_predictions(y, prob, CLASSES, n_boot=150, seed=11, alpha=0.1, stratify=False)
    expected = bootstrap_ci(fns["accuracy"], y, prob, n=150, alpha=0.1, seed=11)
    got = plain["accuracy"]
    assert (got["value"], got["low"], got["high"]) == pytest.approx(expected, abs=1e-12)


def test_aggregate_slides_mean_probability() -> None:
    slides = np.array(["s2", "s1", "s2", "s3", "s1", "s2"])
    prob = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5], [0.4, 0.6], [0.3, 0.7]], dtype=np.float32
    )
    labels = np.array([0, 1, 0, 1, 1, 0])
    agg = aggregate_slides(slides, prob, labels)
    assert agg.slide_ids.tolist() == ["s1", "s2", "s3"]
    np.testing.assert_allclose(agg.y_prob, [[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]], rtol=1e-6)
    assert agg.y_true.tolist() == [1, 0, 1]
    assert agg.n_tiles.tolist() == [2, 3, 1]
    ids, slide_prob, slide_true, _ = aggregate_slides(slides, prob)  # unlabeled: no y_true
    assert slide_true is None and ids.tolist() == ["s1", "s2", "s3"]
    with pytest.raises(ValueError, match="s2"):
        aggregate_slides(slides, prob, np.array([0, 1, 1, 1, 1, 0]))


def test_aggregate_slides_region_labels_take_the_predominant_class() -> None:
    """Region-labelled slides (annotations) hold tiles of several classes: the slide's label is
    its most frequent tile label (the predominant pattern), ties to the lower class index."""
    slides = np.array(["a", "a", "a", "b", "b", "c"])
    probs = np.full((6, 3), 1 / 3)
    labels = np.array([2, 0, 2, 1, 0, 1])
    with pytest.raises(ValueError, match="different labels"):
        aggregate_slides(slides, probs, labels)
    agg = aggregate_slides(slides, probs, labels, mixed_labels=True)
    assert agg.slide_ids.tolist() == ["a", "b", "c"]
    assert agg.y_true.tolist() == [2, 0, 1]
    assert agg.n_tiles.tolist() == [3, 2, 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_balanced_accuracy_and_confusion_metrics_match_sklearn(seed: int) -> None:
    y, prob = random_case(seed, k=4, skill=0.7)
    pred = prob.argmax(1)
    assert balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    got = confusion_metrics(confusion_matrix(y, pred, 4))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    # a required class without a true sample: the class averages are undefined, accuracy is not
    cm = confusion_matrix([0, 0, 1], [0, 2, 1], 3)
    missed = confusion_metrics(cm, labels=[0, 1, 2], required=[0, 1, 2])
    assert missed["accuracy"] == pytest.approx(2 / 3)
    for key in ("macro_f1", "macro_precision", "macro_recall", "balanced_accuracy"):
        assert math.isnan(missed[key]), key
    # without the requirement, class 2 counts with F1 0 (it was predicted but never true)
    assert confusion_metrics(cm)["macro_f1"] == pytest.approx(
        skm.f1_score([0, 0, 1], [0, 2, 1], average="macro", zero_division=0)
    )
