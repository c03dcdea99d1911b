"""The README's main command, shrunk: every stage of ``resdistill demo`` runs and writes its table."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end_tiny(tmp_path, ray_cluster):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "resdistill", "demo", "--out", str(out), "--slides", "8",
        "--size-um", "900x700", "--tile-px", "64", "--epochs", "1", "--student-epochs", "1",
        "--label-fraction", "0.5", "--batch-size", "16", "--address", ray_cluster,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "eval" / "demo.json").read_text())
    assert set(summary["models"]) == {
        "teacher",
        "baseline",
        "distilled",
        "distilled-cached",
        "teacher-50pct",
        "baseline-50pct",
        "distilled-50pct",
    }
    evaluation = json.loads((out / "eval" / "evaluation.json").read_text())
    names = [m["name"] for m in evaluation["models"]]
    assert names == list(summary["models"])
    assert (out / "eval" / "roc.png").stat().st_size > 0
    assert "demo finished" in res.stderr
