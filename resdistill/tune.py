"""Hyperparameter tuning of distillation (or, with ``--teacher-mode``, of the teacher) on Ray Tune.

``python -m resdistill.tune --data s3://bucket/ds --teacher s3://bucket/runs/t1/checkpoint_epoch0010
--student-mag 2.5x --scheduler asha --num-samples 16 --storage s3://bucket/tune --name sweep1
--best-json best.json`` (or ``resdistill tune ...``, or through ``ray job submit``).

Every option of ``resdistill distill`` (data, teacher, model, run) sets the fixed part of each
trial; the search space sets the rest. Tunable names: ``lr``, ``weight_decay``, ``temperature``,
``kd_weight``, ``feature_weight``, ``label_smoothing``, ``student_mag`` (``mag`` in teacher mode),
``batch_size``, ``optimizer``, ``warmup_epochs``. A domain is written ``loguniform:LOW:HIGH``,
``uniform:LOW:HIGH``, ``randint:LOW:HIGH`` (HIGH exclusive), ``choice:A,B,C``, ``grid:A,B,C``
(every value, times ``--num-samples``) or a plain value (fixed). ``--space
lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4`` overrides entries of the default space (a
comma inside a ``choice``/``grid`` belongs to it), ``--space-file`` reads a JSON or YAML mapping
``{name: domain}`` (or ``{"space": {...}}``) first; ``--no-default-space`` starts from nothing.

Schedulers (``--scheduler``):

* ``asha`` - asynchronous successive halving on ``--metric`` (default ``val_macro_f1``, the
  validation macro F1 all-reduced over the Train ranks) per epoch: a trial below the top
  ``1/reduction_factor`` at a rung (``grace_period * reduction_factor^k`` epochs) stops.
* ``pbt`` - Population Based Training: every ``--perturbation-interval`` epochs a trial in the
  bottom ``--pbt-quantile`` copies the latest checkpoint of one in the top quantile and
  perturbs the continuous hyperparameters (x0.8 / x1.2, or resampled); it restarts from that
  checkpoint: the donor's weights, optimizer state, epoch and step. ``weight_decay``,
  ``batch_size``, ``optimizer`` and the magnification are not mutated (the restored optimizer
  state carries the donor's weight decay; the others change what a checkpoint means).
  ``--pbt-synch`` waits until every live trial has reached the interval before ranking them
  (each trial then restarts once per interval); asynchronous PBT ranks whatever trials have
  reported, so a trial that runs ahead may finish before a slow one is ever compared with it.
* ``fifo`` - every trial runs to ``--epochs``.

Each trial is a Tune function trainable that runs one Ray Train V2 ``TorchTrainer`` (see
:mod:`resdistill.tune_worker`): the trial actor takes ``--trial-cpus`` (default 1: it only
waits and forwards), its Train workers ``--workers`` x ``--cpus-per-worker`` (and a GPU each
with ``--gpu``); ``--max-concurrent`` (default: as many as the cluster's CPUs/GPUs hold now)
lets several trials share a machine. Tune results and each trial's checkpoints live in
``<storage>/<name>`` (a folder or ``s3://``), the Train runs in ``<storage>/<name>/_train``;
``--resume`` continues an interrupted run of the same ``--name`` with ``Tuner.restore``
(finished trials are kept, unfinished ones restart from their latest checkpoint).

At the end: a table of trials (hyperparameters, epochs run, last and best metric) and the best
configuration; ``--best-json`` gets ``{"checkpoint": url, "config": {...}, "metric": name,
"value": best value, ...}``, which ``resdistill evaluate`` accepts as a model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resdistill.errors import UsageError

#: every tunable hyperparameter per stage
DISTILL_PARAMS = (
    "lr",
    "weight_decay",
    "temperature",
    "kd_weight",
    "feature_weight",
    "label_smoothing",
    "student_mag",
    "batch_size",
    "optimizer",
    "warmup_epochs",
)
TEACHER_PARAMS = ("lr", "weight_decay", "label_smoothing", "mag", "batch_size", "optimizer",
                  "warmup_epochs")  # fmt: skip
#: what PBT may perturb (continuous settings that keep a checkpoint meaningful)
PBT_MUTABLE = ("lr", "temperature", "kd_weight", "feature_weight", "label_smoothing")
DEFAULT_SPACE = {
    "distill": {
        "lr": "loguniform:1e-4:3e-3",
        "weight_decay": "loguniform:1e-6:1e-3",
        "temperature": "choice:1,2,4,8",
        "kd_weight": "uniform:0.25:2",
        "feature_weight": "uniform:0:2",
    },
    "teacher": {
        "lr": "loguniform:1e-4:3e-3",
        "weight_decay": "loguniform:1e-6:1e-3",
        "label_smoothing": "choice:0,0.1",
    },
}
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS = ("asha", "pbt", "fifo")


# --------------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """One hyperparameter's domain: ``kind`` in :data:`KINDS` or ``fixed``, and its values
    (``(low, high)`` for ranges, the options for ``choice``/``grid``, one value for ``fixed``)."""

    kind: str
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The ``ray.tune`` search domain (a plain value for ``fixed``)."""
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(self.values[0])
        sep = "," if self.kind in ("choice", "grid") else ":"
        return f"{self.kind}:{sep.join(str(v) for v in self.values)}"


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else the stripped text."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_domain(name: str, spec: Any) -> Domain:
    """A :class:`Domain` from ``"loguniform:1e-4:1e-2"``, ``"choice:1,2,4"``, a plain value, a
    list (a choice) or a mapping ``{"type": kind, "values": [...]}`` / ``{"type": kind, "low":
    a, "high": b}``. Raises :class:`UsageError` naming ``name`` when it is malformed."""
    if isinstance(spec, Mapping):
        kind = str(spec.get("type", "")).lower()
        if "values" in spec:
            values = list(spec["values"])
        elif "low" in spec and "high" in spec:
            values = [spec["low"], spec["high"]]
        elif "value" in spec:
            kind, values = "fixed", [spec["value"]]
        else:
            raise UsageError(f"search space {name!r}: give 'values', 'low'/'high' or 'value'")
        return _check_domain(name, kind or "choice", [
            parse_value(v) if isinstance(v, str) else v for v in values
        ])  # fmt: skip
    if isinstance(spec, list | tuple):
        return _check_domain(
            name, "choice", [parse_value(v) if isinstance(v, str) else v for v in spec]
        )
    if not isinstance(spec, str):
        return Domain("fixed", (spec,))
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS:
        return Domain("fixed", (parse_value(spec),))
    sep_values = "," if kind in ("choice", "grid") else ":"
    values = [parse_value(v) for v in rest.split(sep_values) if v.strip()]
    return _check_domain(name, kind, values)


