"""The tuning driver: base config planned, space built, ``Tuner`` run (or restored), summary out.

Tune results and each trial's checkpoints live in ``<storage>/<name>`` (a folder or ``s3://``),
the trials' Train runs in ``<storage>/<name>/_train``, the resolved options in
``<storage>/<name>/config.yaml``. ``resume`` continues an interrupted run
of the same name with ``Tuner.restore``: finished trials are kept, unfinished and errored
ones restart from their latest checkpoint. ``Tuner.restore`` unpickles the run folder's state,
so a resume first checks it against the run's seal (:mod:`resdistill.tune.seal`).

The schedulers, the kept checkpoints, the table and ``--best-json`` rank trials by one rule, the
trials' own checkpoint rule (:func:`resdistill.tune.stage.ranking`): a search over distillation
reads no label unless ``--select metric`` asks, and its summary states the labels that chose.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

from resdistill.config import TrainConfig
from resdistill.fields import to_plain
from resdistill.run_config import write_run_config
from resdistill.train.runner import run_url, storage_for
from resdistill.tune.config import TuneConfig
from resdistill.tune.schedulers import (
    checkpoint_config,
    default_concurrency,
    make_scheduler,
    seeded_search,
)
from resdistill.tune.space import Domain, build_space, check_space
from resdistill.tune.stage import apply_hparams, base_config, data_url, ranking
from resdistill.tune.trials_table import TuneSummary, print_summary, summarize, write_best_json


def trial_options(cfg: TuneConfig, name: str) -> dict[str, Any]:
    """The ``opts`` of :func:`resdistill.tune.trial.trial_function`: where its Train runs live,
    how they run (:data:`resdistill.tune.trial.TRAINER_OPTIONS`; checkpoints kept by
    :func:`~resdistill.tune.stage.ranking`), whether the steps are fixed."""
    run, chosen = cfg.train.run, ranking(cfg)
    return {
        "storage": run.storage,
        "experiment": name,
        "workers": run.workers,
        "cpus_per_worker": run.cpus_per_worker,
        "gpu": run.device == "cuda",  # resolved by tune_run once Ray is up
        "keep": run.keep,
        "metric": chosen.metric,
        "mode": chosen.mode,
        "fixed_steps": cfg.train.data.steps_per_epoch is not None,
    }


def trial_record(base: TrainConfig, opts: Mapping[str, Any], hparams: Mapping[str, Any]
                 ) -> tuple[str, dict[str, str], dict[str, str]]:  # fmt: skip
    """``(label, params, tags)`` of a trial's tracked record (:mod:`resdistill.tracking`):
    labelled by its hyperparameters; params, its resolved config (the base with them set, as
    :func:`~resdistill.tune.stage.apply_hparams` sets them for the trial itself)."""
    from resdistill.tracking import config_params

    try:
        cfg = apply_hparams(base, hparams, opts)
    except ValueError:  # the trial fails the same way, and says so itself
        cfg = base
    label = ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(hparams.items()))  # fmt: skip
    tags = {"resdistill.stage": cfg.stage, "resdistill.command": "tune",
            "resdistill.dataset": cfg.data.url}  # fmt: skip
    return label, config_params(cfg.to_dict()), tags


def tracking_of(cfg: TuneConfig, name: str) -> Any:
    """The tuning run's resolved ``--tracking`` (one MLflow experiment named for the run);
    :class:`~resdistill.errors.UsageError` when it cannot work here."""
    from resdistill.tracking import resolve

    run = cfg.train.run
    return resolve(run.tracking, storage=run.storage, name=name, folder=None, experiment=name)


def tracking_callbacks(cfg: TuneConfig, base: TrainConfig, name: str) -> list[Any]:
    """The Tune callbacks that record every trial (:func:`resdistill.tracking.hooks.
    trial_callbacks`)."""
    from resdistill.tracking.hooks import trial_callbacks
    from resdistill.tune.trial import TRAIN_CHECKPOINT_KEY

    describe = partial(trial_record, base, trial_options(cfg, name))
    return trial_callbacks(tracking_of(cfg, name), run_url(cfg.train.run.storage, name),
                           describe, TRAIN_CHECKPOINT_KEY)  # fmt: skip


def make_trainable(base: TrainConfig, cfg: TuneConfig, name: str) -> Any:
    """``trial_function`` with the fixed config and run options bound (``tune.with_parameters``)
    and each trial's own actor sized ``--trial-cpus`` (its Train workers ask for theirs)."""
    from ray import tune

    from resdistill.tune.trial import trial_function

    fn = tune.with_parameters(trial_function, base=base, opts=trial_options(cfg, name))
    return tune.with_resources(fn, {"CPU": float(cfg.trial_cpus)})


