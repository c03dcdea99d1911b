"""The README's main command, shrunk: every stage of ``resdistill demo`` runs and writes its
table; and the demo's training runs are the training commands' configs of its options."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from resdistill.commands import distill, teacher
from resdistill.commands.generate import parse
from resdistill.config import STAGE_DISTILL, STAGE_SUPERVISED, STAGE_TEACHER, TeacherRef
from resdistill.demo import DemoConfig, stage_config


def test_demo_runs_are_the_commands_configs() -> None:
    """What ``resdistill teacher`` / ``distill`` resolve from the options the demo passed them
    as a command line before it built its configs directly."""
    cfg = DemoConfig(batch_size=16, epochs=3, student_epochs=2, address="127.0.0.1:1")
    common = ["--data", "/ds", "--storage", "/runs", "--batch-size", "16", "--workers", "1",
              "--cpus-per-worker", str(os.cpu_count() or 1), "--loader-workers", "1", "--seed",
              "0", "--address", "127.0.0.1:1", "--arch", "resnet-small"]  # fmt: skip
    assert stage_config(cfg, STAGE_TEACHER, "teacher", "/ds", "/runs") == parse(
        teacher.SPEC, [*common, "--name", "teacher", "--mag", "10x", "--epochs", "3"]
    )
    student = [*common, "--student-mag", "2.5x", "--epochs", "2"]
    scarce = {"label_fraction": 0.1, "steps_per_epoch": 7}
    baseline = stage_config(cfg, STAGE_SUPERVISED, "b", "/ds", "/runs", **scarce)
    assert baseline == parse(distill.SPEC, [*student, "--name", "b", "--supervised",
                                            "--label-fraction", "0.1", "--steps-per-epoch", "7"])  # fmt: skip
    distilled = stage_config(cfg, STAGE_DISTILL, "d", "/ds", "/runs", targets="/tgt")
    assert replace(distilled, teacher=TeacherRef(checkpoint="/t")) == parse(
        distill.SPEC, [*student, "--name", "d", "--teacher", "/t", "--targets", "/tgt"]
    )


@pytest.mark.slow
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
    assert (out / "config.yaml").stat().st_size > 0
