"""The epoch loop every stage runs on every worker: state, restore, report + checkpoint, trace.

* :class:`TrainState` - progress stored in ``trainer.pt`` (epoch, step, best, history, lineage).
* :func:`restore` - the run's latest checkpoint, or a start checkpoint handed in by Tune.
* :func:`fit` - epochs ``state.epoch + 1 .. epochs``: train, validate, report metrics with a
  checkpoint written by :func:`resdistill.checkpoint.write_checkpoint`.
* :class:`Tracer` - an optional JSON-lines trace of worker starts and epochs (``--trace-dir``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from resdistill.checkpoint import (
    MODEL_FILE,
    TRAINER_FILE,
    ModelCard,
    checkpoint_url,
    load_checkpoint,
    write_checkpoint,
)
from resdistill.config import DEFAULT_METRIC
from resdistill.train.worker_env import WorkerEnv


@dataclass
class TrainState:
    """Progress saved in every checkpoint; plain values only (``weights_only``-loadable).

    ``epoch``: epochs completed (the next epoch to run, 0-based); ``step``: optimizer steps taken;
    ``resumes``: restores so far; ``restored_from``: the checkpoint URL of each restore, oldest
    first (a run's own checkpoint after a worker restart or rerun, another run's when a Tune
    trial starts from a copied checkpoint): the state's lineage. ``selection``: how ``best_*``
    are ranked (:meth:`resdistill.train.selection.Selection.to_dict`: rule, metric, mode and
    the labelled validation slides that chose).
    """

    epoch: int = 0
    step: int = 0
    best_epoch: int | None = None
    best_metric: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: int = 0
    restored_from: list[str] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def update_best(self, epoch: int, value: float, mode: str = "max") -> bool:
        """Record ``value`` of the 1-based ``epoch``; True when it is the best so far (ties: later)."""
        if value is None or math.isnan(value):
            return False
        better = (
            self.best_metric is None
            or (mode == "max" and value >= self.best_metric)
            or (mode == "min" and value <= self.best_metric)
        )
        if better:
            self.best_metric, self.best_epoch = float(value), epoch
        return better


@dataclass
class Restored:
    """A checkpoint loaded on a worker: ``model.pt`` and ``trainer.pt`` payloads, the state
    (restore already counted) and where it came from."""

    model: dict[str, Any]
    trainer: dict[str, Any]
    state: TrainState
    path: str


def restore(start_checkpoint: str | None = None) -> Restored | None:
    """The run's latest checkpoint (``ray.train.get_checkpoint()``), else ``start_checkpoint``
    (a checkpoint folder, local or ``s3://``), else None for a fresh run.

    Ray Train V2 hands the latest reported checkpoint to the training function after a worker
    group restart (FailureConfig) and when a new trainer starts with the same ``RunConfig(name,
    storage_path)``. ``start_checkpoint`` is how a Tune trial restarted by Tune (a restore, a PBT
    exploit) continues from a checkpoint of another Train run, and how ``--resume-from`` starts a
    new run from one. The returned state counts the restore: ``resumes`` + 1 and the
    checkpoint's URL appended to ``restored_from``. Nothing here compares the checkpoint with
    this run's config: the driver has refused, before Ray started, a run checkpoint that learnt
    other data or settings (:mod:`resdistill.train.resume_guard`).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        if start_checkpoint is None:
            return None
        model = load_checkpoint(start_checkpoint, MODEL_FILE)
        trainer = load_checkpoint(start_checkpoint, TRAINER_FILE)
        path = start_checkpoint
    else:
        with ckpt.as_directory() as d:
            model = load_checkpoint(d, MODEL_FILE)
            trainer = load_checkpoint(d, TRAINER_FILE)
        path = checkpoint_url(ckpt) or ""
    state = TrainState.from_dict(trainer["state"])
    state.resumes += 1
    state.restored_from = [*state.restored_from, path]
    return Restored(model, trainer, state, path)


@dataclass
class Payload:
    """What a checkpoint holds, produced on rank 0 only when one is written."""

    card: ModelCard
    state_dict: Mapping[str, Any]
    trainer: Mapping[str, Any]


def report_epoch(
    metrics: Mapping[str, Any], *, env: WorkerEnv, epoch: int, payload: Callable[[], Payload]
) -> None:
    """``ray.train.report(metrics, checkpoint)`` on every rank; rank 0 writes the checkpoint
    ``checkpoint_epoch{epoch:04d}`` (``epoch`` 1-based), which Ray persists to the run's storage
    (local or s3) before ``report`` returns on rank 0."""
    import ray.train

    clean = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    with tempfile.TemporaryDirectory(prefix="rdckpt-") as tmp:
        checkpoint = None
        if env.is_main:
            p = payload()
            write_checkpoint(tmp, card=p.card, state_dict=p.state_dict, trainer=p.trainer,
                             epoch=epoch, metrics=clean)  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            clean, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}"
        )


