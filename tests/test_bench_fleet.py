"""The prediction fleet of ``benchmarks/scale_model.py --predict``: every figure marked measured or
extrapolated, node counts that finish the cohort in time, the cascade between its two models.
Arithmetic on a made-up ``bench_predict_scale.py --json`` document; no benchmark is run."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from scale_model import SHARD_VCPUS, Assumptions, predict_fleet  # noqa: E402

DOC = {
    "cores": 2,
    "args": {"slides": 16},
    "runs": {
        "10x": {"per_slide_s": 4.0},
        "2p5x": {"per_slide_s": 0.4},
        "1p25x": {"per_slide_s": 0.2},
    },
    "costs": {
        "tiles_per_slide": 400.0,
        "plan_ms": 100.0,
        "heatmaps_ms": 80.0,
        "read_ms_per_tile": {"10x": 2.0, "2p5x": 0.2, "1p25x": 0.1},
        "gflops": {"10x": 3.6, "2p5x": 0.26, "1p25x": 0.07},
    },  # fmt: skip
}


def test_every_figure_is_marked_and_nodes_finish_in_time() -> None:
    a = Assumptions(slides=10_000, hours=2.0)
    lines = predict_fleet(DOC, a)
    assert all(b.startswith(("measured", "extrapolated")) for _, _, b in lines)
    names = {q.split(":")[0] for q, _, _ in lines}
    assert {"10x", "2p5x", "1p25x", "cascade 1p25x+10x"} <= names
    rates = {q.split(":")[0]: v for q, v, _ in lines if "slides/hour per" in q}
    for q, v, _ in lines:
        if "slides in" in q:
            name = q.split(":")[0]
            cpu, gpu = (float(x.replace(",", "")) for x in rates[name].split(" / "))
            nodes = int(re.search(r"max_workers: (\d+)", v).group(1))
            rate = cpu if v.startswith("shard_cpu") else gpu
            assert nodes == max(1, math.ceil(a.slides / (rate * a.hours)))
    # the student on a CPU node: 16 vCPUs over its core-seconds on a slide of 2,989 tiles
    cpu_2p5x = float(rates["2p5x"].split(" / ")[0].replace(",", ""))
    scale = a.tiles_per_slide / 400.0
    core_s = (0.4 * 2 - 0.18) * scale + (0.1 * scale + 0.08)
    assert cpu_2p5x == pytest_approx(SHARD_VCPUS * 3600 / core_s)
    cascade = float(rates["cascade 1p25x+10x"].split(" / ")[0].replace(",", ""))
    assert float(rates["10x"].split(" / ")[0].replace(",", "")) < cascade
    assert cascade < float(rates["1p25x"].split(" / ")[0].replace(",", ""))


def pytest_approx(x: float) -> object:
    import pytest

    return pytest.approx(x, rel=2e-3, abs=1.0)
