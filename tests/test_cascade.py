"""The student-teacher cascade: its core formulas on hand-made arrays, the accuracy-vs-compute
curve, and ``resdistill evaluate --cascade`` on the evaluation fixtures of ``test_evaluate``
(a fitted 10x teacher and a weaker 5x student), whose endpoints must repeat the two models' own
evaluated accuracies."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from resdistill.cascade.curve import (
    DEFAULT_THRESHOLDS,
    best_point,
    cascade_curve,
    parse_thresholds,
    slide_bootstrap_accuracy,
)
from resdistill.cascade.rules import cascade_flops, check_threshold, combine, escalate
from resdistill.commands import evaluate as eval_cmd
from resdistill.eval.results import TilePredictions
from tests.test_evaluate import (  # noqa: F401 (fixtures)
    CLASSES,
    TEST_SAMPLES,
    _bad_ckpt,
    _cli,
    checkpoints,
    eval_data,
    evaluated,
)

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# core formulas
# ---------------------------------------------------------------------------------------------


def test_escalate_exactly_the_tiles_under_the_threshold() -> None:
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0]])
    assert escalate(p, 0.8).tolist() == [False, True, False, True, False]  # 0.8 itself stays
    assert escalate(p, 0.0).tolist() == [False] * 5  # the pure student
    assert escalate(p, 1.0).tolist() == [True, True, True, True, False]  # only a sure 1.0 stays
    assert escalate(p, 1.01).all()  # any threshold above 1: every tile
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(3), size=200)
    for t in (0.4, 0.55, 0.7, 0.9):
        np.testing.assert_array_equal(escalate(q, t), np.array([max(r) < t for r in q]))
    with pytest.raises(ValueError, match=r"must be \(n, K\)"):
        escalate(np.array([0.5, 0.5]), 0.8)


def test_combine_takes_teacher_rows_where_escalated() -> None:
    s = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    t = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7]])
    m = np.array([False, True, True])
    expect = np.array([[0.9, 0.1], [0.1, 0.9], [0.3, 0.7]])
    np.testing.assert_array_equal(combine(s, t, m), expect)  # teacher scored every tile
    np.testing.assert_array_equal(combine(s, t[m], m), expect)  # only the escalated ones
    np.testing.assert_array_equal(combine(s, t, np.zeros(3, bool)), s)
    assert combine(s, t, m) is not s and s[1, 0] == 0.6  # the student's array is untouched
    with pytest.raises(ValueError, match="expected 3 or 2"):
        combine(s, t[:1], m)


def test_cascade_flops_formula() -> None:
    assert cascade_flops(100, 0, 7, 1000) == 700  # pure student
    assert cascade_flops(100, 100, 7, 1000) == 100 * 1007  # every tile: the student runs too
    assert cascade_flops(100, 25, 7, 1000) == 700 + 25_000
    big = cascade_flops(10**6, 10**5, 3_630_000_000, 58_000_000_000)
    assert big == 10**6 * 3_630_000_000 + 10**5 * 58_000_000_000 and isinstance(big, int)


def test_parse_thresholds() -> None:
    assert parse_thresholds("0.9, 0,0.5,0.9,1") == [0.0, 0.5, 0.9, 1.0]
    for bad, needle in (("0.5,1.5", "1.5 is out of range"), ("-0.1", "out of range"),
                        ("0.5,x", "'x' is not a number"), (",", "no threshold")):  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            parse_thresholds(bad)
    assert all(0 <= t <= 1 for t in DEFAULT_THRESHOLDS) and DEFAULT_THRESHOLDS[0] == 0
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0
    for bad in (float("nan"), 1.0000001, -1e-9):
        with pytest.raises(ValueError, match="out of range"):
            check_threshold(bad)


# ---------------------------------------------------------------------------------------------
# the curve on hand-made predictions
# ---------------------------------------------------------------------------------------------


def _preds(keys: list[str], slides: list[str], labels: list[int], probs: Any) -> TilePredictions:
    return TilePredictions(keys, np.array(slides), np.array(labels), np.asarray(probs, float))


@pytest.fixture
def hand_made() -> tuple[TilePredictions, TilePredictions]:
    """8 tiles of 4 slides; the student is right on the confident tiles only, the teacher on all
    but one; the teacher's tiles come in another order (matched by key)."""
    keys = [f"s{i // 2}_{i}" for i in range(8)]
    slides = [f"s{i // 2}" for i in range(8)]
    labels = [0, 0, 1, 1, 0, 0, 1, 1]
    s_top = [0.95, 0.9, 0.85, 0.7, 0.65, 0.6, 0.55, 0.99]
    s_right = [True, True, True, False, False, True, False, True]
    s_probs = []
    for y, top, ok in zip(labels, s_top, s_right, strict=True):
        k = y if ok else 1 - y
        s_probs.append([top, 1 - top] if k == 0 else [1 - top, top])
    t_probs = [[0.1, 0.9] if y else [0.9, 0.1] for y in labels]
    t_probs[0] = [0.2, 0.8]  # the teacher's one mistake (a tile the student gets right)
    order = [3, 0, 7, 5, 1, 6, 2, 4]
    student = _preds(keys, slides, labels, s_probs)
    teacher = _preds(
        [keys[i] for i in order], [slides[i] for i in order], [labels[i] for i in order],
        [t_probs[i] for i in order],
    )  # fmt: skip
    return student, teacher