def _check_domain(name: str, kind: str, values: list[Any]) -> Domain:
    if kind == "fixed":
        if len(values) != 1:
            raise UsageError(f"search space {name!r}: a fixed value is one value")
        return Domain(kind, tuple(values))
    if kind not in KINDS:
        raise UsageError(f"search space {name!r}: unknown domain {kind!r} ({', '.join(KINDS)})")
    if kind in ("choice", "grid"):
        if not values:
            raise UsageError(f"search space {name!r}: {kind} needs at least one value")
        return Domain(kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
        raise UsageError(f"search space {name!r}: {kind} needs LOW:HIGH numbers, got {values}")
    low, high = values
    if not low < high:
        raise UsageError(f"search space {name!r}: {kind} needs LOW < HIGH, got {low}:{high}")
    if kind == "loguniform" and low <= 0:
        raise UsageError(f"search space {name!r}: loguniform needs LOW > 0")
    if kind == "randint":
        return Domain(kind, (int(low), int(high)))
    return Domain(kind, (float(low), float(high)))


def split_space_arg(text: str) -> list[tuple[str, str]]:
    """``"lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4"`` -> ``[("lr", "loguniform:..."),
    ("temperature", "choice:1,2,4")]``: a comma starts a new entry only when ``name=`` follows."""
    entries: list[tuple[str, str]] = []
    for part in text.split(","):
        head, eq, tail = part.partition("=")
        if eq and head.strip().isidentifier():
            entries.append((head.strip(), tail))
        elif entries:
            name, spec = entries[-1]
            entries[-1] = (name, f"{spec},{part}")
        else:
            raise UsageError(f"--space: expected NAME=DOMAIN, got {part!r}")
    return entries


def load_space_file(path: str) -> dict[str, Any]:
    """A JSON or YAML mapping ``{name: domain}`` (or ``{"space": {...}}``) from a local file or
    ``s3://`` URL."""
    from sharding.storage import open_storage

    url = os.fspath(path)
    parent, _, leaf = url.rstrip("/").rpartition("/")
    try:
        text = open_storage(parent or ".").read_bytes(leaf).decode()
    except FileNotFoundError:
        raise UsageError(f"--space-file {url}: no such file") from None
    try:
        if url.endswith((".yaml", ".yml")):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise UsageError(f"--space-file {url}: cannot parse: {exc}".splitlines()[0]) from None
    if isinstance(doc, Mapping) and isinstance(doc.get("space"), Mapping):
        doc = doc["space"]
    if not isinstance(doc, Mapping):
        raise UsageError(f"--space-file {url}: expected a mapping of name to domain")
    return dict(doc)


def build_space(args: argparse.Namespace, stage: str) -> dict[str, Domain]:
    """The search space: the stage's default (unless ``--no-default-space``), then
    ``--space-file``, then ``--space``; each later entry replaces an earlier one of its name."""
    allowed = TEACHER_PARAMS if stage == "teacher" else DISTILL_PARAMS
    raw: dict[str, Any] = {} if args.no_default_space else dict(DEFAULT_SPACE[stage])
    if args.space_file:
        raw.update(load_space_file(args.space_file))
    for text in args.space or []:
        raw.update(dict(split_space_arg(text)))
    space: dict[str, Domain] = {}
    for name, spec in raw.items():
        if name not in allowed:
            raise UsageError(
                f"cannot tune {name!r} for the {stage} stage: choose from {', '.join(allowed)}"
            )
        space[name] = parse_domain(name, spec)
    if not space:
        raise UsageError("the search space is empty: pass --space NAME=DOMAIN")
    return space


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``resdistill distill``'s options (the fixed part of every trial) plus the tuning ones."""
    from resdistill.commands import distill

    distill.add_arguments(parser)
    for action in parser._actions:  # not needed in teacher mode: checked in stage_config
        if action.dest in ("student_mag", "teacher"):
            action.required = False
    g = parser.add_argument_group("tuning")
    g.add_argument(
        "--teacher-mode",
        action="store_true",
        help="tune the teacher (resdistill teacher) instead of distillation; --mag picks its "
        "magnification",
    )
    g.add_argument("--mag", default=None, help="teacher mode: magnification (default: highest)")
    g.add_argument(
        "--space",
        action="append",
        default=None,
        help="search space entries NAME=DOMAIN[,NAME=DOMAIN...], e.g. "
        "lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4 (repeatable)",
    )
    g.add_argument("--space-file", default=None, help="JSON or YAML {name: domain} read first")
    g.add_argument(
        "--no-default-space", action="store_true", help="tune only what --space/--space-file say"
    )
    g.add_argument("--scheduler", default="asha", choices=SCHEDULERS)
    g.add_argument("--num-samples", type=int, default=8, help="trials (per grid point)")
    g.add_argument(
        "--metric", default="val_macro_f1", help="reported metric to optimise (all-reduced)"
    )
    g.add_argument("--mode", default="max", choices=("max", "min"))
    g.add_argument("--grace-period", type=int, default=1, help="asha: epochs before a stop")
    g.add_argument("--reduction-factor", type=float, default=2.0, help="asha: keep 1/this")
    g.add_argument(
        "--perturbation-interval", type=int, default=1, help="pbt: epochs between exploits"
    )
    g.add_argument(
        "--pbt-quantile", type=float, default=0.25, help="pbt: bottom/top share exploited/copied"
    )
    g.add_argument(
        "--pbt-synch",
        action="store_true",
        help="pbt: rank and exploit only when every trial has reached the interval",
    )
    g.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs of each trial's own actor")
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials running at once (default: what the cluster's CPUs/GPUs hold now)",
    )
    g.add_argument("--time-budget-s", type=float, default=None, help="stop tuning after this")
    g.add_argument("--trial-retries", type=int, default=0, help="restarts of a failed trial")
    g.add_argument(
        "--keep-trial-checkpoints",
        type=int,
        default=None,
        help="Tune checkpoints kept per trial (default 2; with pbt 2 x interval + 2, so a "
        "donor's checkpoint outlives the exploit)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the interrupted run --name (Tuner.restore)"
    )
    g.add_argument("--best-json", default=None, help="write the best checkpoint and config here")
    g.add_argument("--tune-seed", type=int, default=None, help="seed of the search's sampling")
    g.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's output")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.tune",
        description="Tune distillation (or the teacher) with Ray Tune: ASHA or PBT over Ray "
        "Train trials.",
    )
    return add_arguments(parser)


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible tuning options with one line each."""
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


def stage_config(args: argparse.Namespace) -> Any:
    """The planned :class:`~resdistill.config.TrainConfig` every trial starts from: the teacher
    stage's with ``--teacher-mode``, else distillation's (same checks, same one-line errors as
    ``resdistill teacher`` / ``distill``)."""
    from resdistill.commands import distill, teacher
    from resdistill.train.plan import prepare

    if not args.teacher_mode:
        if not args.student_mag:
            raise UsageError(
                "--student-mag is required (the trials' default; --space student_mag=... tunes it)"
            )
        return prepare(distill.build_config(args))
    return prepare(teacher.build_config(args))


def check_space(space: Mapping[str, Domain], base: Any, args: argparse.Namespace) -> None:
    """Every value a magnification or batch-size domain can take must work on the dataset."""
    from resdistill.data import DatasetInfo, steps_per_epoch
    from sharding.magnification import Magnification

    info = DatasetInfo.from_json(base.data.url, base.plan.dataset)
    for name in ("student_mag", "mag"):
        dom = space.get(name)
        if dom is None:
            continue
        if dom.kind not in ("choice", "grid", "fixed"):
            raise UsageError(f"search space {name!r}: use choice/grid of magnifications")
        for value in dom.values:
            try:
                mag = info.resolve_mag(str(value))
            except ValueError as exc:
                raise UsageError(f"search space {name!r}: {exc}") from None
            if name == "student_mag":
                high = Magnification.parse(base.teacher.mag).power
                if Magnification.parse(mag).power > high:
                    raise UsageError(
                        f"search space 'student_mag': {mag} is above the teacher's "
                        f"{base.teacher.mag}"
                    )
    dom = space.get("batch_size")
    if dom is not None:
        sizes = dom.values if dom.kind != "randint" else dom.values[:1]
        for size in sizes:
            if not isinstance(size, int) or size < 1:
                raise UsageError(f"search space 'batch_size': {size!r} is not a positive integer")
            if args.steps_per_epoch is None:
                try:
                    steps_per_epoch(base.plan.n_train, args.workers, size)
                except ValueError as exc:
                    raise UsageError(f"search space 'batch_size': {exc}") from None


# --------------------------------------------------------------------------------------------------
# Tuner
# --------------------------------------------------------------------------------------------------


def make_scheduler(args: argparse.Namespace, space: Mapping[str, Domain]) -> Any:
    """ASHA (``time_attr="epoch"``, ``max_t=--epochs``), PBT (``time_attr="epoch"``, mutations
    of the :data:`PBT_MUTABLE` entries of the space that are not fixed) or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if args.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=args.epochs,
            grace_period=min(args.grace_period, args.epochs),
            reduction_factor=args.reduction_factor,
        )
    if args.scheduler == "pbt":
        mutations = {
            k: d.to_tune()
            for k, d in space.items()
            if k in PBT_MUTABLE and d.kind in ("loguniform", "uniform", "choice")
        }
        if not mutations:
            raise UsageError(
                "--scheduler pbt needs a non-fixed domain for one of " + ", ".join(PBT_MUTABLE)
            )
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=args.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=args.pbt_quantile,
            synch=args.pbt_synch,
        )
    return FIFOScheduler()


