"""``benchmarks/choose_defaults.py``: the table it prints from finished studies, and the
``resdistill study`` command line of each recipe (dataset and teachers reused)."""

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
    folder.mkdir(parents=True)
    with (folder / "study.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "mag", "label_fraction", "accuracy"])
        w.writerows(rows)


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


def test_a_recipe_reuses_the_dataset_and_the_teachers(script, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert script.run_one(tmp_path, "sites", "previous", 20, []) == 0
    assert calls[-1][calls[-1].index("--cohort") + 1] == "sites"  # nothing made yet: synthesise
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
