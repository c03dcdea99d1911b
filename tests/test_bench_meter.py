"""``bench_predict_scale.CpuMeter``: CPU seconds of this process and its children, split by
kind of process (what the predict benchmark reports per slide)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ray  # noqa: E402, F401  (its bundled psutil, which the meter uses)
from bench_predict_scale import CpuMeter  # noqa: E402

CHILD = """
import sys, time
t = time.process_time()
while time.process_time() - t < 0.4:
    pass
print("done", flush=True)
sys.stdin.read()
"""


def test_cpu_by_process_sums_to_the_total_and_names_the_child() -> None:
    with CpuMeter(every=0.05) as cpu:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        t = time.thread_time()
        while time.thread_time() - t < 0.2:  # this process's own CPU
            pass
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=30)
    parts = cpu.by_process
    assert set(parts) == {"driver", "actors", "tasks", "ray"}
    assert parts["tasks"] >= 0.15  # the child: not this process, a Ray actor or a daemon
    assert parts["driver"] >= 0.15
    # (the test session's own Ray cluster and S3 server are children too: their CPU, if any,
    # lands in "ray" and "tasks")
    assert sum(parts.values()) == pytest.approx(cpu.cpu_s)
    assert cpu.work_cpu_s == pytest.approx(cpu.cpu_s - parts["ray"])
