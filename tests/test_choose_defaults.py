"""``benchmarks/choose_defaults.py``: the table it prints from finished studies, the recipe it
chooses on validation metrics alone (a test metric is never read), and the ``resdistill study``
command line of each recipe (dataset and teachers reused)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "choose_defaults.py"


@pytest.fixture(scope="module")
def script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("choose_defaults", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(folder: Path, rows: list[tuple[str, str, float, float]]) -> None:
    """A finished study's validation.csv (as :mod:`resdistill.study.protocol` writes it) and a
    study.csv whose test accuracies rank the recipes the other way round."""
    folder.mkdir(parents=True)
    with (folder / "validation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "mag", "label_fraction", "unlabelled_share", "seeds", "val_accuracy",
                    "val_macro_f1", "select", "labelled_val_slides", "recipe"])  # fmt: skip
        w.writerows((k, m, fr, "", 1, acc, acc, "metric", 4, "defaults")
                    for k, m, fr, acc in rows)  # fmt: skip
    with (folder / "study.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "mag", "label_fraction", "accuracy"])
        w.writerows((k, m, fr, 1 - acc) for k, m, fr, acc in rows)  # test: the reverse order


def test_table_rows_and_gaps(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _study(tmp_path / "sites" / "kd4", [
        ("teacher", "10x", 1, 0.9), ("distilled", "2.5x", 1, 0.85), ("baseline", "2.5x", 1, 0.8),
        ("teacher", "10x", 0.1, 0.8), ("distilled", "2.5x", 0.1, 0.75), ("baseline", "2.5x", 0.1, 0.7),
    ])  # fmt: skip
    _study(tmp_path / "subtle" / "kd-5x", [("teacher", "10x", 1, 0.7), ("distilled", "5x", 1, 0.8)])
    rows = script.rows(tmp_path)
    assert [(r["cohort"], r["recipe"], r["student"]) for r in rows] == [
        ("sites", "kd4", "2.5x"), ("subtle", "kd-5x", "5x")]  # fmt: skip
    assert rows[0]["distilled-teacher@1"] == pytest.approx(-5.0)
    assert rows[0]["distilled-baseline@0.1"] == pytest.approx(5.0)
    assert rows[1]["distilled-teacher@1"] == pytest.approx(10.0)
    assert rows[1]["distilled-baseline@0.1"] is None
    table = script.markdown(rows)
    assert "| sites | kd4 | 2.5x | 0.900 | 0.850 |" in table and "| -5.0 | +5.0 |" in table
    assert "| subtle | kd-5x | 5x | 0.700 | 0.800 | - |" in table


def test_the_choice_reads_validation_only(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two recipes on two cohorts: validation prefers kd4, test (study.csv) the other. The choice
    follows validation, whether study.csv is poisoned, missing, or its test columns absent; a
    table holding a test metric is refused, never read."""
    for cohort in ("sites", "subtle"):
        _study(tmp_path / cohort / "kd4", [("distilled", "2.5x", 1, 0.9),
                                           ("distilled", "2.5x", 0.1, 0.8)])  # fmt: skip
        _study(tmp_path / cohort / "previous", [("distilled", "2.5x", 1, 0.85),
                                                ("distilled", "2.5x", 0.1, 0.7)])  # fmt: skip
    _study(tmp_path / "sites" / "stain", [("distilled", "2.5x", 1, 0.99)])  # one cohort only
    best, scores = script.choose(script.rows(tmp_path))
    assert best == "kd4" and scores == {"kd4": pytest.approx(0.85),
                                        "previous": pytest.approx(0.775)}  # fmt: skip
    for f in tmp_path.glob("*/*/study.csv"):  # poisoned: the test split says the opposite
        f.write_text("kind,mag,label_fraction,accuracy\ndistilled,2.5x,1,0.0\n")
    assert script.choose(script.rows(tmp_path))[0] == "kd4"
    for f in tmp_path.glob("*/*/study.csv"):
        f.unlink()
    assert script.choose(script.rows(tmp_path)) == (best, scores)
    poisoned = tmp_path / "sites" / "kd4" / "validation.csv"
    text = poisoned.read_text().splitlines()
    poisoned.write_text("\n".join([text[0] + ",accuracy", *(t + ",0.1" for t in text[1:])]))
    with pytest.raises(ValueError, match=r"\['accuracy'\] are not validation metrics"):
        script.rows(tmp_path)
    with pytest.raises(ValueError, match="never test metrics"):
        script.read_validation(tmp_path / "subtle" / "kd4" / "study.csv")