class Tracer:
    """Optional JSON-lines trace of worker starts and epochs (``--trace-dir``), for tests and ops.

    ``starts.jsonl``: ``{"rank", "pid", "start_epoch", "world_size", "entered", "time"}`` per
    worker start (``entered``: when the training function began, ``time``: when set-up and
    restore were done); ``epochs.jsonl``: ``{"rank", "pid", "epoch", "steps", "samples",
    "time"}`` per finished epoch; ``rank<r>.json``: the latest ``{"pid", "epoch", "phase",
    "time"}`` of rank ``r`` (replaced atomically). Times are ``time.time()``.
    """

    def __init__(self, directory: str | None, env: WorkerEnv) -> None:
        self.dir = Path(directory) if directory else None
        self.env = env
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        if self.dir is None:
            return
        line = json.dumps(
            {"rank": self.env.rank, "pid": os.getpid(), "time": time.time(), **record}
        )
        with open(self.dir / name, "a") as fh:
            fh.write(line + "\n")

    def start(self, start_epoch: int, entered: float | None = None) -> None:
        self._append(
            "starts.jsonl",
            {"start_epoch": start_epoch, "world_size": self.env.world_size, "entered": entered},
        )

    def phase(self, epoch: int, phase: str) -> None:
        if self.dir is None:
            return
        dest = self.dir / f"rank{self.env.rank}.json"
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        record = {"pid": os.getpid(), "epoch": epoch, "phase": phase, "time": time.time()}
        tmp.write_text(json.dumps(record))
        os.replace(tmp, dest)

    def epoch(self, epoch: int, steps: int, samples: int) -> None:
        self._append("epochs.jsonl", {"epoch": epoch, "steps": steps, "samples": samples})


@dataclass
class EpochResult:
    """What one rank's training epoch returns to :func:`fit` (metrics already all-reduced)."""

    metrics: dict[str, float]
    steps: int
    samples: int


def fit(
    *,
    env: WorkerEnv,
    state: TrainState,
    epochs: int,
    train_epoch: Callable[[int], EpochResult],
    validate: Callable[[int], dict[str, float]],
    payload: Callable[[TrainState], Payload],
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    tracer: Tracer | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainState:
    """Run epochs ``state.epoch + 1 .. epochs`` (1-based): train, validate, report + checkpoint.

    ``train_epoch(e)`` and ``validate(e)`` run on every rank and return metrics reduced over all
    ranks; ``fit`` adds ``epoch``, ``step``, timing (``epoch_s``, ``train_samples_per_s``) and
    ``best_epoch`` (the best by ``metric`` in ``mode`` so far, ties to the later epoch; ``metric``
    may be ``epoch``), appends them to ``state.history`` and reports them with the checkpoint of
    ``payload(state)``.
    """
    tracer = tracer or Tracer(None, env)
    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        tracer.phase(epoch, "train")
        result = train_epoch(epoch)
        train_s = time.perf_counter() - t0
        tracer.epoch(epoch, result.steps, result.samples)
        tracer.phase(epoch, "validate")
        metrics: dict[str, float] = {**result.metrics, **validate(epoch)}
        epoch_s = time.perf_counter() - t0
        state.epoch = epoch
        metrics["epoch"] = epoch  # before ranking: --select last ranks by it
        state.update_best(epoch, metrics.get(metric, float("nan")), mode)
        metrics.update(
            step=state.step,
            epoch_s=epoch_s,
            train_samples_per_s=result.samples * env.world_size / train_s if train_s > 0 else 0.0,
            best_epoch=state.best_epoch if state.best_epoch is not None else 0,
        )
        state.history.append({k: float(v) for k, v in metrics.items()})
        tracer.phase(epoch, "report")
        report_epoch(metrics, env=env, epoch=epoch, payload=lambda: payload(state))
        if log is not None and env.is_main:
            log(format_epoch(metrics, epochs, metric))
    tracer.phase(state.epoch, "done")
    return state


def format_epoch(metrics: Mapping[str, Any], epochs: int, metric: str = DEFAULT_METRIC) -> str:
    """One progress line: ``epoch 2/10  train_loss 0.41  val_accuracy 0.91  ...  12.3 s``."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}"]
    shown = ("train_loss", "val_loss", "val_accuracy", DEFAULT_METRIC, "val_distill_loss", metric)
    for k in dict.fromkeys(shown):
        if k in metrics and k != "epoch":
            parts.append(f"{k} {float(metrics[k]):.4f}")
    parts.append(f"{float(metrics.get('train_samples_per_s', 0)):.0f} img/s")
    parts.append(f"{float(metrics.get('epoch_s', 0)):.1f} s")
    return "  ".join(dict.fromkeys(parts))


def console_log(prefix: str = "") -> Callable[[str], None]:
    """A ``log`` callable printing through rich (Ray forwards worker output to the driver)."""
    from rich.console import Console

    console = Console(highlight=False)

    def log(text: str) -> None:
        console.print(f"{prefix}{text}", soft_wrap=True)

    return log