def default_concurrency(args: argparse.Namespace) -> int:
    """Trials the cluster's current CPUs (and GPUs) hold: ``floor(CPU / (trial_cpus + workers x
    cpus_per_worker))``, and ``floor(GPU / workers)`` with ``--gpu``; at least 1."""
    import ray

    res = ray.cluster_resources()
    per_trial = args.trial_cpus + args.workers * args.cpus_per_worker
    n = int(res.get("CPU", 1) // per_trial) if per_trial > 0 else args.num_samples
    if args.gpu:
        n = min(n, int(res.get("GPU", 0) // args.workers))
    return max(1, n)


def make_callbacks() -> list[Any]:
    """A Tune callback freeing the Train placement group a stopped or restarted trial leaves
    behind (see :func:`resdistill.tune_worker.free_placement_group`)."""
    from ray import tune

    from resdistill.tune_worker import PLACEMENT_GROUP_KEY, free_placement_group

    class FreePlacementGroups(tune.Callback):
        def _free(self, trial: Any) -> None:
            with contextlib.suppress(Exception):
                free_placement_group((trial.last_result or {}).get(PLACEMENT_GROUP_KEY))

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._free(trial)  # a restart (PBT exploit, retry): the previous run's group

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._free(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._free(trial)

    return [FreePlacementGroups()]


def make_trainable(base: Any, args: argparse.Namespace, name: str) -> Any:
    """``trial_function`` with the fixed config and run options bound (``tune.with_parameters``)
    and each trial's own actor sized ``--trial-cpus`` (its Train workers ask for theirs)."""
    from ray import tune

    from resdistill.tune_worker import trial_function

    opts = {
        "storage": args.storage,
        "experiment": name,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "gpu": bool(args.gpu),
        "max_failures": args.max_failures,
        "keep": args.keep,
        "metric": args.metric,
        "mode": args.mode,
        "fixed_steps": args.steps_per_epoch is not None,
    }
    fn = tune.with_parameters(trial_function, base=base, opts=opts)
    return tune.with_resources(fn, {"CPU": float(args.trial_cpus)})


def make_tuner(args: argparse.Namespace, base: Any, space: Mapping[str, Domain], name: str) -> Any:
    """A new ``Tuner``, or ``Tuner.restore`` of ``<storage>/<name>`` with ``--resume`` (when it
    exists: unfinished and errored trials continue from their latest checkpoint)."""
    from ray import tune

    from resdistill.train.runner import storage_for

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
        search_alg=_seeded_search(args.tune_seed),
    )
    run_config = tune.RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=args.trial_retries),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=trial_checkpoints_kept(args)),
        verbose=args.verbose,
        callbacks=make_callbacks(),
    )
    param_space = {k: d.to_tune() for k, d in space.items()}
    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config, run_config=run_config
    ), False