def test_a_recipe_reuses_the_dataset_and_the_teachers(script, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert script.run_one(tmp_path, "sites", "previous", 20, []) == 0
    assert calls[-1][calls[-1].index("--cohort") + 1] == "sites"  # nothing made yet: synthesise
    # the recipe is what is compared: no search inside the study, no controls
    assert calls[-1][calls[-1].index("--trials") + 1] == "1"
    assert calls[-1][calls[-1].index("--controls") + 1] == "none"
    (tmp_path / "sites" / "previous" / "dataset").mkdir(parents=True)
    (tmp_path / "sites" / "previous" / "dataset" / "dataset.json").write_text("{}")
    cells = tmp_path / "sites" / "previous" / "cells"
    cells.mkdir()
    for f in ("1", "0.1"):
        (cells / f"teacher-10x-l{f}-s0.json").write_text(json.dumps({"checkpoint": f"ckpt{f}"}))
    script.run_one(tmp_path, "sites", "kd4", 20, [])
    argv = calls[-1]
    assert "--cohort" not in argv
    assert argv[argv.index("--data") + 1] == str(tmp_path / "sites" / "previous" / "dataset")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--teacher"] == [
        "1=ckpt1",
        "0.1=ckpt0.1",
    ]
    assert argv[argv.index("--student-args") + 1] == "--temperature 4 --jitter 0 --hed-jitter 0"


