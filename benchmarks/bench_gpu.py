"""Teacher and student images/s on one GPU, the loader feeding it, and the GPU's utilisation.

    python benchmarks/bench_gpu.py --out gpu-out/gpu.json                  # ~7 min, one H200
    python benchmarks/bench_gpu.py --smoke --device cpu --out /tmp/g.json   # tiny, < 1 min

Each measurement checks the ``--budget`` left, prints one line and rewrites the JSON, in order:

1. ``models``: the teacher at the top magnification, the student at each lower one (tiles from
   :class:`sharding.options.ShardOptions`: 224 px at 10x; 112, 56, 28 at 5x, 2.5x, 1.25x; batch
   ``--base-batch`` x area ratio up to ``--max-batch``): inference (``measure_throughput``) and
   training (forward, cross-entropy, backward, Adam: the worker's step) images/s in ``fp32`` and
   ``bf16_cl`` (bf16 autocast + channels_last through :class:`WorkerEnv`), with ``nvidia-smi``'s
   utilisation every 0.2 s and torch's peak memory.
2. ``loader``: :func:`resdistill.data.make_loader` (training mode) on real shards
   (``bench_loader.make_dataset`` in its own process during step 1, or ``--data``): the student's
   tile and the teacher + student pair at 1, 2, 4 ... workers up to the CPU count, batches
   prepared on the CPU (``bench_loader.loader_rate``); then with every worker, batches prepared
   on the device (pinned), alone and feeding a teacher step and an online distillation step.
3. ``bf16_cl_compile`` (inductor) per model while the budget lasts (CUDA only unless
   ``--compile``); ``first_s`` holds the compile; a failure (as any) is the record's ``note``.

JSON: ``{"env", "config", "models", "loader", "rows", "notes", "done"}``; ``rows`` are the
records as ``bench_rows`` rows against their baselines (:func:`rows_of`), printed as a table at
the end (``run_all.print_table``) and written beside the JSON as Markdown. The steps themselves
live in ``gpu_steps.py``. fp32 convolutions use TF32 where cuDNN allows (torch's default, in ``env``);
cuDNN benchmark mode is on, as in the training worker.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_loader import loader_rate, make_dataset  # noqa: E402
from bench_rows import row, timed  # noqa: E402
from gpu_steps import (  # noqa: E402
    GpuMonitor,
    Logits,
    distill_step,
    fed_rate,
    prepare,
    step_rate,
    supervised_step,
    worker_env,
)
from run_all import markdown_table, print_table  # noqa: E402

from resdistill.data import Batch, DatasetInfo  # noqa: E402
from resdistill.measures.compute import measure_throughput, sync_device  # noqa: E402
from resdistill.models import build_model  # noqa: E402
from resdistill.train.worker_env import WorkerEnv  # noqa: E402

#: Sizes and steps: defaults, and ``--smoke``'s (each unless given on the command line).
DEFAULTS = {"tile_px": 0, "base_batch": 256, "max_batch": 4096, "seconds": 2.5, "warmup": 3,
            "min_steps": 3, "max_steps": 200, "max_workers": 0, "loader_batch": 256,
            "loader_samples": 1024, "slides": 6, "budget": 380.0}  # fmt: skip
SMOKE = {**DEFAULTS, "tile_px": 32, "base_batch": 4, "max_batch": 8, "seconds": 0.05,
         "warmup": 1, "min_steps": 2, "max_steps": 2, "max_workers": 2, "loader_batch": 8,
         "loader_samples": 16, "slides": 1, "budget": 120.0}  # fmt: skip
HELP = {"tile_px": "the teacher's tile edge (0: the project's)", "base_batch": "the batch at "
        "the teacher's tile, times the area ratio below it", "max_batch": "the largest batch",
        "seconds": "timed seconds per measurement", "warmup": "untimed steps after the first",
        "min_steps": "timed steps at least", "max_steps": "timed steps at most",
        "max_workers": "most loader workers (0: the CPU count)", "loader_batch": "loader batch",
        "loader_samples": "samples timed per loader worker", "slides": "synthetic slides of "
        "the loader's dataset", "budget": "seconds after which no measurement starts"}  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One network at one tile size; ``mag`` is the dataset's name (``2p5x``), ``power`` 2.5."""

    role: str
    arch: str
    mag: str
    power: float
    px: int
    batch: int


