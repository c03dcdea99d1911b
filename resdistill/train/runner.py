"""The driver side of a Ray Train run: storage, the ``TorchTrainer``, the run's summary.

* :func:`make_trainer` - a ``TorchTrainer`` over ``workers`` DDP ranks (gloo on CPU, NCCL with
  one GPU per worker), its ``RunConfig`` on a local folder or ``s3://bucket/prefix``,
  ``FailureConfig(max_failures)`` and a ``CheckpointConfig`` keeping the ``keep`` best
  checkpoints by a validation metric plus the latest. Tune builds its trials' trainers here too.
* :func:`launch` - such a trainer run to completion.
* :func:`summarize` / :func:`print_summary` - best epoch, its metrics and checkpoint URLs, and
  how the best was chosen (the rule and the labelled validation slides it read).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resdistill.checkpoint import checkpoint_url
from resdistill.config import DEFAULT_METRIC
from resdistill.train.selection import Selection

#: Ray Train's controller takes a worker's report at its next poll of the worker group and a
#: worker's second report waits for that (a queue of one), so every epoch end and the run's end
#: wait up to one interval: Ray's 2 s default is most of a short epoch. 0.5 s keeps the polls
#: (one small RPC per worker) negligible. Set the variable to override.
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
#: Ray Train starts a node-drain (preemption) watcher actor per run that polls the GCS every 5 s
#: and logs an error-level line about its restart policy at every start. Its signals serve
#: training loops that checkpoint just in time (``ray.train.preemption_status``); ours
#: checkpoint every epoch and resume from the last one, so the watcher costs a polling actor and
#: a misleading error line per run for nothing. Off unless the environment sets the variable.
PREEMPTION_WATCHER_ENV, PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"


def storage_for(url: str | os.PathLike[str]) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: see
    :func:`sharding.storage.arrow_filesystem`."""
    from sharding.storage import arrow_filesystem

    return arrow_filesystem(url)


def run_url(storage: str, name: str) -> str:
    """URL of a run's folder: ``<storage>/<name>``."""
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def run_config(
    name: str,
    storage: str,
    *,
    max_failures: int = 2,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    keep: int = 1,
    callbacks: Sequence[Any] = (),
    log_level: str = "WARNING",
) -> Any:
    """``RunConfig`` of a run: storage (local or s3), failures retried from the last checkpoint,
    the ``keep`` best checkpoints by ``metric`` kept plus always the latest one. Ray Train's own
    INFO lines (one per report) are hidden by default: the stage prints its own progress.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    path, fs = storage_for(storage)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        ),
        logging_config=LoggingConfig(log_level=log_level),
        callbacks=list(callbacks) or None,
    )


def make_trainer(
    train_fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    *,
    name: str,
    storage: str,
    workers: int = 2,
    gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    keep: int = 1,
    callbacks: Sequence[Any] = (),
    timeout_s: int = 1800,
) -> Any:
    """A ``TorchTrainer`` running ``train_fn(config)`` on ``workers`` Ray Train workers (DDP).

    Backend gloo on CPU; NCCL with one GPU per worker when ``gpu``. ``timeout_s`` bounds every
    collective (a lost peer fails the step instead of hanging; FailureConfig then restarts).
    The controller polls its workers every :data:`HEALTH_CHECK_S` seconds unless the
    environment sets ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, and starts no preemption watcher
    unless it sets ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (:data:`PREEMPTION_WATCHER_ENV`).
    ``callbacks``: Ray Train ``UserCallback``s (Tune forwards reports through one).
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # read from the driver's environment when the trainer starts its controller
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, PREEMPTION_WATCHER)
    resources: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if gpu:
        resources["GPU"] = 1.0
    return TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=timeout_s),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=run_config(
            name,
            storage,
            max_failures=max_failures,
            metric=metric,
            mode=mode,
            keep=keep,
            callbacks=callbacks,
        ),
    )


def launch(
    train_fn: Callable[[dict[str, Any]], None], config: dict[str, Any], **kwargs: Any
) -> Any:
    """``make_trainer(train_fn, config, **kwargs).fit()``: the run's ``Result``.

    Raises ``ray.train.TrainingFailedError`` when the run fails beyond ``max_failures``.
    """
    return make_trainer(train_fn, config, **kwargs).fit()


@dataclass
class RunSummary:
    """What a finished run printed and what callers (the CLI, the demo) read back.

    ``metric`` ranked the checkpoints under the rule ``select`` (``--select``, resolved);
    ``labelled_val_slides`` is how many labelled validation slides that choice read (0 when
    label-free): a report adds them to the run's label budget.
    """

    name: str
    run_url: str
    epochs: int
    best_epoch: int | None
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]
    best_checkpoint: str | None
    latest_checkpoint: str | None
    metric: str
    elapsed_s: float = 0.0
    select: str = "metric"
    labelled_val_slides: int = 0


def summarize(
    result: Any, *, name: str, storage: str, metric: str = DEFAULT_METRIC, mode: str = "max",
    elapsed_s: float = 0.0, selection: Selection | None = None,
) -> RunSummary:  # fmt: skip
    """Best and latest checkpoint of a ``Result`` (best by ``metric``, ties to the later epoch;
    a ``selection`` gives the metric, the mode and the label count instead)."""
    if selection is not None:
        metric, mode = selection.metric, selection.mode
    best_ckpt, best_metrics = None, {}
    sign = 1.0 if mode == "max" else -1.0
    best_key: tuple[float, int] | None = None
    for ckpt, metrics in result.best_checkpoints or []:
        value = metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        key = (sign * float(value), int(metrics.get("epoch", 0)))
        if best_key is None or key > best_key:
            best_key, best_ckpt, best_metrics = key, ckpt, dict(metrics)
    last = dict(result.metrics or {})
    return RunSummary(
        name=name,
        run_url=run_url(storage, name),
        epochs=int(last.get("epoch", 0)),
        best_epoch=int(best_metrics["epoch"]) if "epoch" in best_metrics else None,
        best_metrics=best_metrics,
        last_metrics=last,
        best_checkpoint=checkpoint_url(best_ckpt),
        latest_checkpoint=checkpoint_url(result.checkpoint),
        metric=metric,
        elapsed_s=elapsed_s,
        select=selection.rule if selection is not None else "metric",
        labelled_val_slides=selection.labelled_val_slides if selection is not None else 0,
    )


def print_summary(summary: RunSummary, *, title: str, console: Any = None) -> None:
    """A rich table: best epoch, its metrics, the last epoch's, checkpoint URLs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column(f"best (epoch {summary.best_epoch})" if summary.best_epoch else "best")
    table.add_column(f"last (epoch {summary.epochs})")
    keys = [k for k in summary.last_metrics if k not in ("epoch",)]
    for k in sorted(set(keys) | set(summary.best_metrics) - {"epoch"}):
        table.add_row(k, _fmt(summary.best_metrics.get(k)), _fmt(summary.last_metrics.get(k)))
    console.print(table)
    console.print(f"run:               {summary.run_url}")
    console.print(f"best checkpoint:   {summary.best_checkpoint}")
    chosen = Selection(summary.select, summary.metric, "", summary.labelled_val_slides)
    console.print(f"chosen by:         {chosen.describe()}")
    console.print(f"latest checkpoint: {summary.latest_checkpoint}")
    if summary.elapsed_s:
        console.print(f"wall time:         {summary.elapsed_s:.1f} s")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