def test_curve_endpoints_and_points(hand_made: tuple[TilePredictions, TilePredictions]) -> None:
    student, teacher = hand_made
    fs, ft = 10, 160
    curve = cascade_curve(student, teacher, fs, ft, [0.0, 0.8, 0.9, 1.0], n_boot=200)
    pts = {p["label"]: p for p in curve["points"]}
    assert list(pts) == ["0", "0.8", "0.9", "1", ">1"]
    assert [p["kind"] for p in curve["points"]] == [
        "student",
        "cascade",
        "cascade",
        "cascade",
        "all",
    ]
    # endpoints: the pure student and the teacher's own accuracy
    assert pts["0"]["tile_accuracy"]["value"] == pytest.approx(5 / 8)
    assert pts["0"]["escalated"] == 0 and pts["0"]["flops_per_tile"] == fs
    assert pts[">1"]["tile_accuracy"]["value"] == pytest.approx(7 / 8)
    assert pts[">1"]["escalated"] == 8 and pts[">1"]["flops_per_tile"] == fs + ft
    assert curve["teacher"]["tile_accuracy"]["value"] == pytest.approx(7 / 8)
    assert curve["teacher"]["flops_per_tile"] == ft and curve["teacher"]["compute_ratio"] == 1
    # t = 0.8: tiles with top < 0.8 (indices 3, 4, 5, 6) go to the teacher, all right there
    p = pts["0.8"]
    assert p["escalated"] == 4 and p["share"] == 0.5
    assert p["tile_accuracy"]["value"] == pytest.approx(8 / 8)
    assert p["flops_per_tile"] == pytest.approx(fs + 0.5 * ft)
    assert p["compute_ratio"] == pytest.approx((fs + 0.5 * ft) / ft)
    # t = 0.9: also tiles 2 (0.85); t = 1: every tile but none at top 1.0 -> all 8
    assert pts["0.9"]["escalated"] == 5 and pts["1"]["escalated"] == 8
    # the best: cheapest within 1 point of 7/8 -> 0.8 (0.9 and 1 cost more)
    assert curve["best"]["label"] == "0.8"
    assert curve["n_tiles"] == 8 and curve["n_slides"] == 4
    for point in curve["points"]:
        acc = point["tile_accuracy"]
        assert acc["low"] <= acc["value"] <= acc["high"]
        assert point["slide_accuracy"]["value"] is not None
    # none close enough: a teacher far better than every threshold of the grid
    strict = best_point(curve["points"][:1], curve["teacher"])
    assert strict is None


def test_curve_tile_interval_is_the_slide_bootstrap_of_evaluate(
    hand_made: tuple[TilePredictions, TilePredictions],
) -> None:
    from resdistill.measures.bootstrap import evaluate_predictions

    student, _ = hand_made
    rng = np.random.default_rng(1)
    slides = rng.choice([f"slide{i}" for i in range(7)], size=60)
    labels = rng.integers(0, 2, size=60)
    probs = rng.dirichlet([1, 1], size=60)
    ref = evaluate_predictions(labels, probs, CLASSES, n_boot=300, seed=4, groups=slides)
    ours = slide_bootstrap_accuracy(
        probs.argmax(1) == labels, slides, n_boot=300, alpha=0.05, seed=4, labels=labels
    )
    for bound in ("value", "low", "high"):
        assert ours[bound] == pytest.approx(ref["accuracy"][bound], abs=1e-12)


def test_curve_rejects_other_tiles(hand_made: tuple[TilePredictions, TilePredictions]) -> None:
    student, teacher = hand_made
    other = _preds(["x", *teacher.keys[1:]], list(teacher.slides), list(teacher.labels),
                   teacher.probs)  # fmt: skip
    with pytest.raises(ValueError, match="not by the teacher"):
        cascade_curve(student, other, 1, 2)


