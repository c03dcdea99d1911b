"""The tuning driver: options checked, space built, ``Tuner`` run (or restored), summary out.

Tune results and each trial's checkpoints live in ``<storage>/<name>`` (a folder or ``s3://``),
the trials' Train runs in ``<storage>/<name>/_train``. ``--resume`` continues an interrupted run
of the same ``--name`` with ``Tuner.restore``: finished trials are kept, unfinished and errored
ones restart from their latest checkpoint.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import Any

from resdistill.config import TrainConfig
from resdistill.errors import UsageError
from resdistill.train.runner import run_url, storage_for
from resdistill.tune.report import TuneSummary, print_summary, summarize, write_best_json
from resdistill.tune.schedulers import (
    default_concurrency,
    make_scheduler,
    seeded_search,
    trial_checkpoints_kept,
)
from resdistill.tune.space import Domain, build_space, check_space
from resdistill.tune.stage import base_config, data_url, stage_of


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible tuning options with one line each (:class:`UsageError`)."""
    for opt in ("num_samples", "grace_period", "perturbation_interval", "workers", "epochs"):
        if getattr(args, opt) < 1:
            raise UsageError(f"--{opt.replace('_', '-')} must be at least 1")
    if args.reduction_factor <= 1:
        raise UsageError("--reduction-factor must be above 1")
    if not 0 < args.pbt_quantile <= 0.5:
        raise UsageError("--pbt-quantile must be in (0, 0.5]")
    if args.trial_cpus <= 0 or args.cpus_per_worker < 0:
        raise UsageError("--trial-cpus must be above 0 (e.g. 0.1), --cpus-per-worker 0 or more")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError("--max-concurrent must be at least 1")
    if args.resume and not args.name:
        raise UsageError("--resume needs the --name of the run to continue")


def trial_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``opts`` of :func:`resdistill.tune.trial.trial_function`: where its Train runs live,
    how they run (:data:`resdistill.tune.trial.TRAINER_OPTIONS`), whether the steps are fixed."""
    return {
        "storage": args.storage,
        "experiment": name,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "gpu": bool(args.gpu),
        "keep": args.keep,
        "metric": args.metric,
        "mode": args.mode,
        "fixed_steps": args.steps_per_epoch is not None,
    }


def make_trainable(base: TrainConfig, args: argparse.Namespace, name: str) -> Any:
    """``trial_function`` with the fixed config and run options bound (``tune.with_parameters``)
    and each trial's own actor sized ``--trial-cpus`` (its Train workers ask for theirs)."""
    from ray import tune

    from resdistill.tune.trial import trial_function

    fn = tune.with_parameters(trial_function, base=base, opts=trial_options(args, name))
    return tune.with_resources(fn, {"CPU": float(args.trial_cpus)})


def make_tuner(
    args: argparse.Namespace, base: TrainConfig, space: Mapping[str, Domain], name: str
) -> tuple[Any, bool]:
    """``(tuner, resumed)``: a new ``Tuner``, or with ``--resume`` ``Tuner.restore`` of
    ``<storage>/<name>`` when that run exists."""
    from ray import tune

    from resdistill.tune.trial import FreePlacementGroups

    path, fs = storage_for(args.storage)
    trainable = make_trainable(base, args, name)
    exp_path = f"{path.rstrip('/')}/{name}"
    if args.resume and tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        return tune.Tuner.restore(
            exp_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        ), True
    tune_config = tune.TuneConfig(
        metric=args.metric,
        mode=args.mode,
        scheduler=make_scheduler(args, space),
        num_samples=args.num_samples,
        max_concurrent_trials=args.max_concurrent or default_concurrency(args),
        time_budget_s=args.time_budget_s,
        reuse_actors=False,
        search_alg=seeded_search(args.tune_seed),
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        # worker failures are recovered by restarting the trial (see resdistill.tune.trial)
        failure_config=tune.FailureConfig(max_failures=args.max_failures + args.trial_retries),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=trial_checkpoints_kept(args)),
        verbose=args.verbose,
        callbacks=[FreePlacementGroups()],
    )
    param_space = {k: d.to_tune() for k, d in space.items()}
    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config, run_config=run_config
    ), False


def tune_run(args: argparse.Namespace) -> TuneSummary:
    """Tune as ``args`` say: print the space, run the trials, print the table, write
    ``--best-json``; return the :class:`TuneSummary`. Raises :class:`UsageError` (and the
    ``ValueError``/``FileNotFoundError`` of an unusable dataset) before any Ray work."""
    from rich.console import Console

    from sharding.ray_cluster import ray_init

    check_args(args)
    console = Console(highlight=False)
    stage = stage_of(args)
    base = base_config(args)
    space = build_space(args, stage)
    check_space(space, base, args)
    make_scheduler(args, space)  # its errors before any Ray work
    name = args.name or f"tune-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(
        f"[bold]tune {stage}[/] on {data_url(base)}: {args.num_samples} samples, scheduler "
        f"{args.scheduler}, {args.mode} {args.metric} over {args.epochs} epochs; trials of "
        f"{args.workers} workers x {args.cpus_per_worker:g} CPU{' + GPU' if args.gpu else ''} "
        f"+ {args.trial_cpus:g} CPU; run {name!r} -> {run_url(args.storage, name)}",
        soft_wrap=True,
    )
    for key, dom in space.items():
        console.print(f"  {key:16s} {dom}")
    ray_init(args.address)
    t0 = time.perf_counter()
    tuner, resumed = make_tuner(args, base, space, name)
    if args.resume:
        console.print("resuming the interrupted run" if resumed else "[yellow]note[/]: nothing to "
                      "resume under that name: starting it")  # fmt: skip
    grid = tuner.fit()
    summary = summarize(grid, args, name, space, resumed=resumed,
                        elapsed_s=time.perf_counter() - t0)  # fmt: skip
    print_summary(summary, space, console)
    if args.best_json and summary.best is not None:
        write_best_json(args.best_json, summary.best)
        console.print(f"best json:       {args.best_json}")
    return summary