def trial_checkpoints_kept(args: argparse.Namespace) -> int:
    """``--keep-trial-checkpoints``, by default 2, or ``2 x interval + 2`` with PBT."""
    if args.keep_trial_checkpoints is not None:
        return max(1, args.keep_trial_checkpoints)
    return 2 * args.perturbation_interval + 2 if args.scheduler == "pbt" else 2


def _seeded_search(seed: int | None) -> Any:
    if seed is None:
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One line of the final table."""

    trial: str
    status: str
    config: dict[str, Any]
    epochs: int
    last: float | None
    best: float | None
    best_epoch: int | None
    checkpoint: str | None


@dataclass
class TuneSummary:
    """What a finished tuning run printed and wrote (``--best-json``)."""

    name: str
    url: str
    metric: str
    mode: str
    trials: list[TrialRow]
    best: dict[str, Any] | None
    resumed: bool
    elapsed_s: float


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


_TRIAL_DIR = re.compile(r"_([0-9a-f]{5}_\d{5})_\d+_")


def trial_id_of(path: str) -> str:
    """The Tune trial id in a trial folder's name (``<trainable>_<id>_<index>_<tag>_<date>``,
    e.g. ``trial_function_96532_00001_1_lr=...`` -> ``96532_00001``), else the folder name.

    Not ``result.metrics["trial_id"]``: after a PBT exploit that leaves nothing to train, Tune
    repeats the donor's last result (with the donor's id) as the trial's final one.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    match = _TRIAL_DIR.search(name)
    return match.group(1) if match else name


