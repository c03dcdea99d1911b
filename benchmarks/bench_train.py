"""Each training stage's loop against a bare loop over in-memory tensors, and where a run's time goes.

Per stage (teacher at the highest magnification, student supervised, student distilled from the
online teacher, student distilled from cached targets), two measurements in the same run:

* **loop**: the stage run as users run it (``resdistill teacher`` / ``distill`` on Ray Train, one
  worker with ``cpus`` CPUs, one loader process, ``steps`` batches in one epoch). Its steady rate
  excludes the first step (loader start-up: the wait for the first batch, recorded by the worker
  as ``train_first_step_s``); start-up and shutdown are reported apart (below).
* **bare**: the same networks and loss, the same batch, the same torch threads, in this process,
  over tensors already in memory: what the model alone costs.

Ratio ``loop / bare`` (target >= 0.8): the share of a training step that is the model. From the
same runs: a distillation epoch from cached targets against one with the online teacher (target
>= 5x faster), and a cached student epoch against the supervised student's (target <= 1.15x:
distillation from targets costs what the student costs).

Start-up and shutdown of a run, from the worker's trace (``--trace-dir``): ``ray.init`` (once per
driver process; the demo shares one session over its runs), Ray Train's start of the worker
group (call to training function), the worker's set-up (dataset, networks, DDP, restore), the
first step (loader processes and the first batch), and the end (last report to return).

    python benchmarks/bench_train.py --data DATASET --teacher CKPT --targets TARGETS
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import row, timed  # noqa: E402

if TYPE_CHECKING:
    from resdistill.config import TrainConfig


class StageKind(NamedTuple):
    """What a row calls a stage, whether it distils, and whether from cached targets."""

    label: str
    distils: bool
    cached: bool


STAGES = {
    "teacher": StageKind("teacher", distils=False, cached=False),
    "student": StageKind("student supervised", distils=False, cached=False),
    "online": StageKind("distilled, online teacher", distils=True, cached=False),
    "cached": StageKind("distilled, cached targets", distils=True, cached=True),
}


def bare_rate(
    stage: str, data: str, teacher: str, mag: str, *, batch: int, steps: int, threads: int
) -> float:
    """Samples/s of ``steps`` optimiser steps of ``stage`` on random in-memory tensors (after two
    warm-up steps): forward, loss, backward, Adam; the frozen teacher's forward for ``online``."""
    import torch

    from resdistill.config import LossConfig
    from resdistill.data import DatasetInfo
    from resdistill.models import build_model
    from resdistill.train.teacher_net import DistillStep, build_loss, load_teacher

    info = DatasetInfo.load(data)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    px = info.tile_px[info.resolve_mag(mag)]
    x = torch.randn(batch, 3, px, px)
    y = torch.randint(0, info.num_classes, (batch,))
    net = build_model("resnet18", info.num_classes)
    kind = STAGES[stage]
    if not kind.distils:
        ce = torch.nn.CrossEntropyLoss()
        opt = torch.optim.Adam(net.parameters(), 1e-3)

        def loss_of() -> Any:
            return ce(net(x)[0], y)
    else:
        t_px = info.tile_px[info.highest]
        x_t = torch.randn(batch, 3, t_px, t_px)
        frozen = load_teacher(teacher)
        with torch.no_grad():
            t_logits, t_feat = frozen(x_t[:1])
        loss = build_loss(LossConfig(), net.feature_channels, t_feat.shape[1])
        dstep = DistillStep(net, loss)
        opt = torch.optim.Adam(dstep.parameters(), 1e-3)
        s_hw = net(x[:1])[1].shape[-2:]
        cached_feat = torch.randn(batch, t_feat.shape[1], *s_hw)
        cached_logits = torch.randn(batch, t_logits.shape[1])

        def loss_of() -> Any:
            if kind.cached:
                return dstep(x, cached_logits, cached_feat)[0]
            tl, tf = frozen(x_t)
            return dstep(x, tl, tf)[0]

    def step() -> None:
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def stage_config(
    stage: str, data: str, teacher: str, targets: str, mag: str, work: Path, *, name: str,
    batch: int, steps: int, cpus: int,
) -> TrainConfig:  # fmt: skip
    """The :class:`~resdistill.config.TrainConfig` of ``stage`` for one epoch of ``steps``
    batches, one Ray Train worker with ``cpus`` CPUs, one loader process, a trace under
    ``work/trace/name``: the config ``resdistill teacher`` / ``distill`` builds from the same
    options (``tests/test_bench_configs.py`` checks they are equal)."""
    from resdistill.config import (
        STAGE_DISTILL,
        STAGE_SUPERVISED,
        STAGE_TEACHER,
        DataConfig,
        ModelConfig,
        OptimConfig,
        RunOptions,
        TeacherRef,
        TrainConfig,
    )

    kind = STAGES[stage]
    return TrainConfig(
        STAGE_TEACHER if stage == "teacher" else STAGE_DISTILL if kind.distils else STAGE_SUPERVISED,
        DataConfig(url=data, batch_size=batch, loader_workers=1, steps_per_epoch=steps,
                   targets=targets if kind.cached else None),
        ModelConfig(mag=mag),
        OptimConfig(epochs=1),
        run=RunOptions(name=name, storage=str(work / "runs"), workers=1,
                       cpus_per_worker=float(cpus), trace_dir=str(work / "trace" / name)),
        teacher=TeacherRef(checkpoint=teacher, evaluate=False) if kind.distils else None,
    )  # fmt: skip