def make_tuner(
    cfg: TuneConfig, base: TrainConfig, space: Mapping[str, Domain], name: str
) -> tuple[Any, bool]:
    """``(tuner, resumed)``: a new ``Tuner`` (its ``tuner.pkl`` sealed), or with ``--resume``
    ``Tuner.restore`` of ``<storage>/<name>`` when that run exists, once :func:`check_resume`
    has passed."""
    from ray import tune

    from resdistill.tune.seal import TUNER_PKL, ResumeSeal, seal_stored
    from resdistill.tune.trial import FreePlacementGroups, quiet_tune
    from sharding.storage import open_storage

    quiet_tune()
    run = cfg.train.run
    path, fs = storage_for(run.storage)
    trainable = make_trainable(base, cfg, name)
    exp_path = f"{path.rstrip('/')}/{name}"
    if cfg.resume and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        check_resume(cfg, name)
        return tune.Tuner.restore(
            exp_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        ), True
    run_config = tune.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        # worker failures are recovered by restarting the trial (see resdistill.tune.trial)
        failure_config=tune.FailureConfig(max_failures=run.max_failures + cfg.trial_retries),
        checkpoint_config=checkpoint_config(cfg, ranking(cfg)),
        verbose=cfg.verbose,
        callbacks=[FreePlacementGroups(), ResumeSeal(), *tracking_callbacks(cfg, base, name)],
    )
    param_space = {k: d.to_tune() for k, d in space.items()}
    tuner = tune.Tuner(
        trainable, param_space=param_space, tune_config=search_config(cfg, space),
        run_config=run_config,
    )  # fmt: skip
    seal_stored(open_storage(run_url(run.storage, name)), [TUNER_PKL])
    return tuner, False


def search_config(cfg: TuneConfig, space: Mapping[str, Domain]) -> Any:
    """Tune's ``TuneConfig``: the scheduler and the search rank by the trials' rule
    (:func:`~resdistill.tune.stage.ranking`), ``--max-concurrent`` trials at once (default: what
    the cluster holds, which needs Ray up)."""
    from ray import tune

    chosen = ranking(cfg)
    return tune.TuneConfig(
        metric=chosen.metric,
        mode=chosen.mode,
        scheduler=make_scheduler(cfg, space),
        num_samples=cfg.num_samples,
        max_concurrent_trials=cfg.max_concurrent or default_concurrency(cfg),
        time_budget_s=cfg.time_budget_s,
        reuse_actors=False,
        search_alg=seeded_search(cfg.tune_seed),
    )


def check_resume(cfg: TuneConfig, name: str) -> None:
    """Before ``--resume`` lets Tune unpickle the run folder: :func:`resdistill.tune.seal.
    verify` it (one-line :class:`~resdistill.errors.UsageError` naming the file), or, with
    ``--trust-resume``, seal what is there as the user's own. Nothing to resume: nothing to do."""
    from resdistill.tune.seal import TUNER_PKL, seal_stored, verify
    from sharding.storage import open_storage

    store = open_storage(run_url(cfg.train.run.storage, name))
    if not cfg.resume or not store.exists(TUNER_PKL):
        return
    if cfg.trust_resume:
        seal_stored(store)
    else:
        verify(store)


