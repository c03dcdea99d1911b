"""A scale model of the cluster: what the ``cluster/`` node types do, from rates measured here.

Reads the rows of one ``python benchmarks/run_all.py --json perf.json`` run and prints a Markdown
table: slides/hour sharded per CPU node, samples/s trained per GPU, and the hours and node counts
for a cohort (default 10,000 slides at 40x) through sharding, the teacher, its cached targets,
distillation and prediction. Every number is marked **measured** (a row of that run, on this
machine) or **extrapolated** (a measured rate scaled by a stated assumption).

Assumptions (each a flag):

* one vCPU of a cluster node does what one core of the benchmark machine does (``--vcpu-factor``);
* a slide holds ``--tissue-mm2`` of tissue; a 10x tile of 224 px at 1 um/px covers 0.0502 mm2;
  its file is ``--slide-gb`` and a shard node fetches slides at ``--node-gbps`` (GB/s; a
  c6i.4xlarge has up to 12.5 Gbit/s): sharding a slide costs the longer of its CPU time and its
  download;
* a GPU sustains ``--gpu-tflops`` of bf16 on these convolutions (A10G of ``g5.2xlarge``: 125 peak
  dense; 25% of peak is typical of small ResNets), training costing 3x a forward pass; its node's
  other vCPUs feed it at the loader's measured CPU time per sample (the profile rows);
* the teacher trains ``--teacher-epochs`` over ``--labelled-slides``; distillation
  ``--student-epochs`` over every slide; targets are one teacher pass over every slide.

    python benchmarks/scale_model.py perf.json [--markdown scale.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TILE_MM2 = 0.224 * 0.224  # a 10x tile: 224 px at 1.0 um/px
SHARD_VCPUS = 16  # shard_cpu: c6i.4xlarge
GPU_VCPUS = 8  # train_gpu: g5.2xlarge, one A10G


@dataclass(frozen=True)
class Assumptions:
    slides: int = 10_000
    tissue_mm2: float = 150.0
    vcpu_factor: float = 1.0
    gpu_tflops: float = 31.0
    teacher_epochs: int = 20
    labelled_slides: int = 1_000
    student_epochs: int = 20
    slide_gb: float = 1.5
    node_gbps: float = 1.2
    hours: float = 2.0  # the wall time a stage should fit in, to size the node counts

    @property
    def tiles_per_slide(self) -> float:
        return self.tissue_mm2 / TILE_MM2


def find(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    for r in rows:
        if r["row"].startswith(prefix):
            return r
    raise SystemExit(f"no row starting {prefix!r}: run run_all.py with every section")


def gflops(px: int) -> float:
    """Forward GFLOPs of resnet18 (2 classes) on a ``px`` tile (2 FLOPs per MAC)."""
    from resdistill.measures.compute import count_flops
    from resdistill.models import build_model

    return count_flops(build_model("resnet18", 2), (3, px, px)) / 1e9


def model(rows: list[dict[str, Any]], a: Assumptions, cores: int) -> list[tuple[str, str, str]]:
    """``(quantity, value, basis)`` lines of the scale model; ``cores``: the benchmark
    machine's."""
    shard = find(rows, "shard: codec bound")  # run_shard on one core, samples/s
    predict = find(rows, "predict (1 process): student 2.5x native")
    engine = find(rows, "predict (Ray Data, --heatmap none): student 2.5x native")
    prof_s = find(rows, "profile, CPU per sample (1 thread): student")
    prof_t = find(rows, "profile, CPU per sample (1 thread): teacher")
    cached = find(rows, "train loop vs bare loop: distilled, cached")
    teach = find(rows, "train loop vs bare loop: teacher")
    tiles = a.tiles_per_slide
    out: list[tuple[str, str, str]] = []

    def add(what: str, value: float, unit: str, basis: str) -> float:
        out.append((what, f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}", basis))
        return value

    per_core = shard["ours_value"]
    add("sharding, samples/s per core", per_core, "samples/s", "measured (run_shard, 1 core)")
    cpu_node = per_core * SHARD_VCPUS * a.vcpu_factor * 3600 / tiles
    net_node = a.node_gbps * 3600 / a.slide_gb
    node = add("sharding, slides/hour per shard_cpu node", min(cpu_node, net_node), "slides/h",
               f"extrapolated: min(CPU {cpu_node:,.0f} on {SHARD_VCPUS} vCPUs at {tiles:,.0f} "
               f"tiles/slide, download {net_node:,.0f})")  # fmt: skip
    loader_t = 1e6 / prof_t["ours_value"] * (GPU_VCPUS - 1) * a.vcpu_factor
    loader_s = 1e6 / prof_s["ours_value"] * (GPU_VCPUS - 1) * a.vcpu_factor
    gpu_t = a.gpu_tflops * 1e12 / (3 * gflops(224) * 1e9)
    gpu_s = a.gpu_tflops * 1e12 / (3 * gflops(56) * 1e9)
    gpu_inf = a.gpu_tflops * 1e12 / (gflops(224) * 1e9)
    add("CPU training here: teacher 10x, samples/s", teach["ours_value"], "samples/s",
        "measured (Ray Train, all cores)")  # fmt: skip
    add("CPU training here: student 2.5x from cached targets, samples/s", cached["ours_value"],
        "samples/s", "measured (Ray Train, all cores)")  # fmt: skip
    t_rate = add("teacher 10x training per train_gpu node", min(gpu_t, loader_t), "samples/s",
                 f"extrapolated: min(GPU {gpu_t:,.0f}, loader {loader_t:,.0f} on "
                 f"{GPU_VCPUS - 1} vCPUs)")  # fmt: skip
    s_rate = add("student 2.5x training (cached targets) per train_gpu node",
                 min(gpu_s, loader_s), "samples/s",
                 f"extrapolated: min(GPU {gpu_s:,.0f}, loader {loader_s:,.0f})")  # fmt: skip
    i_rate = add("teacher 10x inference (targets) per train_gpu node", min(gpu_inf, loader_t),
                 "samples/s", f"extrapolated: min(GPU {gpu_inf:,.0f}, loader {loader_t:,.0f})")  # fmt: skip
    m = re.search(r"(\d+) slides, (\d+) tiles", engine["note"])
    if m is None:
        raise SystemExit(f"cannot read slides and tiles from {engine['note']!r}")
    bench_tiles = int(m.group(2)) / int(m.group(1))
    # one process using every core of the benchmark machine
    p_slides_h = predict["ours_value"] * bench_tiles / tiles / cores
    add("prediction, 2.5x student native, slides/hour per core", p_slides_h, "slides/h",
        f"extrapolated from measured {predict['ours_value']:,.0f} slides/h of "
        f"{bench_tiles:.0f}-tile slides, one process on {cores} cores")  # fmt: skip
    n_all = a.slides * tiles
    work = {
        "sharding": (a.slides / node, "shard_cpu"),
        "teacher": (a.teacher_epochs * a.labelled_slides * tiles / t_rate / 3600, "train_gpu"),
        "targets": (n_all / i_rate / 3600, "train_gpu"),
        "distillation": (a.student_epochs * n_all / s_rate / 3600, "train_gpu"),
        "prediction": (
            a.slides / min(p_slides_h * SHARD_VCPUS * a.vcpu_factor, net_node),
            "shard_cpu",
        ),
    }
    for stage, (node_hours, kind) in work.items():
        nodes = max(1, int(-(-node_hours // a.hours)))
        out.append((f"{a.slides:,} slides: {stage}", f"{node_hours:,.1f} {kind} node-hours",
                    f"{nodes} node(s) to finish in {a.hours:g} h"))  # fmt: skip
    return out


def markdown(lines: list[tuple[str, str, str]], a: Assumptions) -> str:
    head = (f"*Scale model: {a.slides:,} slides at 40x, {a.tissue_mm2:g} mm2 tissue each "
            f"({a.tiles_per_slide:,.0f} 10x tiles), {a.slide_gb:g} GB files fetched at "
            f"{a.node_gbps:g} GB/s per node, teacher {a.teacher_epochs} epochs on "
            f"{a.labelled_slides:,} labelled slides, student {a.student_epochs} epochs on all, GPU "
            f"{a.gpu_tflops:g} TFLOP/s sustained, 1 vCPU = {a.vcpu_factor:g} core here*")  # fmt: skip
    body = ["| quantity | value | basis |", "| --- | --- | --- |"]
    body += [f"| {q} | {v} | {b} |" for q, v, b in lines]
    return "\n".join([head, "", *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("json", help="rows of run_all.py --json")
    ap.add_argument("--markdown", help="also write the table here")
    for f, v in Assumptions.__dataclass_fields__.items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v.default), default=v.default)
    args = ap.parse_args(argv)
    a = Assumptions(**{f: getattr(args, f) for f in Assumptions.__dataclass_fields__})
    doc = json.loads(Path(args.json).read_text())
    text = markdown(model(doc["rows"], a, int(doc["cores"])), a)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