def loop_run(
    stage: str, data: str, teacher: str, targets: str, mag: str, work: Path, *, batch: int,
    steps: int, cpus: int,
) -> dict[str, float]:  # fmt: skip
    """Run ``stage`` as its command runs it (:func:`resdistill.train.driver.train` of the
    config :func:`stage_config` builds) for one epoch of ``steps`` batches; its rates and
    timings."""
    from resdistill import checkpoint as T
    from resdistill.train.driver import train

    name = f"{stage}-{int(time.time() * 1000)}"
    trace = work / "trace" / name
    cfg = stage_config(stage, data, teacher, targets, mag, work, name=name, batch=batch,
                       steps=steps, cpus=cpus)  # fmt: skip
    called = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    returned = time.time()
    hist = T.load_checkpoint(summary.latest_checkpoint, T.TRAINER_FILE)["state"]["history"][-1]
    start = json.loads((trace / "starts.jsonl").read_text().splitlines()[0])
    ended = json.loads((trace / "rank0.json").read_text())
    samples = batch * steps
    train_s = samples / hist["train_samples_per_s"]
    first = hist["train_first_step_s"]
    return {
        "samples": samples,
        "train_s": train_s,
        "steady_rate": (samples - batch) / (train_s - first),
        "epoch_rate": hist["train_samples_per_s"],
        "ray_train_start_s": start["entered"] - called,
        "worker_setup_s": start["time"] - start["entered"],
        "first_step_s": first,
        "validate_report_s": hist["epoch_s"] - train_s,
        "shutdown_s": returned - ended["time"],
        "wall_s": returned - called,
    }


def train_rows(
    data: str, teacher: str, targets: str, work: Path, *, row: Callable[..., dict[str, Any]],
    student_mag: str, batch: int, steps: int, teacher_steps: int, cpus: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of the module docstring, plus a start-up row; ``ray.init`` is timed first."""
    from resdistill.data import DatasetInfo
    from sharding.magnification import display_mag
    from sharding.ray_cluster import ray_init

    info = DatasetInfo.load(data)
    # with the dashboard, as the CLI starts it: Ray Train's placement-group cleaner polls its
    # State API (without it the cleaner logs a failure every second)
    _, init_s = timed(lambda: ray_init(None))
    runs: dict[str, dict[str, float]] = {}
    rows = []
    for stage in STAGES:
        mag = info.highest if stage == "teacher" else student_mag
        n = teacher_steps if stage == "teacher" else steps
        runs[stage] = run = loop_run(stage, data, teacher, targets, mag, work, batch=batch,
                                     steps=n, cpus=cpus)  # fmt: skip
        bare = bare_rate(stage, data, teacher, mag, batch=batch, steps=max(4, n // 8),
                         threads=cpus)  # fmt: skip
        log(f"  {stage}: loop {run['steady_rate']:.1f}/s, bare {bare:.1f}/s")
        rows.append(row(
            f"train loop vs bare loop: {STAGES[stage].label} at {display_mag(mag)}", "bare loop",
            bare, "training loop", run["steady_rate"], "samples/s", run["steady_rate"] / bare,
            ">= 0.8",
            f"{run['samples']} samples, batch {batch}, {cpus} threads, 1 loader process; first "
            f"step {run['first_step_s']:.1f}s apart",
        ))  # fmt: skip
    on, ca, su = runs["online"], runs["cached"], runs["student"]
    rows.append(row(
        f"distill epoch at {display_mag(student_mag)}: cached targets vs online teacher",
        "online teacher", on["samples"] / on["train_s"], "cached targets",
        ca["samples"] / ca["train_s"], "samples/s", on["train_s"] / ca["train_s"], ">= 5x",
        f"train phase of one epoch, {ca['samples']} samples, first step included",
    ))  # fmt: skip
    rows.append(row(
        f"cached student epoch vs supervised student epoch at {display_mag(student_mag)}",
        "supervised", su["train_s"], "cached distillation", ca["train_s"], "s",
        ca["train_s"] / su["train_s"], "<= 1.15x", "train phase of one epoch, same samples",
    ))  # fmt: skip
    per_run = {k: sum(r[k] for r in runs.values()) / len(runs)
               for k in ("ray_train_start_s", "worker_setup_s", "first_step_s",
                         "validate_report_s", "shutdown_s", "wall_s")}  # fmt: skip
    fixed = per_run["ray_train_start_s"] + per_run["worker_setup_s"] + per_run["shutdown_s"]
    rows.append(row(
        "Ray Train start-up + shutdown per run vs a student epoch", "student epoch (train)",
        su["train_s"], "start-up + shutdown", fixed, "s", fixed / su["train_s"], "",
        f"per run, mean of {len(runs)}: ray.init {init_s:.1f}s (once per session, shared by "
        f"the demo's runs), worker group start {per_run['ray_train_start_s']:.1f}s, worker "
        f"set-up {per_run['worker_setup_s']:.1f}s, loader first step "
        f"{per_run['first_step_s']:.1f}s, shutdown {per_run['shutdown_s']:.1f}s",
    ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", required=True, help="teacher checkpoint folder")
    ap.add_argument("--targets", required=True, help="cached targets of that teacher")
    ap.add_argument("--student-mag", default="2.5x")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--teacher-steps", type=int, default=32)
    ap.add_argument("--work", default="bench-train")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    rows = train_rows(args.data, args.teacher, args.targets, Path(args.work), row=row,
                      student_mag=args.student_mag, batch=args.batch, steps=args.steps,
                      teacher_steps=args.teacher_steps, cpus=os.cpu_count() or 1)  # fmt: skip
    for r in rows:
        print(f"{r['row']}: {r['ratio']:.2f}x ({r['target']}) {r['note']}")


if __name__ == "__main__":
    main()
