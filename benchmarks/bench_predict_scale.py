"""Prediction at cohort scale: the teacher and students through ``resdistill predict`` on many
slides, with each run's fixed cost (Ray Data's start, the actors' start and model load) and its
per-slide cost told apart, and what every slide costs alike (planning, heatmaps) measured apart.

    python benchmarks/bench_predict_scale.py --work W --slides 16 --small 2 --json predict.json

:func:`scale_rows` runs every model on the same N slides and on the first few of them; ``wall =
fixed + n * per_slide`` through both points. The slides are ``--distinct`` synthetic slides
rendered once and hard-linked under N names (:func:`linked_slides`); the models have random
weights (only speed is measured) and the read chain of :func:`chain_dataset`.
``python benchmarks/scale_model.py --predict predict.json`` turns the JSON into node-hours.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import engine_run, make_checkpoints  # noqa: E402

MAGS = ("10x", "5x", "2p5x", "1p25x")


def chain_dataset(folder: Path) -> str:
    """A dataset.json that records only a read chain (10x/5x/2.5x/1.25x at 224/112/56/28 px,
    JPEG 90, min_tissue 0.5, low magnifications cut from the top), the classes and the fallback
    normalisation: what :func:`make_checkpoints` needs, without sharding anything."""
    from resdistill.checkpoint import FALLBACK_MEAN, FALLBACK_STD
    from sharding.tissue_mask import DETECTOR

    px = {"10x": 224, "5x": 112, "2p5x": 56, "1p25x": 28}
    norm = {"mean": list(FALLBACK_MEAN), "std": list(FALLBACK_STD)}
    doc = {
        "format_version": 1, "magnifications": list(MAGS),
        "mpp": {"10x": 1.0, "5x": 2.0, "2p5x": 4.0, "1p25x": 8.0}, "tile_px": px,
        "image_format": "jpeg", "quality": 90, "low_mags_from": "top", "min_tissue": 0.5,
        "tissue": DETECTOR, "classes": ["benign", "tumor"],
        "normalization": dict.fromkeys(MAGS, norm),
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(doc, indent=1))
    return str(folder)


def linked_slides(
    folder: Path, n: int, distinct: int, size_um: tuple[float, float], base_mag: float
) -> list[Path]:
    """``n`` slides ``s000.svs``/``.tiff``...: ``distinct`` synthetic slides rendered once (seed 7,
    at ``base_mag``, alternately SVS and TIFF) and hard-linked under the other names, so a
    cohort costs ``distinct`` renders. Kept between runs in ``folder``."""
    from sharding.synthetic import write_synthetic_slides

    src = folder / f"rendered-{distinct}-{size_um[0]:g}x{size_um[1]:g}-{base_mag:g}x"
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        write_synthetic_slides(tmp, distinct, seed=7, size_um=size_um, base_mags=(base_mag,))
        tmp.rename(src)
    made = sorted(p for p in src.iterdir() if p.suffix in (".svs", ".tiff"))
    out = folder / f"cohort-{n}"
    out.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        source = made[i % len(made)]
        link = out / f"s{i:03d}{source.suffix}"
        if not link.exists():
            link.hardlink_to(source)
        paths.append(link)
    return paths


def per_slide_costs(ckpts: dict[str, str], slides: list[Path], read: str) -> dict[str, Any]:
    """CPU time in this process, one thread, after an untimed warm-up slide (a run pays its
    imports once, not per slide): per slide, what every model pays alike (planning: tissue
    detection, grid, the heatmap background; drawing the two heatmap PNGs), and per model the
    fast path's read per tile (:func:`resdistill.predict.tile_reads.read_regions`), its
    counted FLOPs per tile and the tiles per slide."""
    import torch

    from resdistill.checkpoint import load_model
    from resdistill.measures.compute import count_flops
    from resdistill.predict.heatmaps import heatmap_pngs
    from resdistill.predict.slide_plan import plan_slide
    from resdistill.predict.tile_reads import read_regions
    from resdistill.read_chain import chain_of
    from sharding.slide import open_slide

    torch.set_num_threads(1)
    out: dict[str, Any] = {"read_ms_per_tile": {}, "gflops": {}}
    plan_s = draw_s = 0.0

    def draw(plan: Any, model: Any) -> None:
        probs = np.random.default_rng(0).dirichlet([1.0] * len(model.classes), plan.n_tiles)
        heatmap_pngs(plan.background, (plan.info.width, plan.info.height), plan.xs, plan.ys,
                     plan.size0, probs, model.classes, slide_id=plan.sid, mag=model.mag,
                     which=[model.classes[0], "classes"], mpp=plan.info.base_mpp)  # fmt: skip

    for mag, ckpt in ckpts.items():
        model = load_model(ckpt)
        chain = chain_of(model, read=read)
        out["gflops"][mag] = count_flops(model.model, (3, chain.tile_px, chain.tile_px)) / 1e9
        if not plan_s:  # warm-up, not timed: first imports (matplotlib, scipy), fonts, caches
            draw(plan_slide(slides[0].stem, str(slides[0]), chain, 1600), model)
        read_s, tiles = 0.0, 0
        for path in slides:
            t0 = time.process_time()
            plan = plan_slide(path.stem, str(path), chain, 1600)
            t1 = time.process_time()
            draw(plan, model)
            t2 = time.process_time()
            slide = open_slide(str(path))
            read_regions(slide, plan.grid(np.arange(plan.n_tiles)), chain, np.arange(plan.n_tiles))
            slide.close()
            read_s, tiles = read_s + time.process_time() - t2, tiles + plan.n_tiles
            plan_s, draw_s = plan_s + t1 - t0, draw_s + t2 - t1
        out["read_ms_per_tile"][mag] = 1e3 * read_s / tiles
        out["tiles_per_slide"] = tiles / len(slides)
    n = len(slides) * len(ckpts)
    return {**out, "plan_ms": 1e3 * plan_s / n, "heatmaps_ms": 1e3 * draw_s / n}


class CpuMeter:
    """CPU seconds (user + system) spent by this process and all its descendants (Ray's workers
    and actors, which come and go) while inside: each process's CPU time is sampled every
    ``every`` seconds and the last sample of each counts. Unlike wall time it does not grow when
    other work shares the machine's cores, so on a shared machine it is the steadier measure of
    what a run costs (a dedicated node runs ``cpu_s / cores`` seconds at full occupancy). The
    meter's own sampling (its thread walks the process tree, a cost that grows with the wall
    time and the machine's process count) is left out: :attr:`own_s`."""

    def __init__(self, every: float = 0.25) -> None:
        import threading

        self.every, self._stop, self._seen, self._kind = every, threading.Event(), {}, {}
        self._titles: dict[tuple[int, float], set[str]] = {}  # a worker's title changes
        self.own_s = 0.0  # CPU seconds of the sampling thread, not counted in cpu_s
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                key = (p.pid, p.create_time())
                line = " ".join(p.cmdline())
                self._titles.setdefault(key, set()).add(line.split(" ", 1)[0])
                if key not in self._kind:
                    daemon = any(d in line for d in RAY_DAEMONS) and not (
                        line.startswith("ray::") or "default_worker.py" in line
                    )  # a worker's command line names the dashboard's port too
                    self._kind[key] = "ray" if daemon else "work"
                t = p.cpu_times()
                self._seen.setdefault(key, [t.user + t.system] * 2)[1] = t.user + t.system
            except psutil.Error:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()
        self.own_s = time.thread_time()  # this thread's CPU since it started

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(last - first for first, last in self._seen.values()) - self.own_s

    @property
    def work_cpu_s(self) -> float:
        """:attr:`cpu_s` less Ray's own daemons (:data:`RAY_DAEMONS`), whose CPU grows with the
        wall time a run lasts (their polling), so with the machine's load."""
        return self.cpu_s - self.by_process["ray"]

    @property
    def by_process(self) -> dict[str, float]:
        """:attr:`cpu_s` by kind of process: ``driver`` (this process, less the meter),
        ``actors`` (Ray Data's actors: predict's inference), ``tasks`` (Ray's other workers:
        planning, read tasks), ``ray`` (Ray's daemons), from the titles Ray gives its workers."""
        import os

        out = dict.fromkeys(("driver", "actors", "tasks", "ray"), 0.0)
        for key, (first, last) in self._seen.items():
            titles = " ".join(self._titles.get(key, ()))
            kind = (
                "driver" if key[0] == os.getpid() else "ray" if self._kind.get(key) == "ray"
                else "actors" if "MapWorker" in titles else "tasks"
            )  # fmt: skip
            out[kind] += last - first
        out["driver"] -= self.own_s
        return out