def specs(args: argparse.Namespace) -> list[Spec]:
    """The teacher at the top magnification, then the student at each lower one."""
    from sharding.options import ShardOptions

    opts = ShardOptions.make(**({"tile_px": args.tile_px} if args.tile_px else {}))
    out = []
    for m in opts.mags:
        px = opts.sizes[m.name]
        batch = args.batch or min(args.max_batch, args.base_batch * (opts.tile_px // px) ** 2)
        top = m == opts.mags[0]
        arch = args.teacher_arch if top else args.student_arch
        out.append(Spec("teacher" if top else "student", arch, m.name, m.power, px, batch))
    return out


def train(spec: Spec, env: WorkerEnv, args: argparse.Namespace) -> dict[str, Any]:
    """Training images/s of :func:`supervised_step` on one batch already on the device
    (``--warmup`` steps untimed, then ``--min-steps`` to ``--max-steps`` over ``--seconds``)."""
    x = torch.rand(spec.batch, 3, spec.px, spec.px, device=env.device)
    y = torch.randint(0, 2, (spec.batch,), device=env.device)
    batches = itertools.repeat(Batch((x,), y, [""] * spec.batch), 1 + args.warmup + args.max_steps)
    return step_rate(supervised_step(spec.arch, env), batches, env.device, warm=args.warmup,
                     seconds=args.seconds, min_steps=args.min_steps)  # fmt: skip


def infer(spec: Spec, env: WorkerEnv, args: argparse.Namespace) -> dict[str, Any]:
    """Inference images/s: :func:`measure_throughput` (eval, ``inference_mode``, median of 3
    rounds) of the worker's forward, after one timed first call (``first_s``)."""
    net = Logits(prepare(build_model(spec.arch, 2), env), env).eval()
    shape = (3, spec.px, spec.px)
    x = torch.rand(spec.batch, *shape, device=env.device)
    with torch.inference_mode():
        _, first_s = timed(lambda: (net(x), sync_device(env.device)))
    with GpuMonitor(env.device) as mon:
        rate = measure_throughput(net, shape, spec.batch, args.seconds, env.device, repeats=3,
                                  warmup=args.warmup)  # fmt: skip
    return {"images_per_s": rate, "first_s": first_s, **mon.summary()}


class Bench:
    """The run's JSON document (rewritten on every change) and its time budget."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.out, self.t0 = args, device, Path(args.out), time.monotonic()
        cudnn = torch.backends.cudnn
        env: dict[str, Any] = {
            "device": device.type, "card": None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn.version() if cudnn.is_available() else None,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "tf32_conv": cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }  # fmt: skip
        if device.type == "cuda":
            p = torch.cuda.get_device_properties(device)
            env.update(card=torch.cuda.get_device_name(device), memory_gib=p.total_memory / 2**30,
                       capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)  # fmt: skip
        self.doc: dict[str, Any] = {"env": env, "config": vars(args), "models": [],
                                    "loader": [], "rows": [], "notes": [], "done": False}  # fmt: skip
        self.save()
        print(json.dumps(env), flush=True)

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.args.budget - (time.monotonic() - self.t0)

    def fits(self, need: float, what: str) -> bool:
        """True when ``need`` seconds of the budget are left; else a note that ``what`` was
        skipped."""
        left = self.left()
        if left < need:
            self.note(f"skipped {what}: {left:.0f} s of the budget left, {need:.0f} s needed")
        return left >= need

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)
        print(f"note: {text}", flush=True)
        self.save()

    def measure(self, section: str, rec: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        """``rec`` updated with ``fn()`` (or with the failure as its ``note``: an out-of-memory
        or a compile error is a result, not the end of the run), added to ``section``."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            rec.update(fn())
        except Exception as exc:
            rec["note"] = (
                f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            )
        if self.device.type == "cuda":
            rec["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rec["at_s"] = round(time.monotonic() - self.t0, 1)
        self.doc[section].append(rec)
        self.save()
        r = self.doc["rows"][len(self.doc["models"]) - 1 if section == "models" else -1]
        print(f"[{rec['at_s']:6.1f}s] {r['row']}: {r['ours']} {r['ours_value']:,.1f} {r['unit']}"
              f", {r['baseline']} {r['baseline_value']:,.1f}, x{r['ratio']:.2f}; {r['note']}",
              flush=True)  # fmt: skip

    def save(self) -> None:
        self.doc["rows"] = rows_of(self.doc)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.out)


def find(doc: dict[str, Any], section: str, **match: Any) -> float:
    """The rate of the first ``section`` record matching ``match`` (NaN when none has one)."""
    for r in doc[section]:
        if all(r.get(k) == v for k, v in match.items()):
            return r.get("images_per_s") or r.get("samples_per_s") or math.nan
    return math.nan


def rows_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record as a ``bench_rows.row`` against its baseline: a model's fp32 rate; a CPU
    loader's at 1 worker; the device loader's CPU-prepared rate; for the teacher step fed by
    the loader, the teacher step on a resident batch; for the fed distillation, the loader."""
    out = []
    for r in doc["models"]:
        base = find(doc, "models", role=r["role"], power=r["power"], mode=r["mode"], variant="fp32")
        ours = r.get("images_per_s") or math.nan
        out.append(row(f"{r['role']} {r['power']:g}x {r['mode']}", "fp32", base, r["variant"],
                       ours, "images/s", ours / base, note=note(r, f"{r['px']} px")))  # fmt: skip
    for r in doc["loader"]:
        w, what, ours = r["workers"], r["what"], r.get("samples_per_s") or math.nan
        if r["prep"] == "host":
            label, base = "1 worker", find(doc, "loader", what=what, workers=1, prep="host")
        elif what == "pair":
            label, base = "prep on host", find(doc, "loader", what=what, workers=w, prep="host")
        elif what == "teacher train":
            label = "resident batch"
            base = find(doc, "models", role="teacher", mode="train", variant="bf16_cl")
        else:
            label, base = (
                "loader alone",
                find(doc, "loader", what="pair", workers=w, prep=r["prep"]),
            )
        per = f"{r['per_worker']:,.0f}/worker" if r.get("per_worker") else ""
        out.append(row(f"loader {what} ({'+'.join(r['mags'])}) prep {r['prep']}", label, base,
                       f"{w} worker{'s' * (w > 1)}", ours, "samples/s", ours / base, note=note(r, per)))  # fmt: skip
    return out


def note(r: dict[str, Any], head: str) -> str:
    """A row's note: ``head``, batch, mean GPU utilisation, peak memory, first step, failure."""
    parts = [head, f"batch {r['batch']}"]
    if r.get("gpu_util_mean") is not None:
        parts.append(f"util {r['gpu_util_mean']:.0f}%")
    if r.get("max_mem_gib") is not None:
        parts.append(f"peak {r['max_mem_gib']:.1f} GiB")
    if r.get("first_s") is not None:
        parts.append(f"first {r['first_s']:.1f} s")
    return ", ".join(p for p in [*parts, r.get("note", "")] if p)


def measure_loader(bench: Bench, url: str, teacher: Spec, student: Spec) -> None:
    """The ``loader`` records (step 2 of the module docstring)."""
    a, dev, cpus = bench.args, bench.device, os.cpu_count() or 1
    info = DatasetInfo.load(url)
    hi = teacher.mag if teacher.mag in info.magnifications else info.highest
    lo = student.mag if student.mag in info.magnifications else info.magnifications[-1]
    cap = min(a.max_workers or cpus, cpus)

    def add(what: str, mags: list[str], w: int, prep: str, fn: Callable[[], dict]) -> None:
        def run() -> dict[str, Any]:
            out = fn()
            return {**out, "per_worker": out["samples_per_s"] / w}

        rec = {"what": what, "mags": mags, "workers": w, "prep": prep, "batch": a.loader_batch}
        bench.measure("loader", rec, run)

    for w in [2**i for i in range(cap.bit_length()) if 2**i < cap] + [cap]:  # 1, 2, 4 ... cap
        kw = {"workers": w, "batch": a.loader_batch, "samples": a.loader_samples * w}
        for what, mags in {"student": [lo], "pair": [hi, lo]}.items():
            if bench.fits(a.seconds * 2 + 5, f"loader {what} {w} workers"):
                add(
                    what,
                    mags,
                    w,
                    "host",
                    lambda m=mags, k=kw: {"samples_per_s": loader_rate(url, m, **k)},
                )
    env = worker_env("bf16_cl", dev)
    fed = {
        "pair": ([hi, lo], lambda: None),
        "teacher train": ([hi], lambda: supervised_step(teacher.arch, env)),
        "distill train": ([lo, hi], lambda: distill_step(teacher.arch, student.arch, env)),
    }
    kw = {"workers": cap, "batch": a.loader_batch, "samples": a.loader_samples * cap, "device": dev}
    for what, (mags, make) in fed.items():
        if bench.fits(a.seconds * 3 + 10, f"loader {what} on {dev.type}"):
            add(
                what,
                mags,
                cap,
                f"device:{dev.type}",
                lambda m=mags, f=make: fed_rate(url, m, step=f(), **kw),
            )


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", default="gpu-out/gpu.json", help="the JSON, rewritten as it grows")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a couple of steps each")
    ap.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--compile", action="store_true", help="compile off CUDA too")
    ap.add_argument("--data", help="a dataset folder for the loader (default: made here)")
    ap.add_argument("--teacher-arch", default="resnet18")
    ap.add_argument("--student-arch", default="resnet18")
    ap.add_argument("--loader-student", type=float, default=2.5, help="its magnification")
    ap.add_argument("--batch", type=int, help="one batch size for every tile size")
    ap.add_argument("--compile-need", type=float, default=90.0, help="budget seconds a "
                    "compiled measurement needs to start")  # fmt: skip
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None,
                        help=f"{HELP[k]}; default {v}, {SMOKE[k]} with --smoke")  # fmt: skip
    args = ap.parse_args(argv)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = specs(args)
    student = next((s for s in models if s.power == args.loader_student), models[-1])
    work, maker = Path(tempfile.mkdtemp(prefix="rdgpu-")), None
    if not args.data:  # the shards are made during the model measurements, in another process
        mags = f"{models[0].power:g},{student.power:g}"
        maker = multiprocessing.get_context("spawn").Process(
            target=make_dataset, args=(work, args.slides, mags))  # fmt: skip
        maker.start()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training worker: fixed tile sizes
    # a timeout's SIGTERM unwinds like an exception: helpers stopped, the table still printed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    bench = Bench(args, device)
    try:
        for spec in models:
            for variant in ("fp32", "bf16_cl"):
                for mode in ("infer", "train"):
                    if bench.fits(args.seconds * 2 + 5, f"{spec.role} {spec.mag} {variant}"):
                        run_model(bench, spec, variant, mode)
        url = args.data
        if maker is not None:  # waited for while a compiled measurement still fits after it
            _, waited = timed(lambda: maker.join(timeout=max(1.0, bench.left() - 120)))
            bench.note(f"dataset: {args.slides} slides, waited {waited:.1f} s for its process")
            url = str(work / "dataset") if maker.exitcode == 0 else None
        if url:
            measure_loader(bench, url, models[0], student)
        else:
            bench.note(f"no dataset (exit code {maker and maker.exitcode}): no loader rows")
        if args.compile or device.type == "cuda":
            for mode in ("train", "infer"):
                for spec in models:
                    if bench.fits(args.compile_need, f"{spec.role} {spec.mag} compile {mode}"):
                        run_model(bench, spec, "bf16_cl_compile", mode)
        else:
            bench.note("compile skipped off CUDA (--compile runs it)")
        bench.doc["done"] = True
        bench.save()
    finally:
        if maker is not None and maker.is_alive():
            maker.terminate()
            maker.join()
        shutil.rmtree(work, ignore_errors=True)
        env = bench.doc["env"]
        header = f"GPU benchmark: {env['card'] or env['device']}, {env['cpus']} CPUs"
        header += f", torch {env['torch']}" + ("" if bench.doc["done"] else " (cut short)")
        print_table(bench.doc["rows"], header)
        Path(args.out).with_suffix(".md").write_text(markdown_table(bench.doc["rows"], header))
        for n in bench.doc["notes"]:
            print(f"note: {n}")
    return 0


def run_model(bench: Bench, spec: Spec, variant: str, mode: str) -> None:
    """One ``models`` record: ``spec`` in ``variant``, ``infer`` or ``train``."""
    rec = {**asdict(spec), "variant": variant, "mode": mode}
    fn = infer if mode == "infer" else train
    bench.measure("models", rec, lambda: fn(spec, worker_env(variant, bench.device), bench.args))


if __name__ == "__main__":
    sys.exit(main())