# ---------------------------------------------------------------------------------------------
# evaluate --cascade
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cascaded(
    eval_data: Path,  # noqa: F811
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[int, Path, str]:
    """``evaluate STUDENT --cascade TEACHER`` with the bootstrap settings of ``evaluated``
    (300 resamples, seed 0), so the endpoints can be compared interval and all."""
    out = tmp_path_factory.mktemp("cascade-out")
    argv = [str(checkpoints["student"]), "--cascade", str(checkpoints["teacher"])]
    argv += ["--data", str(eval_data), "--out", str(out), "--n-boot", "300"]
    argv += ["--bench-seconds", "0.2", "--bench-batch", "8"]
    argv += ["--loader-workers", "1", "--batch-size", "10"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = _cli(eval_cmd, argv)
    return rc, out, stdout.getvalue()


def test_evaluate_cascade_endpoints_repeat_the_models_own_accuracy(
    cascaded: tuple[int, Path, str],
    evaluated: tuple[int, Path, str],  # noqa: F811
    checkpoints: dict[str, Path],  # noqa: F811
) -> None:
    rc, out, stdout = cascaded
    assert rc == 0
    doc = json.loads((out / "cascade.json").read_text())
    own = json.loads((out / "evaluation.json").read_text())
    both = {
        m["name"]: m for m in json.loads((evaluated[1] / "evaluation.json").read_text())["models"]
    }
    assert [m["name"] for m in own["models"]] == ["student"]
    (curve,) = doc["curves"]
    assert curve["student"] == "student" and curve["mag"] == "5x"
    assert doc["teacher"]["mag"] == "10x" and doc["teacher"]["checkpoint"] == str(
        checkpoints["teacher"]
    )
    assert curve["n_tiles"] == TEST_SAMPLES
    labels = [p["label"] for p in curve["points"]]
    assert labels == [f"{t:g}" for t in DEFAULT_THRESHOLDS] + [">1"]
    first, last = curve["points"][0], curve["points"][-1]
    # t = 0 is the student as evaluate scores it, interval included (same slide draws)
    for key, level in (("tile_accuracy", "tile"), ("slide_accuracy", "slide")):
        for bound in ("value", "low", "high"):
            assert first[key][bound] == pytest.approx(own["models"][0][level]["accuracy"][bound])
            assert last[key][bound] == pytest.approx(both["teacher"][level]["accuracy"][bound])
            assert curve["teacher"][key][bound] == pytest.approx(last[key][bound])
    assert first["kind"] == "student" and first["escalated"] == 0
    assert last["kind"] == "all" and last["escalated"] == TEST_SAMPLES
    # compute: counted FLOPs of both models, F_s + share * F_t
    fs, ft = own["models"][0]["compute"]["flops"], both["teacher"]["compute"]["flops"]
    assert (curve["student_flops"], curve["teacher_flops"], doc["teacher"]["flops"]) == (fs, ft, ft)
    for p in curve["points"]:
        assert p["flops_per_tile"] == pytest.approx(fs + p["share"] * ft)
        assert p["compute_ratio"] == pytest.approx(p["flops_per_tile"] / ft)
    shares = [p["share"] for p in curve["points"]]
    assert shares == sorted(shares)  # a higher threshold escalates a superset
    # the best: cheapest grid point within 1 point of the teacher, named in the output
    floor = curve["teacher"]["tile_accuracy"]["value"] - 0.01
    ok = [p for p in curve["points"][:-1] if p["tile_accuracy"]["value"] >= floor - 1e-12]
    if ok:
        assert curve["best"]["flops_per_tile"] == min(p["flops_per_tile"] for p in ok)
        assert f"threshold {curve['best']['label']}," in " ".join(stdout.split())
    else:
        assert curve["best"] is None and "no threshold keeps" in stdout
    # files and the printed table
    assert doc["files"]["cascade"] == own["files"]["cascade"] == str(out / "cascade.json")
    assert own["files"]["report"] == str(out / "evaluation.json")
    assert doc["files"]["cascade_plot"] == str(out / "cascade.png")
    with Image.open(out / "cascade.png") as img:
        assert img.format == "PNG" and img.width > 800 and img.height > 400
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
    assert "cascade student (5x) -> teacher (10x)" in " ".join(stdout.split())
    assert "teacher alone" in stdout and "(every tile)" in stdout


def test_evaluate_cascade_reuses_a_listed_teacher(
    cascaded: tuple[int, Path, str],
    eval_data: Path,  # noqa: F811
    checkpoints: dict[str, Path],  # noqa: F811
) -> None:
    from resdistill.eval.cascade_eval import evaluate_cascade
    from resdistill.eval.config import EvaluateConfig

    report, doc = evaluate_cascade(EvaluateConfig(
        checkpoints=(str(checkpoints["teacher"]), str(checkpoints["student"])),
        data=str(eval_data), cascade=str(checkpoints["teacher"]), split="test", n_boot=300,
        loader_workers=0, bench_seconds=0.05, bench_batch=4, plots=False,
    ))  # fmt: skip
    assert [ev.name for ev in report.models] == ["teacher", "student"]
    (curve,) = doc["curves"]  # the teacher is no student of itself
    earlier = json.loads((cascaded[1] / "cascade.json").read_text())["curves"][0]
    for a, b in zip(curve["points"], earlier["points"], strict=True):
        assert a["escalated"] == b["escalated"]
        assert a["tile_accuracy"]["value"] == pytest.approx(b["tile_accuracy"]["value"])


def test_evaluate_cascade_on_s3(tiny_dataset_s3: str, checkpoints: dict[str, Path]) -> None:  # noqa: F811
    """Dataset and output on S3, a threshold grid of two: the files land beside evaluation.json."""
    from resdistill.eval.cascade_eval import evaluate_cascade
    from resdistill.eval.config import EvaluateConfig
    from sharding.storage import open_storage

    out = tiny_dataset_s3.rsplit("/", 1)[0] + "/eval-cascade"
    report, doc = evaluate_cascade(EvaluateConfig(
        checkpoints=(str(checkpoints["student"]),), data=tiny_dataset_s3,
        cascade=str(checkpoints["teacher"]), split="test", out=out, thresholds=(0.0, 0.8),
        n_boot=50, loader_workers=0, bench_seconds=0.05, bench_batch=4,
    ))  # fmt: skip
    store = open_storage(out)
    saved = json.loads(store.read_bytes("cascade.json"))
    assert [p["label"] for p in saved["curves"][0]["points"]] == ["0", "0.8", ">1"]
    assert saved["curves"][0]["n_tiles"] == 8 and saved["data"] == tiny_dataset_s3
    assert store.read_bytes("cascade.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.files["cascade"] == store.child_url("cascade.json")
    index = json.loads(store.read_bytes("evaluation.json"))["files"]
    assert index["cascade_plot"] == store.child_url("cascade.png")


def test_thresholds_help_names_the_default_grid() -> None:
    from resdistill.commands.generate import build_parser

    parser = build_parser(eval_cmd.SPEC)
    (action,) = [a for a in parser._actions if "--thresholds" in a.option_strings]
    assert ",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS) in action.help


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("classes", "the teacher predicts ['a', 'b'] but"),
        ("mag", "--cascade "),
        ("missing", "--cascade: "),
        ("threshold", "--thresholds: 1.5 is out of range"),
        ("no-cascade", "--thresholds needs --cascade"),
        ("only-teacher", "every CKPT is the teacher itself"),
    ],
)
def test_evaluate_cascade_errors_are_one_line(
    case: str,
    needle: str,
    eval_data: Path,  # noqa: F811
    checkpoints: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpts = [str(checkpoints["student"])]
    extra = ["--cascade", str(checkpoints["teacher"])]
    if case == "classes":
        bad = _bad_ckpt(tmp_path, "c", stage="t", mag="10x", tile_px=32, classes=("a", "b"))
        extra = ["--cascade", str(bad)]
    elif case == "mag":
        bad = _bad_ckpt(tmp_path, "m", stage="t", mag="20x", tile_px=64)
        extra = ["--cascade", str(bad)]
        needle = "works at 20x but dataset"
    elif case == "missing":
        extra = ["--cascade", str(tmp_path / "nowhere" / "checkpoint_epoch0001")]
    elif case == "threshold":
        extra += ["--thresholds", "0.5,1.5"]
    elif case == "no-cascade":
        extra = ["--thresholds", "0.5"]
    elif case == "only-teacher":
        ckpts = [str(checkpoints["teacher"])]
    out = tmp_path / "o"
    argv = [*ckpts, *extra, "--data", str(eval_data), "--out", str(out), "--loader-workers", "0"]
    assert _cli(eval_cmd, argv) == 2
    stderr = capsys.readouterr().err
    (line,) = [ln for ln in stderr.splitlines() if "evaluate: error:" in ln]  # options: argparse's
    assert needle in line, stderr
    if case == "mag":
        assert line.startswith("evaluate: error: --cascade ")
    if case in ("threshold", "no-cascade"):  # refused by the config, before any model is loaded
        assert line.startswith("resdistill evaluate: error: ")
    assert not (tmp_path / "o" / "evaluation.json").exists()
    assert not (tmp_path / "o" / "cascade.json").exists()