def summarize(grid: Any, args: argparse.Namespace, name: str, space: Mapping[str, Domain],
              *, resumed: bool, elapsed_s: float) -> TuneSummary:  # fmt: skip
    """Rows per trial (best by ``--metric`` over every reported epoch) and the best trial's best
    kept Tune checkpoint (a full copy of the Train checkpoint: ``model.pt``, ``trainer.pt``)."""
    from resdistill.checkpoint import checkpoint_url
    from resdistill.train.runner import run_url

    sign = 1.0 if args.mode == "max" else -1.0
    rows: list[TrialRow] = []
    best: dict[str, Any] | None = None
    best_key: float | None = None
    for result in grid:
        metrics = result.metrics or {}
        trial = trial_id_of(result.path)
        df = result.metrics_dataframe
        best_val = best_epoch = None
        if df is not None and args.metric in df and len(df):
            vals = df[args.metric].astype(float)
            if vals.notna().any():
                idx = (vals * sign).idxmax()
                best_val = float(vals[idx])
                best_epoch = int(df["epoch"][idx]) if "epoch" in df else None
        ckpt = None
        with contextlib.suppress(Exception):  # no checkpoint kept
            ckpt = result.get_best_checkpoint(args.metric, args.mode)
        ckpt = ckpt or result.checkpoint
        epochs = int(metrics.get("epoch", 0) or 0)
        status = "error" if result.error else ("done" if epochs >= args.epochs else "stopped")
        config = {k: result.config.get(k) for k in space if k in (result.config or {})}
        row = TrialRow(trial, status, config, epochs, _num(metrics.get(args.metric)), best_val,
                       best_epoch, checkpoint_url(ckpt))  # fmt: skip
        rows.append(row)
        if (
            best_val is not None
            and row.checkpoint
            and (best_key is None or sign * best_val > best_key)
        ):
            best_key = sign * best_val
            ckpt_metrics = _checkpoint_metrics(result, ckpt)
            best = {
                "checkpoint": row.checkpoint,
                "config": dict(result.config or {}),
                "metric": args.metric,
                "mode": args.mode,
                "value": _num(ckpt_metrics.get(args.metric, best_val)),
                "epoch": ckpt_metrics.get("epoch", best_epoch),
                "trial": trial,
                "best_value": best_val,
                "stage": "teacher" if args.teacher_mode else "distill",
                "run": run_url(args.storage, name),
            }
    rows.sort(key=lambda r: (r.best is None, -sign * (r.best or 0.0)))
    return TuneSummary(name, run_url(args.storage, name), args.metric, args.mode, rows, best,
                       resumed, elapsed_s)  # fmt: skip


