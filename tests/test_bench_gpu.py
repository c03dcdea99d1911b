"""``benchmarks/bench_gpu.py --smoke`` on the CPU: the prepared GPU benchmark records every model,
variant and loader measurement it promises, each with a positive rate, and its table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures_data import write_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_smoke_run_records_models_variants_and_loader(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data, mags=("10x", "2.5x"), tile_px=32, samples={"train": 48},
                  shards={"train": 3})  # fmt: skip
    out = tmp_path / "out" / "gpu.json"
    argv = [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--data", str(data),
            "--max-workers", "2", "--out", str(out),
            "--budget", "1200"]  # fmt: skip  # no measurement skipped on a loaded machine
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["done"] and doc["env"]["device"] == "cpu" and doc["env"]["cpus"] == os.cpu_count()

    # the teacher at 10x and a student at each lower magnification, tile edges from the top one
    models = doc["models"]
    shapes = {(r["role"], r["power"], r["px"]) for r in models}
    assert shapes == {("teacher", 10.0, 32), ("student", 5.0, 16), ("student", 2.5, 8),
                      ("student", 1.25, 4)}  # fmt: skip
    for role, power, _ in shapes:
        runs = {
            (r["variant"], r["mode"]) for r in models if (r["role"], r["power"]) == (role, power)
        }
        assert runs == {(v, m) for v in ("fp32", "bf16_cl") for m in ("infer", "train")}
    for r in models:
        assert "note" not in r, r
        assert r["images_per_s"] > 0 and r["first_s"] > 0
        assert r["gpu_util_mean"] is None  # no nvidia-smi reading off CUDA
    assert all(r["steps"] == 2 for r in models if r["mode"] == "train")
    assert any("compile skipped" in n for n in doc["notes"])

    # the loader at 1 .. cap workers on the host, then every worker preparing on the device
    cap = min(2, os.cpu_count() or 1)
    sweep = [1, 2] if cap == 2 else [1]
    want = {(what, w, "host") for w in sweep for what in ("student", "pair")}
    want |= {(what, cap, "device:cpu") for what in ("pair", "teacher train", "distill train")}
    loader = doc["loader"]
    assert {(r["what"], r["workers"], r["prep"]) for r in loader} == want
    for r in loader:
        assert "note" not in r, r
        assert r["samples_per_s"] > 0
        assert math.isclose(r["per_worker"], r["samples_per_s"] / r["workers"])
    mags = {tuple(r["mags"]) for r in loader}
    assert mags == {("2p5x",), ("10x",), ("10x", "2p5x"), ("2p5x", "10x")}

    # one row per record against its baseline, finite where the baseline was measured
    rows = doc["rows"]
    assert len(rows) == len(models) + len(loader)
    assert all(r["ours_value"] > 0 for r in rows)
    fp32 = [r for r in rows[: len(models)] if r["ours"] == "fp32"]
    assert fp32 and all(r["ratio"] == 1.0 for r in fp32)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows)
    assert "GPU benchmark" in proc.stdout
    assert "| teacher 10x train |" in out.with_suffix(".md").read_text()
