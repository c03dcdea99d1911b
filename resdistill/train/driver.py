"""The driver of a training run: plan the config, start Ray, run the one worker, summarise.

:func:`train` is what ``resdistill teacher``, ``resdistill distill``, the demo and the tests
call; :mod:`resdistill.tune` builds the same worker into its trials.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, replace
from typing import Any

from resdistill.config import STAGE_DISTILL, STAGE_SUPERVISED, STAGE_TEACHER, TrainConfig
from resdistill.errors import UsageError
from resdistill.run_config import write_run_config
from resdistill.train.runner import RunSummary, launch, print_summary, run_url, summarize
from resdistill.train.selection import selection
from sharding.magnification import display_mag

#: the summary table's title per stage
TITLES = {
    STAGE_TEACHER: "teacher",
    STAGE_SUPERVISED: "supervised baseline",
    STAGE_DISTILL: "distilled student",
}


#: the command that runs each stage (recorded in the run's config.yaml)
COMMANDS = {STAGE_TEACHER: "teacher", STAGE_SUPERVISED: "distill", STAGE_DISTILL: "distill"}


def default_name(cfg: TrainConfig) -> str:
    """``<stage>-<mag>-<YYYYmmdd-HHMMSS>-<4 random hex digits>``: a new run. The suffix keeps
    two runs started in one second apart (a shared name would resume the other's checkpoint);
    an explicit ``--name`` given twice meets the run folder's lease instead."""
    return f"{cfg.stage}-{cfg.model.mag}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def describe(cfg: TrainConfig) -> str:
    """The run's header: what learns from what, on how much data, for how long (planned cfg)."""
    plan, data, model, run = cfg.plan, cfg.data, cfg.model, cfg.run
    assert plan is not None
    splits = ",".join(data.train_splits)
    shape = (
        f"{run.workers} workers x batch {data.batch_size} x {plan.steps_per_epoch} steps/epoch x "
        f"{cfg.optim.epochs} epochs"
    )
    if cfg.stage == STAGE_TEACHER:
        return (
            f"[bold]teacher[/] {model.arch} at {display_mag(model.mag)} on {data.url}: {plan.n_train} train "
            f"samples in {plan.train_shards} shards, {plan.n_val} val; {shape}"
        )
    if cfg.stage == STAGE_SUPERVISED:
        return (
            f"[bold]supervised baseline[/] {model.arch} at {display_mag(model.mag)} on {data.url}: "
            f"{plan.n_train} labelled train samples of {splits} in {plan.train_shards} shards, "
            f"{plan.n_val} val; loss = cross-entropy on labels; {shape}"
        )
    t, lo = cfg.teacher, cfg.loss
    assert t is not None
    unl = plan.n_train - plan.n_labelled
    return (
        f"[bold]distill[/] {model.arch} at {display_mag(model.mag)} <- teacher {t.arch} at {display_mag(t.mag)} "
        f"({t.checkpoint}) on {data.url}: {plan.n_train} train samples ({plan.n_labelled} "
        f"labelled, {unl} unlabeled) of {splits} in {plan.train_shards} shards, {plan.n_val} val; "
        f"loss = {lo.kd_weight:g} x KD(T={lo.temperature:g}) + {lo.feature_weight:g} x "
        f"{lo.feature_loss}({lo.feature_resize}"
        + (f", {lo.feature_grid}x{lo.feature_grid} grid)" if lo.feature_grid else ")")
        + (f" + {lo.attention_weight:g} x attention" if lo.attention_weight else "")
        + (f"; KD on tiles of teacher confidence >= {lo.kd_threshold:g}" if lo.kd_threshold else "")
        + f"; the loss reads no label; {shape}"
    )


def summary_json_target(url: str) -> tuple[Any, str]:
    """``(storage, file name)`` where ``--summary-json`` goes: a local path or ``s3://`` URL,
    checked before any training, so a folder given for the file or a missing bucket fails in
    one line now rather than after the run. The write (:func:`write_summary_json`) is atomic."""
    from sharding.storage import StorageError, is_remote, local_path, open_storage, split_s3_url

    try:
        if is_remote(url):
            bucket, key = split_s3_url(url)
            parent, _, name = f"s3://{bucket}/{key}".rpartition("/")
            folder = url.endswith("/") or not key
        else:
            path = local_path(url)
            parent, name = str(path.parent), path.name
            folder = url.endswith(("/", os.sep)) or path.is_dir()
    except ValueError as exc:
        raise UsageError(f"--summary-json: {exc}") from None
    if folder or not name:
        raise UsageError(f"--summary-json {url}: name a file (e.g. summary.json), not a folder")
    store = open_storage(parent)
    try:
        store.check()
    except (OSError, StorageError) as exc:
        raise UsageError(f"--summary-json {url}: {exc}") from None
    return store, name


def write_summary_json(target: tuple[Any, str], doc: dict[str, Any]) -> None:
    """``doc`` as JSON to ``target`` (:func:`summary_json_target`): a temp file beside it and
    ``os.replace`` (locally), one PUT (S3): a reader sees the previous file or the whole new one."""
    store, name = target
    store.write_bytes(name, (json.dumps(doc, indent=1, default=str) + "\n").encode())


def shard_error_of(exc: BaseException) -> Exception | None:
    """The :class:`~resdistill.data.ShardError` behind a failed Ray Train run (a worker's
    exception, possibly wrapped by Ray), or None: a bad shard is input to fix, not a crash."""
    from resdistill.data.errors import ShardError

    todo: list[BaseException] = [exc, *getattr(exc, "worker_failures", {}).values()]
    done: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in done:
            continue
        done.add(id(e))
        if isinstance(e, ShardError):
            return ShardError(str(e))
        todo += [c for c in (getattr(e, "cause", None), e.__cause__) if c is not None]
    return None


def train(cfg: TrainConfig, *, console: Any = None) -> RunSummary:
    """Run ``cfg`` (planned here: see :func:`resdistill.train.preflight.prepare`) on Ray Train;
    print its header, per-epoch progress and a summary table; return the :class:`RunSummary`.

    The run holds the lease on its folder ``<storage>/<name>`` throughout
    (:mod:`resdistill.train.run_lease`): a second run of that name is refused while it runs. A
    rerun with the same ``run.name`` and ``run.storage`` resumes after its latest checkpoint when
    that checkpoint learnt on the same dataset with the same settings, or when ``--resume-from``
    names it (:mod:`resdistill.train.resume_guard`); ``--resume-from`` into a new run starts
    from the checkpoint it names. The run's options (as given, with its name) are written to
    ``<storage>/<name>/config.yaml`` with the resdistill version, the git commit and the
    dataset's fingerprint (:mod:`resdistill.run_config`), so ``--config`` on that file repeats
    the run. Raises :class:`~resdistill.errors.UsageError` (options, dataset, teacher, targets,
    a held run folder, a checkpoint that is not this run's) before any Ray work,
    :class:`~resdistill.data.ShardError` (one line naming the shard) when a worker met an
    unreadable shard, and Ray's ``TrainingFailedError`` when workers fail beyond
    ``max_failures`` for any other reason.
    """
    from rich.console import Console

    from resdistill.train.preflight import prepare
    from resdistill.train.resume_guard import check_resume
    from resdistill.train.run_lease import check_lease, output_lease

    console = console or Console(highlight=False)
    notes: list[str] = []
    given = cfg
    cfg = prepare(cfg, notes=notes)
    summary_target = summary_json_target(cfg.run.summary_json) if cfg.run.summary_json else None
    name = cfg.run.name or default_name(cfg)
    cfg = replace(cfg, run=replace(cfg.run, name=name))
    folder = run_url(cfg.run.storage, name)
    with output_lease(folder, f"resdistill {COMMANDS[cfg.stage]}", notes.append) as lease:
        start = check_resume(cfg, folder)
        summary = _run(cfg, given, start, notes, console)
        check_lease(lease)
        if summary_target is not None:
            write_summary_json(summary_target, {**asdict(summary), "stage": cfg.stage})
    return summary


def _run(cfg: TrainConfig, given: TrainConfig, start: str | None, notes: list[str],
         console: Any) -> RunSummary:  # fmt: skip
    """The run of the planned, named ``cfg`` (``given``: as the user gave it) once its folder
    is leased: its config.yaml, header, the Ray Train run (from ``start`` when a new run
    continues a checkpoint) and the summary table."""
    from resdistill.config import resolve_device
    from resdistill.tracking import training_run
    from resdistill.tracking.hooks import train_callbacks
    from resdistill.train.worker import loop_config, train_worker
    from sharding.ray_cluster import cluster_gpus, ray_init

    run, name = cfg.run, cfg.run.name
    assert cfg.plan is not None
    run_given = replace(given.run, name=name)  # as given (--select auto stays auto), named
    given = replace(given, data=replace(given.data, url=cfg.data.url), run=run_given, plan=None)
    write_run_config(run_url(run.storage, name), COMMANDS[cfg.stage], given.to_dict(),
                     dataset=(cfg.data.url, cfg.plan.dataset))  # fmt: skip
    console.print(describe(cfg), soft_wrap=True)
    console.print(f"run {name!r} -> {run_url(run.storage, name)}")
    if start is not None:
        console.print(f"starting from {start} (--resume-from)", soft_wrap=True)
    chosen = selection(cfg)
    console.print(f"checkpoint kept: {chosen.describe()}", soft_wrap=True)
    tracked = training_run(cfg, run_url(run.storage, name), command=COMMANDS[cfg.stage],
                           tags={"resdistill.select": chosen.describe()})  # fmt: skip
    tracked.start()
    console.print(f"tracking: {tracked.tracking.describe()}", soft_wrap=True)
    for text in notes:
        console.print(f"[yellow]note[/]: {text}", soft_wrap=True)
    ray_init(run.address)
    device = resolve_device(run.device, cluster_gpus())
    console.print(f"device: {device} ({run.workers} worker(s); --device {run.device})")
    if cfg.plan.embeddings is not None:  # a frozen backbone: its embeddings, once per dataset
        from resdistill.train.embeddings import ensure_embeddings

        cfg = ensure_embeddings(cfg, device, lambda text: console.print(text, soft_wrap=True))
    t0 = time.perf_counter()
    try:
        result = launch(train_worker, loop_config(cfg, start), name=name, storage=run.storage,
                        workers=run.workers, gpu=device == "cuda", cpus_per_worker=run.cpus_per_worker,
                        max_failures=run.max_failures, keep=run.keep, metric=chosen.metric,
                        mode=chosen.mode, callbacks=train_callbacks(tracked, cfg.optim.epochs))  # fmt: skip
    except Exception as exc:
        tracked.end("FAILED")
        bad = shard_error_of(exc)
        if bad is None:
            raise
        raise bad from None
    tracked.end("FINISHED")
    summary = summarize(result, name=name, storage=run.storage, selection=chosen,
                        elapsed_s=time.perf_counter() - t0)  # fmt: skip
    print_summary(summary, title=f"{TITLES[cfg.stage]} {name}", console=console)
    return summary
