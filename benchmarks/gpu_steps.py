"""What one measurement of ``bench_gpu.py`` runs, without Ray: the training worker's
environment and steps in one process, a timed loop over batches, ``nvidia-smi`` sampling.

* :func:`worker_env` / :func:`prepare` - a :class:`WorkerEnv` per variant (:data:`VARIANTS`) and
  the model laid out as :func:`resdistill.train.worker_env.prepare_model` does (no DDP).
* :func:`supervised_step` / :func:`distill_step` - the stages' training steps on a batch.
* :func:`step_rate` - images/s of a step over batches; :func:`fed_rate` - the training loader's
  samples/s with batches prepared on the device, alone or feeding a step.
* :class:`GpuMonitor` - the GPU's utilisation and memory every 0.2 s while a block runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

# bench_rows by bare name, as the scripts import it, however this module is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_rows import timed  # noqa: E402
from torch import nn  # noqa: E402

from resdistill.config import LossConfig, SpeedConfig  # noqa: E402
from resdistill.data import Batch, DatasetInfo, PairedAugment, make_loader  # noqa: E402
from resdistill.measures.compute import sync_device  # noqa: E402
from resdistill.models import build_model  # noqa: E402
from resdistill.train.optim import make_optimizer  # noqa: E402
from resdistill.train.teacher_net import DistillStep, FrozenTeacher, build_loss, distill_batch  # noqa: E402
from resdistill.train.worker_env import WorkerEnv  # noqa: E402

VARIANTS = {
    "fp32": SpeedConfig(amp="off"),
    "bf16_cl": SpeedConfig(amp="bf16", channels_last=True),
    "bf16_cl_compile": SpeedConfig(amp="bf16", channels_last=True, compile="inductor"),
}


class GpuMonitor:
    """While the ``with`` block runs, a thread reads ``nvidia-smi``'s utilisation (%) and memory
    used (MiB) every 0.2 s; :meth:`summary` is None-valued off CUDA or without nvidia-smi. The
    first sample (it covers the time before the block) is dropped when there are 3 or more."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> GpuMonitor:
        exe = shutil.which("nvidia-smi")
        if exe and self.device.type == "cuda":
            gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            cmd = [exe, "-i", gpu or str(self.device.index or 0), "--loop-ms=200",
                   "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]  # fmt: skip
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True)  # fmt: skip
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout if self.proc and self.proc.stdout else []:
            with contextlib.suppress(ValueError):
                util, mem = line.split(",")[:2]
                self.samples.append((float(util), float(mem)))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        if self.thread is not None:
            self.thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        kept = self.samples[1:] if len(self.samples) > 2 else self.samples
        util, mem = [u for u, _ in kept], [m for _, m in kept]
        return {"gpu_util_mean": statistics.fmean(util) if util else None,
                "gpu_mem_used_mib": max(mem) if mem else None, "util_samples": len(kept)}  # fmt: skip


def worker_env(variant: str, device: torch.device) -> WorkerEnv:
    """A one-process :class:`WorkerEnv` with ``variant``'s speed settings."""
    return WorkerEnv(rank=0, world_size=1, local_rank=0, device=device, **asdict(VARIANTS[variant]))


def prepare(model: nn.Module, env: WorkerEnv) -> nn.Module:
    """:func:`resdistill.train.worker_env.prepare_model` in one process, without Ray or DDP:
    NHWC weights when asked, on the device, ``torch.compile`` with the env's backend (dynamo
    reset first: its recompile limit is per code object, which all our networks share)."""
    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(env.device)
    if env.compile:
        torch._dynamo.reset()
        model = torch.compile(model, backend=env.compile)
    return model


class Logits(nn.Module):
    """``model``'s logits of ``env.input(x)`` under ``env.autocast()``: a worker's forward."""

    def __init__(self, model: nn.Module, env: WorkerEnv) -> None:
        super().__init__()
        self.model, self.env = model, env

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.env.autocast():
            return self.model(self.env.input(x))[0]


def supervised_step(arch: str, env: WorkerEnv) -> Callable[[Batch], None]:
    """The supervised training step on a batch (``images[0]``; label -1, unlabelled, as 0)."""
    model = prepare(build_model(arch, 2), env).train()
    opt, ce = make_optimizer(model.parameters()), nn.CrossEntropyLoss()

    def step(batch: Batch) -> None:
        with env.autocast():
            logits, _ = model(env.input(batch.images[0]))
        loss = ce(logits.float(), batch.labels.to(env.device, non_blocking=True).clamp_min(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def distill_step(t_arch: str, s_arch: str, env: WorkerEnv) -> Callable[[Batch], None]:
    """:class:`~resdistill.train.stages.DistillStage`'s online step: the frozen teacher on
    ``images[1]``, the student with the KD + feature loss on ``images[0]``."""
    student, teacher = build_model(s_arch, 2), FrozenTeacher(build_model(t_arch, 2))
    layout = torch.channels_last if env.channels_last else torch.contiguous_format
    teacher = teacher.to(env.device, memory_format=layout)
    loss = build_loss(LossConfig(), student.feature_channels, teacher.net.feature_channels)
    model = prepare(DistillStep(student, loss), env).train()
    opt = make_optimizer(model.parameters())

    def step(batch: Batch) -> None:
        total, *_ = distill_batch(model, teacher, batch, move=env.input, autocast=env.autocast)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def step_rate(step: Callable[[Batch], Any], batches: Iterator[Batch], device: torch.device, *,
              warm: int = 0, seconds: float = math.inf, min_steps: int = 0) -> dict[str, Any]:  # fmt: skip
    """Images/s of ``step`` over ``batches``: the first untimed (``first_s``: a loader's buffer,
    cuDNN's search, a compile), ``warm`` more untimed, then the rest, stopping early once
    ``seconds`` and ``min_steps`` have passed; synchronised before each clock reading."""
    _, first_s = timed(lambda: (step(next(batches)), sync_device(device)))
    for _ in range(warm):
        step(next(batches))
    sync_device(device)
    with GpuMonitor(device) as mon:
        n = images = 0
        t0 = time.perf_counter()
        for b in batches:
            step(b)
            n, images = n + 1, images + len(b)
            if n >= min_steps and time.perf_counter() - t0 >= seconds:
                break
        sync_device(device)
        elapsed = time.perf_counter() - t0
    return {"images_per_s": images / elapsed, "steps": n, "seconds": elapsed,
            "first_s": first_s, **mon.summary()}  # fmt: skip


def fed_rate(url: str, mags: list[str], *, workers: int, batch: int, samples: int,
             device: torch.device, step: Callable[[Batch], Any] | None) -> dict[str, Any]:  # fmt: skip
    """Samples/s of the training loader preparing its batches on ``device`` (pinned on CUDA),
    each handed to ``step`` when given (:func:`step_rate`; the first batch untimed)."""
    loader = make_loader(DatasetInfo.load(url), ["train"], mags, batch_size=batch, train=True,
                         num_workers=workers, shuffle_buffer=256, augment=PairedAugment(),
                         steps=max(2, samples // batch + 1), pin_memory=device.type == "cuda",
                         device=device)  # fmt: skip
    try:
        out = step_rate(step or (lambda b: None), loader.epoch(), device)
    finally:
        loader.close()
    return {"samples_per_s": out.pop("images_per_s"), **out}