def tune_run(cfg: TuneConfig) -> TuneSummary:
    """Tune as ``cfg`` says: print the space, run the trials, print the table, write
    ``best_json``; return the :class:`TuneSummary`. The resolved options go to
    ``<storage>/<name>/config.yaml`` (with the dataset's fingerprint). Raises
    :class:`~resdistill.errors.UsageError` (and the ``ValueError``/``FileNotFoundError`` of an
    unusable dataset) before any Ray work, and so is a run folder another tune run holds (its
    lease, :mod:`resdistill.train.run_lease`, is held until the end)."""
    from rich.console import Console

    from resdistill.config import resolve_device
    from resdistill.errors import UsageError
    from resdistill.train.run_lease import check_lease, output_lease
    from sharding.ray_cluster import cluster_gpus, ray_init

    console = Console(highlight=False)
    run, stage = cfg.train.run, cfg.stage
    base = base_config(cfg)
    space = build_space(cfg)
    check_space(space, base, cfg)
    make_scheduler(cfg, space)  # its errors before any Ray work
    if run.resume_from:
        raise UsageError("--resume-from: a tune run continues with --resume (each trial from its "
                         "own latest checkpoint)")  # fmt: skip
    # a random suffix: two runs started in one second never share a folder
    name = run.name or f"tune-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    epochs = cfg.train.optim.epochs
    chosen = ranking(cfg, base)
    console.print(
        f"[bold]tune {stage}[/] on {data_url(base)}: {cfg.num_samples} samples, scheduler "
        f"{cfg.scheduler}, {chosen.mode} {chosen.metric} over {epochs} epochs; trials of "
        f"{run.workers} workers x {run.cpus_per_worker:g} CPU (--device {run.device}) "
        f"+ {cfg.trial_cpus:g} CPU; run {name!r} -> {run_url(run.storage, name)}",
        soft_wrap=True,
    )
    for key, dom in space.items():
        console.print(f"  {key:16s} {dom}")
    console.print(f"trials ranked by {chosen.describe()}", soft_wrap=True)
    console.print(f"tracking: {tracking_of(cfg, name).describe()}", soft_wrap=True)
    assert base.plan is not None

    def note(text: str) -> None:
        console.print(f"[yellow]note[/]: {text}", soft_wrap=True)

    with output_lease(run_url(run.storage, name), "resdistill tune", note) as lease:
        check_resume(cfg, name)  # before anything is written or Ray starts
        given = replace(cfg, train=replace(cfg.train, data=replace(cfg.train.data, url=base.data.url),
                                           run=replace(run, name=name)))  # fmt: skip
        write_run_config(run_url(run.storage, name), "tune", to_plain(given),
                         dataset=(base.data.url, base.plan.dataset))  # fmt: skip
        ray_init(run.address)
        device = resolve_device(run.device, cluster_gpus())
        console.print(f"device: {device} (each trial's {run.workers} worker(s))")
        cfg = replace(cfg, train=replace(cfg.train, run=replace(run, device=device)))
        t0 = time.perf_counter()
        tuner, resumed = make_tuner(cfg, base, space, name)
        if cfg.resume:
            console.print("resuming the interrupted run" if resumed else "[yellow]note[/]: nothing to "
                          "resume under that name: starting it")  # fmt: skip
        grid = tuner.fit()
        summary = summarize(grid, cfg, name, space, resumed=resumed, chosen=chosen,
                            elapsed_s=time.perf_counter() - t0)  # fmt: skip
        print_summary(summary, space, console)
        check_lease(lease)
        if cfg.best_json and summary.best is not None:
            write_best_json(cfg.best_json, summary.best)
            console.print(f"best json:       {cfg.best_json}")
    return summary
