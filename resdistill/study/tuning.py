"""The study's cells on Ray Tune: one grid search per phase, each trial one Ray Train run.

Train V2 refuses ``Tuner(trainer)``, so, as ``resdistill tune`` does, each trial is a function
(:func:`cell_trial`) that runs its cell's config through :func:`resdistill.tune.trial.
run_in_trial` (a ``TorchTrainer`` whose epochs and checkpoints it forwards to Tune). The grid is
``{"cell": tune.grid_search(cell ids)}``; the configs travel with the trainable
(``tune.with_parameters``). Results and the best checkpoint of each trial (by the run's metric)
live in ``<storage>/<experiment>``, the Train runs in ``<storage>/<experiment>/_train``.

Trial resources are sized to the cluster: each trial is ``trial_cpus`` for its actor plus one
Train worker of ``cpus_per_worker`` (and a GPU with ``gpu``), and as many trials run at once as
the cluster's CPUs (GPUs) hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    metric: str = "val_macro_f1"
    mode: str = "max"

    def trainer_options(self, experiment: str) -> dict[str, Any]:
        """The ``opts`` of :func:`resdistill.tune.trial.run_in_trial`."""
        return {"storage": self.storage, "experiment": experiment, "workers": 1,
                "cpus_per_worker": self.cpus_per_worker, "gpu": self.gpu,
                "keep": 1, "metric": self.metric,
                "mode": self.mode}  # fmt: skip

    def concurrency(self) -> int:
        """Trials the cluster holds at once: ``floor(CPU / (trial_cpus + cpus_per_worker))``,
        and at most ``GPU`` with ``gpu``; at least 1."""
        import ray

        res = ray.cluster_resources()
        n = int(res.get("CPU", 1) // (self.trial_cpus + self.cpus_per_worker))
        if self.gpu:
            n = min(n, int(res.get("GPU", 0)))
        return max(1, n)


def cell_trial(
    hparams: dict[str, Any], *, configs: Mapping[str, dict[str, Any]], opts: dict[str, Any]
) -> None:
    """A Tune function trainable: the cell ``hparams["cell"]``'s Ray Train run, continuing the
    trial's own checkpoint after a retry."""
    import ray.tune

    from resdistill.checkpoint import checkpoint_url
    from resdistill.tune.trial import run_in_trial

    cfg = TrainConfig.from_dict(configs[hparams["cell"]])
    run_in_trial(cfg, opts, checkpoint_url(ray.tune.get_checkpoint()))


class CellProgress(tune.Callback):
    """Advances a rich progress bar as cells report and finish. Tune pickles its callbacks with
    the experiment's state: the bar stays with the driver's live object only."""

    def __init__(self, progress: Any, task: Any, metric: str) -> None:
        self.progress, self.task, self.metric = progress, task, metric

    def __getstate__(self) -> dict[str, Any]:
        return {"progress": None, "task": None, "metric": self.metric}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:  # fmt: skip
        if self.progress is None:
            return
        value = result.get(self.metric)
        shown = f"{value:.3f}" if isinstance(value, int | float) else "-"
        self.progress.update(self.task, description=f"{trial.config.get('cell')} epoch "
                             f"{result.get('epoch')} {self.metric} {shown}")  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[red]cell {trial.config.get('cell')} failed[/]")
            self.progress.advance(self.task)


def run_cells(
    configs: Mapping[str, TrainConfig], experiment: str, opts: TrialOptions, console: Any
) -> dict[str, str | None]:
    """Run every config of ``configs`` (cell id -> planned config) as one Tune grid search
    named ``experiment``; ``{cell id: best checkpoint URL, or None when the cell failed}``."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from resdistill.checkpoint import checkpoint_url
    from resdistill.train.runner import storage_for
    from resdistill.tune.trial import FreePlacementGroups

    if not configs:
        return {}
    path, fs = storage_for(opts.storage)
    fn = tune.with_parameters(
        cell_trial,
        configs={k: c.to_dict() for k, c in configs.items()},
        opts=opts.trainer_options(experiment),
    )
    resources = {"CPU": float(opts.trial_cpus)}
    trainable = tune.with_resources(fn, resources)
    progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)  # fmt: skip
    task = progress.add_task(experiment, total=len(configs))
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(sorted(configs))},
        tune_config=tune.TuneConfig(
            metric=opts.metric, mode=opts.mode, reuse_actors=False,
            max_concurrent_trials=opts.concurrency(),
        ),
        run_config=tune.RunConfig(
            name=experiment, storage_path=path, storage_filesystem=fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=opts.metric,
                checkpoint_score_order=opts.mode,
            ),
            callbacks=[FreePlacementGroups(), CellProgress(progress, task, opts.metric)],
        ),
    )  # fmt: skip
    with progress:
        grid = tuner.fit()
    out: dict[str, str | None] = {}
    for result in grid:
        cell = (result.config or {}).get("cell")
        ckpt = None
        if result.error is None:
            with contextlib.suppress(Exception):  # no checkpoint kept
                ckpt = result.get_best_checkpoint(opts.metric, opts.mode)
            ckpt = ckpt or result.checkpoint
        out[cell] = checkpoint_url(ckpt)
    return out
