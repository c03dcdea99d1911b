"""The Ray hooks that feed a :class:`~resdistill.tracking.backends.TrackedRun`.

* :class:`EpochTracking` - a Ray Train ``UserCallback`` of ``teacher`` and ``distill`` runs.
  Ray Train V2 runs it in the Train controller, an actor pinned to the driver's node, after
  every ``ray.train.report``: it records ``metrics[0]``, rank 0's report (the training metrics
  are all-reduced over the ranks before they are reported), so a run of N workers leaves one
  record, and a local store is written on the machine the command ran on.
* :class:`TrialTracking` - a Ray Tune ``Callback`` of ``tune`` and ``study``: one record per
  trial, made and written by the Tune driver from each trial's results (rank 0's reports,
  forwarded by :mod:`resdistill.tune.trial`). Restarted trials (a retry, a PBT exploit, a
  resumed tuning run) continue their record.

Tracking never stops training: a failed write is reported once on stderr and training goes on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune
from ray.train import UserCallback
from ray.tune.result import AUTO_RESULT_KEYS

from resdistill.checkpoint import checkpoint_url
from resdistill.tracking.backends import RunInfo, TrackedRun, tracked_run
from resdistill.tracking.spec import Tracking

#: what a trial result holds besides the run's own metrics (Tune's bookkeeping)
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "time_this_iter_s", "time_total_s"}


class _Guard:
    """Calls that may fail without stopping training; the first failure is reported."""

    warned: bool = False

    def guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            if not self.warned:
                self.warned = True
                print(f"tracking: {what} failed ({type(exc).__name__}: {exc}); training goes "
                      "on without it", file=sys.stderr)  # fmt: skip


def record_epoch(run: TrackedRun, metrics: Mapping[str, Any], checkpoint: str | None) -> int:
    """Log one epoch's ``metrics`` (step: their ``epoch``, else Tune's ``training_iteration``)
    and, when ``checkpoint`` is that epoch's and the epoch is the best so far (``best_epoch``),
    mark it best. Returns the epoch."""
    epoch = int(metrics.get("epoch") or metrics.get("training_iteration") or 0)
    run.log({k: v for k, v in metrics.items() if k != "epoch" and k not in TUNE_KEYS}, epoch)
    if checkpoint and int(metrics.get("best_epoch", -1)) == epoch:
        run.best(checkpoint, epoch, metrics)
    return epoch


class EpochTracking(UserCallback, _Guard):
    """Ray Train callback: every report of a run to ``run`` (see the module docstring); the
    record is closed after epoch ``epochs``, the run's last."""

    def __init__(self, run: TrackedRun, epochs: int) -> None:
        self.run, self.epochs = run, epochs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:  # fmt: skip
        if metrics:
            self.guarded(self.run.tracking.kind, self._record, metrics[0], checkpoint)

    def _record(self, metrics: Mapping[str, Any], checkpoint: Any) -> None:
        if record_epoch(self.run, metrics, checkpoint_url(checkpoint)) >= self.epochs:
            self.run.end("FINISHED")


#: ``describe(trial_config) -> (label, params, tags)`` of a trial's record
Describe = Callable[[Mapping[str, Any]], tuple[str, Mapping[str, str], Mapping[str, str]]]


class TrialTracking(tune.Callback, _Guard):
    """Ray Tune callback: one record per trial of the tuning run at ``url`` (its key:
    ``<url>#<trial id>``), described by ``describe(trial.config)`` (a picklable callable: Tune
    pickles its callbacks with the tuning run's state) and named ``<label> [<trial id>]``. The
    best checkpoint is the URL a result carries under ``checkpoint_key``."""

    def __init__(self, tracking: Tracking, url: str, describe: Describe,
                 checkpoint_key: str) -> None:  # fmt: skip
        self.tracking, self.url, self.describe = tracking, url, describe
        self.checkpoint_key = checkpoint_key
        self._runs: dict[str, TrackedRun] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runs": {}, "warned": False}

    def _start(self, trial: Any) -> None:
        label, params, tags = self.describe(trial.config)
        tid = trial.trial_id
        info = RunInfo(f"{self.url}#{tid}", f"{label} [{tid}]" if label else tid, params,
                       {**tags, "resdistill.trial": tid})  # fmt: skip
        run = self._runs.get(trial.trial_id) or tracked_run(self.tracking, info)
        run.info = info  # a restart may bring other hyperparameters (PBT)
        run.start()
        self._runs[trial.trial_id] = run

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.guarded(self.tracking.kind, self._start, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        run = self._runs.get(trial.trial_id)
        if run is not None:
            ckpt = result.get(self.checkpoint_key) or None
            self.guarded(self.tracking.kind, record_epoch, run, result, ckpt)

    def _end(self, trial: Any, status: str) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is not None:
            self.guarded(self.tracking.kind, run.end, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")


def train_callbacks(run: TrackedRun, epochs: int) -> list[Any]:
    """The Ray Train callbacks that record ``run`` (none when tracking is off)."""
    return [EpochTracking(run, epochs)] if run.tracking.on else []


def trial_callbacks(tracking: Tracking, url: str, describe: Describe,
                    checkpoint_key: str) -> list[Any]:  # fmt: skip
    """The Ray Tune callbacks that record the trials of the tuning run at ``url``: Ray Tune's
    own ``TBXLoggerCallback`` for ``tensorboard`` (event files in every trial's folder; Tune
    adds it by default, named here so it stays when ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is
    set), a :class:`TrialTracking` for ``mlflow`` and ``wandb``, nothing for ``none``."""
    if tracking.kind == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]
    if not tracking.on:
        return []
    return [TrialTracking(tracking, url, describe, checkpoint_key)]
