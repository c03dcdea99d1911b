"""The study's cells on Ray Tune: one grid search per phase, each trial one Ray Train run.

Train V2 refuses ``Tuner(trainer)``, so, as ``resdistill tune`` does, each trial is a function
(:func:`cell_trial`) that runs its cell's config through :func:`resdistill.tune.trial.
run_in_trial` (a ``TorchTrainer`` whose epochs and checkpoints it forwards to Tune). The grid is
``{"cell": tune.grid_search(cell ids)}``; the configs travel with the trainable
(``tune.with_parameters``). Results live in ``<storage>/<experiment>``, the Train runs in
``<storage>/<experiment>/_train``.

Which checkpoint a cell keeps is its own config's rule (:func:`resdistill.train.selection.
selection`: labelled validation metric for the arms that learn from labels, the label-free
distillation loss for those that distil), so one experiment can hold cells of both: each Train
run keeps its best checkpoint by its own rule, and :func:`run_cells` returns, per cell, that
epoch's checkpoint and *validation* metrics (:class:`CellResult`), which choose recipes and fill
the study's validation table. Nothing here reads the test split.

Trial resources are sized to the cluster: each trial is ``trial_cpus`` for its actor plus one
Train worker of ``cpus_per_worker`` (and a GPU with ``gpu``), and as many trials run at once as
the cluster's CPUs (GPUs) hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import tune

from resdistill.config import TrainConfig


@dataclass(frozen=True)
class TrialOptions:
    """How each cell's trial runs (the run storage, resources, metric)."""

    storage: str
    cpus_per_worker: float
    trial_cpus: float = 0.1
    gpu: bool = False
    max_failures: int = 1
    tracking: str = "tensorboard"  # --tracking (resdistill.tracking)
    study: str = "study"  # the study's name: its MLflow experiment / W&B group

    def trainer_options(self, experiment: str) -> dict[str, Any]:
        """The ``opts`` of :func:`resdistill.tune.trial.run_in_trial` (each cell sets its own
        ``metric`` and ``mode``, :func:`cell_trial`)."""
        return {"storage": self.storage, "experiment": experiment, "workers": 1,
                "cpus_per_worker": self.cpus_per_worker, "gpu": self.gpu,
                "keep": 1}  # fmt: skip

    def concurrency(self) -> int:
        """Trials the cluster holds at once: ``floor(CPU / (trial_cpus + cpus_per_worker))``,
        and at most ``GPU`` with ``gpu``; at least 1."""
        import ray

        res = ray.cluster_resources()
        n = int(res.get("CPU", 1) // (self.trial_cpus + self.cpus_per_worker))
        if self.gpu:
            n = min(n, int(res.get("GPU", 0)))
        return max(1, n)


@dataclass(frozen=True)
class CellResult:
    """What a cell's run left: the checkpoint its rule chose (None when it failed), that epoch's
    validation metrics (``val_*`` and ``epoch``), and the rule (``select``, ``metric``,
    ``mode``, ``labelled_val_slides``: the labelled validation slides that chose)."""

    checkpoint: str | None
    val: dict[str, float] = field(default_factory=dict)
    select: str = ""
    metric: str = ""
    mode: str = "max"
    labelled_val_slides: int = 0

    @property
    def score(self) -> float | None:
        """The chosen epoch's ``metric``, signed so that higher is better."""
        from resdistill.study.recipes import score_of

        return score_of(self.val, self.metric, self.mode)

    def to_dict(self) -> dict[str, Any]:
        return {"val": dict(self.val), "select": self.select, "metric": self.metric,
                "mode": self.mode, "labelled_val_slides": self.labelled_val_slides}  # fmt: skip


def cell_trial(
    hparams: dict[str, Any], *, configs: Mapping[str, dict[str, Any]], opts: dict[str, Any]
) -> None:
    """A Tune function trainable: the cell ``hparams["cell"]``'s Ray Train run, keeping its
    checkpoints by its own selection rule, continuing the trial's own checkpoint after a retry."""
    import ray.tune

    from resdistill.checkpoint import checkpoint_url
    from resdistill.train.selection import selection
    from resdistill.tune.trial import run_in_trial

    cfg = TrainConfig.from_dict(configs[hparams["cell"]])
    rule = selection(cfg)
    opts = {**opts, "metric": rule.metric, "mode": rule.mode}
    run_in_trial(cfg, opts, checkpoint_url(ray.tune.get_checkpoint()))


def cell_record(configs: Mapping[str, dict[str, Any]], phase: str, hparams: Mapping[str, Any]
                ) -> tuple[str, dict[str, str], dict[str, str]]:  # fmt: skip
    """``(label, params, tags)`` of a cell's tracked record (:mod:`resdistill.tracking`):
    labelled and tagged with the cell (and the phase's Tune experiment); params, its config."""
    from resdistill.tracking import config_params

    cell = str(hparams.get("cell"))
    doc = configs.get(cell) or {}
    tags = {"resdistill.cell": cell, "resdistill.phase": phase, "resdistill.command": "study",
            "resdistill.stage": str(doc.get("stage", ""))}  # fmt: skip
    return cell, config_params(doc), tags


def tracking_callbacks(configs: Mapping[str, dict[str, Any]], experiment: str,
                       opts: TrialOptions) -> list[Any]:  # fmt: skip
    """The Tune callbacks that record each cell of the grid search ``experiment``: one record
    per cell, in the study's MLflow experiment (W&B group), tagged with the cell."""
    from functools import partial

    from resdistill.tracking import resolve
    from resdistill.tracking.hooks import trial_callbacks
    from resdistill.train.runner import run_url
    from resdistill.tune.trial import TRAIN_CHECKPOINT_KEY

    tracking = resolve(opts.tracking, storage=opts.storage, name=experiment, folder=None,
                       experiment=opts.study)  # fmt: skip
    return trial_callbacks(tracking, run_url(opts.storage, experiment),
                           partial(cell_record, configs, experiment), TRAIN_CHECKPOINT_KEY)  # fmt: skip


def chosen_epoch(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The reported epoch ``metric`` ranks best (``mode``), ties to the later epoch; None when
    no epoch reported it."""
    best, key = None, None
    sign = 1.0 if mode == "max" else -1.0
    for row in rows:
        value = row.get(metric)
        if not isinstance(value, int | float) or math.isnan(value):
            continue
        k = (sign * float(value), float(row.get("epoch") or 0))
        if key is None or k >= key:
            best, key = row, k
    return best


def _result(result: Any, cfg: TrainConfig) -> CellResult:
    """The :class:`CellResult` of one finished trial."""
    from resdistill.train.selection import selection
    from resdistill.tune.trial import TRAIN_CHECKPOINT_KEY

    rule = selection(cfg)
    kept = {"select": rule.rule, "metric": rule.metric, "mode": rule.mode,
            "labelled_val_slides": rule.labelled_val_slides}  # fmt: skip
    if result.error is not None:
        return CellResult(None, **kept)
    df = result.metrics_dataframe
    rows = df.to_dict("records") if df is not None else []
    row = chosen_epoch(rows, rule.metric, rule.mode)
    if row is None or not row.get(TRAIN_CHECKPOINT_KEY):
        return CellResult(None, **kept)
    val = {k: float(v) for k, v in row.items()
           if (k.startswith("val_") or k == "epoch") and isinstance(v, int | float)}  # fmt: skip
    return CellResult(str(row[TRAIN_CHECKPOINT_KEY]), val, **kept)


class CellProgress(tune.Callback):
    """Advances a rich progress bar as cells report and finish. Tune pickles its callbacks with
    the experiment's state: the bar stays with the driver's live object only."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def __getstate__(self) -> dict[str, Any]:
        return {"progress": None, "task": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        if self.progress is None:
            return
        shown = " ".join(f"{k} {result[k]:.3f}" for k in ("val_accuracy", "val_distill_loss")
                         if isinstance(result.get(k), int | float))  # fmt: skip
        self.progress.update(self.task, description=f"{trial.config.get('cell')} epoch "
                             f"{result.get('epoch')} {shown}")  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[red]cell {trial.config.get('cell')} failed[/]")
            self.progress.advance(self.task)


def run_cells(
    configs: Mapping[str, TrainConfig], experiment: str, opts: TrialOptions, console: Any
) -> dict[str, CellResult]:
    """Run every config of ``configs`` (cell id -> planned config) as one Tune grid search
    named ``experiment``; ``{cell id: its CellResult}`` (checkpoint None when it failed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from resdistill.train.runner import storage_for
    from resdistill.tune.trial import FreePlacementGroups, quiet_tune

    if not configs:
        return {}
    quiet_tune()
    path, fs = storage_for(opts.storage)
    docs = {k: c.to_dict() for k, c in configs.items()}
    fn = tune.with_parameters(cell_trial, configs=docs, opts=opts.trainer_options(experiment))
    resources = {"CPU": float(opts.trial_cpus)}
    trainable = tune.with_resources(fn, resources)
    progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)  # fmt: skip
    task = progress.add_task(experiment, total=len(configs))
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(sorted(configs))},
        tune_config=tune.TuneConfig(reuse_actors=False, max_concurrent_trials=opts.concurrency()),
        run_config=tune.RunConfig(
            name=experiment, storage_path=path, storage_filesystem=fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            # the latest, for a retry; the chosen one is the Train run's (module doc)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[FreePlacementGroups(), CellProgress(progress, task),
                       *tracking_callbacks(docs, experiment, opts)],
        ),
    )  # fmt: skip
    with progress:
        grid = tuner.fit()
    out: dict[str, CellResult] = {}
    for result in grid:
        cell = (result.config or {}).get("cell")
        out[cell] = _result(result, configs[cell])
    return out
