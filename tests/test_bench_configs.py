"""The training configs the benchmarks build in Python are the ones the CLI builds from the same
options: the benchmarks time the runs users start (no run here, only configs compared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_serve, bench_train, run_all
from resdistill.commands import distill, teacher
from resdistill.commands.generate import parse
from resdistill.demo import DemoConfig
from resdistill.fields import to_plain
from resdistill.run_config import write_run_config


@pytest.mark.parametrize("stage", list(bench_train.STAGES))
def test_bench_train_stage_is_its_command(stage: str, tmp_path: Path) -> None:
    mag = "10x" if stage == "teacher" else "2.5x"
    got = bench_train.stage_config(stage, "ds/", "runs/t1/ckpt", "tg/", mag, tmp_path,
                                   name="n1", batch=8, steps=3, cpus=2)  # fmt: skip
    argv = ["--data", "ds/", "--storage", str(tmp_path / "runs"), "--name", "n1", "--workers",
            "1", "--cpus-per-worker", "2", "--loader-workers", "1", "--batch-size", "8",
            "--steps-per-epoch", "3", "--epochs", "1", "--trace-dir",
            str(tmp_path / "trace" / "n1")]  # fmt: skip
    if stage == "teacher":
        spec, argv = teacher.SPEC, [*argv, "--mag", mag]
    else:
        spec, argv = distill.SPEC, [*argv, "--student-mag", mag]
        if stage == "student":
            argv.append("--supervised")
        else:
            argv += ["--teacher", "runs/t1/ckpt", "--no-teacher-eval"]
            if stage == "cached":
                argv += ["--targets", "tg/"]
    assert got == parse(spec, argv)


@pytest.mark.parametrize("workers", [1, 2])
def test_run_all_ddp_is_distill(workers: int, tmp_path: Path) -> None:
    got = run_all.ddp_config("ds/", "runs/t1/ckpt", "tg/", tmp_path, mag="2p5x", batch=16,
                             steps=16, workers=workers)  # fmt: skip
    argv = ["--data", "ds/", "--teacher", "runs/t1/ckpt", "--targets", "tg/", "--student-mag",
            "2p5x", "--storage", str(tmp_path / "runs"), "--name", f"ddp{workers}", "--workers",
            str(workers), "--batch-size", "16", "--loader-workers", "1", "--steps-per-epoch",
            str(16 // workers), "--epochs", "2", "--jitter", "0", "--no-teacher-eval",
            "--shuffle-buffer", "64"]  # fmt: skip
    assert got == parse(distill.SPEC, argv)


def test_bench_serve_reads_the_demos_options(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    assert bench_serve.demo_config(demo) == DemoConfig(out=str(demo))  # no config.yaml: defaults
    ran = DemoConfig(out=str(demo), slides=6, seed=3, student_epochs=2, address="auto")
    write_run_config(str(demo), "demo", to_plain(ran))
    assert bench_serve.demo_config(demo) == DemoConfig(out=str(demo), slides=6, seed=3,
                                                       student_epochs=2)  # fmt: skip