def test_the_feature_term_follows_the_variants_validation(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The feature-term studies: each validation.csv row names its variant; the choice is the
    best mean over cohorts of validation accuracy, read from validation.csv alone."""
    for cohort, spatial in (("sites", 0.9), ("chromatin", 0.76)):
        folder = tmp_path / cohort / "feature-term"
        folder.mkdir(parents=True)
        with (folder / "validation.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "mag", "label_fraction", "unlabelled_share", "seeds",
                        "val_accuracy", "select", "labelled_val_slides", "recipe",
                        "feature_term"])  # fmt: skip
            for fr in (1, 0.1):
                w.writerow(["teacher", "10x", fr, "", 1, 0.99, "metric", 4, "defaults", ""])
                w.writerow(["distilled", "2.5x", fr, 1, 1, 0.8, "distill-loss", 0, "d", "global"])
                w.writerow(["feature-off", "2.5x", fr, 1, 1, 0.78, "distill-loss", 0, "d", "off"])
                w.writerow(["feature-spatial", "2.5x", fr, 1, 1, spatial, "distill-loss", 0, "d",
                            "spatial"])  # fmt: skip
        (folder / "study.csv").write_text("kind,accuracy\nfeature-off,1.0\n")  # never read
    found = script.feature_rows(tmp_path)
    assert found["sites"] == {"global": 0.8, "off": 0.78, "spatial": 0.9}
    best, scores = script.choose_feature(found)
    assert best == "spatial" and scores == pytest.approx({"off": 0.78, "global": 0.8,
                                                           "spatial": 0.83})  # fmt: skip
    tie = {"a": {"off": 0.5, "global": 0.5}}
    assert script.choose_feature(tie) == ("off", {"off": 0.5, "global": 0.5})  # the simplest
    assert "--ablations feature-term" in script.RECIPES["feature-term"][3]
    assert "chromatin" in script.COHORTS


def test_each_arm_is_chosen_on_its_own_validation(script, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The baseline prefers the paper's jitter, the distilled student none: each arm's choice
    follows its own validation accuracy, never the other arm's."""
    for cohort in ("sites", "subtle"):
        _study(tmp_path / cohort / "defaults", [
            ("distilled", "2.5x", 1, 0.9), ("baseline", "2.5x", 1, 0.7),
            ("distilled", "2.5x", 0.1, 0.8), ("baseline", "2.5x", 0.1, 0.6)])  # fmt: skip
        _study(tmp_path / cohort / "students-paper", [
            ("distilled", "2.5x", 1, 0.85), ("baseline", "2.5x", 1, 0.8),
            ("distilled", "2.5x", 0.1, 0.75), ("baseline", "2.5x", 0.1, 0.7)])  # fmt: skip
    table = script.rows(tmp_path)
    assert script.choose(table, "distilled")[0] == "defaults"
    best, scores = script.choose(table, "baseline")
    assert best == "students-paper"
    assert scores == {"defaults": pytest.approx(0.65), "students-paper": pytest.approx(0.75)}
    assert script.JITTER_RECIPES == ("defaults", "students-light", "students-paper")
    assert all(script.RECIPES[r][2] == "defaults" for r in script.JITTER_RECIPES[1:])


def test_teacher_jitter_then_temperature_from_the_chosen_teachers(
    script, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """``--recipes teachers,temperature``: the teacher arm chooses its jitter on its own
    validation score; the temperature recipes then distil from that recipe's teachers and keep
    the defaults' baselines (the same models) instead of training them again."""
    assert script.groups("teachers,temperature,kd4") == [
        ("teachers", script.TEACHER_RECIPES, ("teacher",)),
        ("temperature", script.TEMPERATURE_RECIPES, ("distilled",)),
        ("recipes", ("kd4",), script.ARMS),
    ]
    assert script.groups("feature-term") == [("feature-term", ("feature-term",), ())]
    with pytest.raises(ValueError, match="unknown recipe 'kd3'"):
        script.groups("teachers,kd3")
    teacher_acc = {"defaults": 0.8, "teachers-off": 0.9, "teachers-paper": 0.7}
    for cohort in ("sites", "subtle"):
        for recipe, acc in teacher_acc.items():
            if recipe == "teachers-paper" and cohort == "subtle":
                continue  # not yet run on every cohort: no choice
            _study(tmp_path / cohort / recipe, [("teacher", "10x", 1, acc),
                                                ("teacher", "10x", 0.1, acc - 0.1)])  # fmt: skip
            cells = tmp_path / cohort / recipe / "cells"
            cells.mkdir()
            for f in ("1", "0.1"):
                (cells / f"teacher-10x-l{f}-s0.json").write_text(
                    json.dumps({"checkpoint": f"{recipe}-{f}"}))  # fmt: skip
        (tmp_path / cohort / "defaults" / "cells" / "baseline-2p5x-l1-s0.json").write_text("{}")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    with pytest.raises(ValueError, match="run --recipes teachers first"):
        script.run_one(tmp_path, "sites", "kd-t1", 20, [], ["sites", "subtle"])
    _study(tmp_path / "subtle" / "teachers-paper", [("teacher", "10x", 1, 0.7)])
    assert script.chosen_teacher(tmp_path, ["sites", "subtle"]) == "teachers-off"
    script.run_one(tmp_path, "sites", "kd-t1", 20, [], ["sites", "subtle"])
    argv = calls[-1]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--teacher"] == [
        "1=teachers-off-1", "0.1=teachers-off-0.1"]  # fmt: skip
    assert argv[argv.index("--student-args") + 1] == "--temperature 1" and "--resume" in argv
    kept = tmp_path / "sites" / "kd-t1" / "cells" / "baseline-2p5x-l1-s0.json"
    assert kept.read_text() == "{}"  # the defaults' baseline, kept by --resume
    assert "--jitter 0" in script.RECIPES["teachers-off"][0]
    assert script.RECIPES["students-light"][1] and "students-light" not in script.BASELINE_FROM
