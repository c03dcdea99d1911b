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
    python benchmarks/scale_model.py --predict predict.json    # prediction fleet (below)

``--predict`` reads one ``python benchmarks/bench_predict.py --json predict.json`` run (the
teacher and students through ``resdistill predict`` on N slides, each model's per-slide cost,
and the per-slide planning, heatmap and read costs) and prints, per model and for the cascade
(the student on every tile, the teacher on ``--escalated`` of them): CPU core-seconds per slide
(measured here: the run's metered CPU seconds per slide), then for a slide of ``--tissue-mm2`` (extrapolated: tile work scaled by the
tiles, planning by the area, the heatmaps as measured), slides/hour per ``shard_cpu`` node
(16 vCPUs) and per ``train_gpu`` node (the GPU at ``--gpu-tflops`` fed by 7 vCPUs reading at the
measured read cost), hours and cost per 1,000 slides at ``--cpu-node-usd`` / ``--gpu-node-usd``
an hour, and the nodes (``max_workers``) that predict ``--slides`` slides in ``--hours``.
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
    escalated: float = 0.064  # share of tiles the cascade sends to the teacher (README's demo)
    cpu_node_usd: float = 0.68  # c6i.4xlarge on demand, us-east-1 (assumed list price)
    gpu_node_usd: float = 1.212  # g5.2xlarge on demand, us-east-1 (assumed list price)

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


def predict_fleet(doc: dict[str, Any], a: Assumptions) -> list[tuple[str, str, str]]:
    """``(quantity, value, basis)`` lines of the prediction fleet (module docstring) from a
    ``bench_predict.py --json`` document."""
    runs, costs, cores = doc["runs"], doc["costs"], int(doc["cores"])
    mags = list(runs)
    here_tiles = float(costs["tiles_per_slide"])
    scale = a.tiles_per_slide / here_tiles
    fixed_ms = costs["plan_ms"] * scale + costs["heatmaps_ms"]  # per real slide, one core
    out: list[tuple[str, str, str]] = []

    def core_s(mag: str) -> float:  # measured: metered CPU seconds, else wall x cores
        r = runs[mag]
        return r["cpu_per_slide_s"] if "cpu_per_slide_s" in r else r["per_slide_s"] * cores

    def real_core_s(mag: str) -> float:  # tile work scaled to a real slide, plus its fixed part
        here_fixed = (costs["plan_ms"] + costs["heatmaps_ms"]) / 1e3
        return max(0.0, core_s(mag) - here_fixed) * scale + fixed_ms / 1e3

    def gpu_slides_h(mag: str) -> float:
        gpu = a.gpu_tflops * 1e12 / (costs["gflops"][mag] * 1e9) / a.tiles_per_slide
        feed_s = costs["read_ms_per_tile"][mag] / 1e3 * a.tiles_per_slide + fixed_ms / 1e3
        return 3600 * min(gpu, (GPU_VCPUS - 1) * a.vcpu_factor / feed_s)

    models = {m: (real_core_s(m), gpu_slides_h(m)) for m in mags}
    t, s_last = mags[0], mags[-1]
    esc = a.escalated * (real_core_s(t) - fixed_ms / 1e3)
    models[f"cascade {s_last}+{t}"] = (
        real_core_s(s_last) + esc,
        1 / (1 / models[s_last][1] + a.escalated / models[t][1]),
    )
    for m in mags:
        out.append((f"{m}: CPU core-seconds per slide here ({here_tiles:.0f} tiles)",
                    f"{core_s(m):.2f} s", f"measured ({doc['args']['slides']} slides, {cores} cores)"))  # fmt: skip
    for name, (cs, gpu_h) in models.items():
        cpu_h = SHARD_VCPUS * a.vcpu_factor * 3600 / cs
        best = "shard_cpu" if a.cpu_node_usd / cpu_h <= a.gpu_node_usd / gpu_h else "train_gpu"
        rate, usd = (cpu_h, a.cpu_node_usd) if best == "shard_cpu" else (gpu_h, a.gpu_node_usd)
        nodes = max(1, int(-(-a.slides / (rate * a.hours) // 1)))
        out.append((f"{name}: slides/hour per shard_cpu / train_gpu node",
                    f"{cpu_h:,.0f} / {gpu_h:,.0f}", "extrapolated (assumptions above)"))  # fmt: skip
        out.append((f"{name}: per 1,000 slides on {best}", f"{1000 / rate:,.2f} node-h, "
                    f"${1000 / rate * usd:,.2f}", "extrapolated"))  # fmt: skip
        out.append((f"{name}: {a.slides:,} slides in {a.hours:g} h", f"{best}.max_workers: {nodes}",
                    "extrapolated (cluster/aws.yaml node type)"))  # fmt: skip
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
    ap.add_argument("json", nargs="?", help="rows of run_all.py --json")
    ap.add_argument("--predict", help="a bench_predict.py --json run: the prediction fleet")
    ap.add_argument("--markdown", help="also write the table here")
    for f, v in Assumptions.__dataclass_fields__.items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v.default), default=v.default)
    args = ap.parse_args(argv)
    a = Assumptions(**{f: getattr(args, f) for f in Assumptions.__dataclass_fields__})
    if args.predict:
        text = markdown(predict_fleet(json.loads(Path(args.predict).read_text()), a), a)
    elif args.json:
        doc = json.loads(Path(args.json).read_text())
        text = markdown(model(doc["rows"], a, int(doc["cores"])), a)
    else:
        ap.error("give a run_all.py --json file, or --predict with a bench_predict.py one")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