#: Command-line marks of Ray's own daemons (raylet, GCS, dashboard, monitors, agents).
RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")


def scale_rows(
    ckpts: dict[str, str], slides: list[Path], work: Path, *, small: int, read: str,
    pictures: bool, row: Any, log: Any = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Each model (``ckpts``, teacher first) through ``resdistill predict`` on all ``slides``
    and on the first ``small`` of them, interleaved model by model. ``wall = fixed + n *
    per_slide`` through both points gives each model's fixed cost and per-slide cost. Rows: each
    student's end-to-end slides/hour over the teacher's (all slides) and its per-slide ratio."""
    extra = ("--read", read, *(() if pictures else ("--heatmap", "none")))
    n, runs = len(slides), 0
    res: dict[str, dict[str, Any]] = {}
    parts: dict[tuple[str, int], dict[str, float]] = {}

    def run(mag: str, count: int) -> float:
        nonlocal runs
        runs += 1
        out = work / f"scale-{runs}"
        with CpuMeter() as cpu:
            got = engine_run(ckpts[mag], slides[:count], out, *extra)
        shutil.rmtree(out, ignore_errors=True)
        log(f"  {mag}: {count} slides, {got['tiles']} tiles in {got['wall_s']:.1f}s, "
            f"{cpu.cpu_s:.1f} CPU s ({cpu.work_cpu_s:.1f} s outside Ray's daemons)")  # fmt: skip
        parts[(mag, count)] = cpu.by_process
        return got["wall_s"], cpu.cpu_s, cpu.work_cpu_s

    run(list(ckpts)[-1], 1)  # warm-up: Ray Data's first dataset, the workers' imports
    for mag in ckpts:
        (few, few_cpu, few_work), (full, full_cpu, full_work) = run(mag, small), run(mag, n)
        per, per_cpu = (full - few) / (n - small), (full_cpu - few_cpu) / (n - small)
        per_work = (full_work - few_work) / (n - small)
        res[mag] = {"wall_s": full, "few_s": few, "per_slide_s": per, "fixed_s": few - small * per,
                    "slides_per_hour": 3600.0 * n / full, "cpu_s": full_cpu,
                    "cpu_per_slide_s": per_cpu, "cpu_fixed_s": few_cpu - small * per_cpu,
                    "work_cpu_s": full_work, "work_cpu_per_slide_s": per_work,
                    "work_cpu_fixed_s": few_work - small * per_work,
                    "cpu_per_slide_by_process_s": {
                        k: (v - parts[(mag, small)][k]) / (n - small)
                        for k, v in parts[(mag, n)].items()
                    }}  # fmt: skip
    teacher = res[next(iter(ckpts))]
    rows = []
    what = "heatmaps on" if pictures else "--heatmap none"
    for mag in list(ckpts)[1:]:
        r = res[mag]
        note = (
            f"{n} slides ({small} for the fit); fixed {r['fixed_s']:.1f}s (teacher "
            f"{teacher['fixed_s']:.1f}s), per slide {r['per_slide_s']:.2f}s (teacher "
            f"{teacher['per_slide_s']:.2f}s); steady-state ratio "
            f"{teacher['per_slide_s'] / r['per_slide_s']:.1f}x; CPU seconds: {r['cpu_s']:.0f} vs "
            f"{teacher['cpu_s']:.0f} ({teacher['cpu_s'] / r['cpu_s']:.1f}x), per slide "
            f"{r['cpu_per_slide_s']:.2f} vs {teacher['cpu_per_slide_s']:.2f} "
            f"({teacher['cpu_per_slide_s'] / r['cpu_per_slide_s']:.1f}x); outside Ray's daemons "
            f"{r['work_cpu_s']:.0f} vs {teacher['work_cpu_s']:.0f} "
            f"({teacher['work_cpu_s'] / r['work_cpu_s']:.1f}x), per slide "
            f"{r['work_cpu_per_slide_s']:.2f} vs {teacher['work_cpu_per_slide_s']:.2f} "
            f"({teacher['work_cpu_per_slide_s'] / r['work_cpu_per_slide_s']:.1f}x)"
        )
        rows.append(row(
            f"predict (Ray Data, {read}, {what}, {n} slides): student {display(mag)} vs teacher "
            f"{display(next(iter(ckpts)))}", "teacher", teacher["slides_per_hour"],
            f"student {display(mag)}", r["slides_per_hour"], "slides/h",
            r["slides_per_hour"] / teacher["slides_per_hour"], TARGETS.get(mag, ""), note,
        ))  # fmt: skip
    return rows, res


#: >= 0.7 x the FLOPs ratio (resnet18: 14.1x at 2.5x, 53x at 1.25x).
TARGETS = {"2p5x": ">= 9.9x (0.7 x 14.1)", "1p25x": ">= 37x (0.7 x 53)"}


def display(mag: str) -> str:
    from sharding.magnification import display_mag

    return display_mag(mag)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/bench_predict_scale.py --work W``: :func:`scale_rows`
    for the 10x teacher and the 2.5x and 1.25x students on synthetic 40x slides, plus each
    slide's planning and heatmap CPU time; prints the rows (and ``--json`` writes them)."""
    import argparse
    import os

    from bench_rows import cpu_model, row

    from sharding.ray_cluster import ray_init

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--work", required=True, help="folder kept between runs (slides, models)")
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--small", type=int, default=2, help="slides of the short run of each model")
    ap.add_argument("--distinct", type=int, default=2, help="slides rendered (then linked)")
    ap.add_argument("--size-um", default="8000,6000", help="slide width,height in microns")
    ap.add_argument("--base-mag", type=float, default=40.0)
    ap.add_argument("--mags", default="10x,2p5x,1p25x", help="teacher first")
    ap.add_argument("--read", default="native")
    ap.add_argument("--no-heatmaps", action="store_true")
    ap.add_argument("--json", help="write the rows and runs here")
    ap.add_argument("--costs-only", action="store_true",
                    help="only the one-process CPU costs per slide (no Ray runs)")  # fmt: skip
    args = ap.parse_args(argv)
    work = Path(args.work)
    w, h = (float(v) for v in args.size_um.split(","))
    slides = linked_slides(work, args.slides, args.distinct, (w, h), args.base_mag)
    ckpts = make_checkpoints(chain_dataset(work / "dataset"), work, args.mags.split(","))
    costs = per_slide_costs(ckpts, slides[: args.distinct], args.read)
    if args.costs_only:
        print(json.dumps(costs, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps({"costs": costs, "args": vars(args)}, indent=1))
        return 0
    t0 = time.perf_counter()
    ray_init(None, dashboard=False)
    ray_start = time.perf_counter() - t0
    rows, res = scale_rows(ckpts, slides, work, small=args.small, read=args.read,
                           pictures=not args.no_heatmaps, row=row)  # fmt: skip
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{os.cpu_count()} cores ({cpu_model()}), load average {load}; Ray start "
          f"{ray_start:.1f}s; per slide "
          f"(CPU, one process): planning {costs['plan_ms']:.0f} ms, heatmaps "
          f"{costs['heatmaps_ms']:.0f} ms")  # fmt: skip
    for r in rows:
        print(f"{r['row']}: {r['ratio']:.2f}x ({r['target']}); {r['note']}")
    for mag, r in res.items():
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_per_slide_by_process_s"].items())
        print(f"{display(mag)}: CPU s per slide by process: {split}")
    if args.json:
        doc = {"rows": rows, "runs": res, "costs": costs, "ray_start_s": ray_start,
               "loadavg": os.getloadavg(), "cores": os.cpu_count(), "cpu": cpu_model(),
               "args": vars(args)}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