def _checkpoint_metrics(result: Any, ckpt: Any) -> dict[str, Any]:
    for c, m in result.best_checkpoints or []:
        if ckpt is not None and c.path == ckpt.path:
            return dict(m)
    return {}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(summary: TuneSummary, space: Mapping[str, Domain], console: Any = None) -> None:
    """A rich table of trials (best first) and the best configuration."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=f"tuning run {summary.name}", header_style="bold")
    for col in (
        "trial",
        "status",
        *space,
        "epochs",
        f"last {summary.metric}",
        f"best {summary.metric}",
    ):
        table.add_column(col)
    for row in summary.trials:
        table.add_row(row.trial, row.status, *(_fmt(row.config.get(k)) for k in space),
                      str(row.epochs), _fmt(row.last), _fmt(row.best))  # fmt: skip
    console.print(table)
    console.print(f"run:             {summary.url}")
    if summary.best is None:
        console.print("[yellow]no trial reported the metric with a checkpoint[/]")
        return
    b = summary.best
    cfg = ", ".join(f"{k}={_fmt(b['config'].get(k))}" for k in space if k in b["config"])
    console.print(
        f"best trial:      {b['trial']} ({summary.metric} {_fmt(b['value'])} at epoch {b['epoch']})"
    )
    console.print(f"best config:     {cfg}")
    console.print(f"best checkpoint: {b['checkpoint']}")


def write_best_json(path: str, best: Mapping[str, Any]) -> None:
    """``{"checkpoint", "config", "metric", "value", ...}`` to a local file or ``s3://`` URL."""
    from sharding.storage import is_remote, open_storage

    text = json.dumps(dict(best), indent=1, default=str) + "\n"
    if is_remote(path):
        parent, _, leaf = path.rstrip("/").rpartition("/")
        open_storage(parent).write_bytes(leaf, text.encode())
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def tune_run(args: argparse.Namespace) -> TuneSummary:
    """Tune as ``args`` say: print the space, run the trials, print the table, write
    ``--best-json``; return the :class:`TuneSummary`. Raises :class:`UsageError`."""
    from rich.console import Console

    from resdistill.train.runner import run_url
    from sharding.ray_cluster import ray_init

    check_args(args)
    console = Console(highlight=False)
    stage = "teacher" if args.teacher_mode else "distill"
    base = stage_config(args)
    space = build_space(args, stage)
    check_space(space, base, args)
    make_scheduler(args, space)  # its errors before any Ray work
    name = args.name or f"tune-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(
        f"[bold]tune {stage}[/] on {base.data.url}: {args.num_samples} samples, scheduler "
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


def run(args: argparse.Namespace) -> int:
    """``resdistill tune``: 0 ok, 1 no trial produced a checkpoint, 2 bad options or data."""
    try:
        summary = tune_run(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.best is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.tune``; returns the exit status."""
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
