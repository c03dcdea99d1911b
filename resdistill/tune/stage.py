"""Every place tuning touches the training side, in one module.

A tuning run needs five things from the training stages, and only this module provides them:

* :func:`add_training_arguments` - the training options (the fixed part of every trial);
* :func:`base_config` - the worker config built from them and checked against the dataset;
* :func:`apply_hparams` - one trial's worker config: the base with the tuned settings set;
* :func:`loop_config` - what the trial's Ray Train workers receive (config + start checkpoint);
* :func:`train_function` - the Ray Train function those workers run.

Which settings are tunable, and which of them PBT may perturb, comes from
:func:`resdistill.config.tunable` (:func:`settings`). The worker config is today's flat dict of
:func:`resdistill.distill.build_config` / :func:`resdistill.teacher.build_config`, run by those
stages' own workers; :func:`apply_hparams` is the one place that knows where each tunable
setting sits in that dict.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable, Mapping
from typing import Any

from resdistill.config import (
    STAGE_DISTILL,
    STAGE_SUPERVISED,
    STAGE_TEACHER,
    DataConfig,
    TrainConfig,
    Tunable,
    tunable,
)
from resdistill.errors import UsageError

#: Names a tuning run accepts besides :func:`resdistill.config.tunable`'s: a student's
#: magnification keeps its command-line name (``--student-mag``).
ALIASES = {"student_mag": "mag"}
#: Options only some stages need: optional in the tune parser, required by :func:`base_config`.
PER_STAGE_OPTIONS = frozenset({"--student-mag", "--teacher"})


def stage_of(args: argparse.Namespace) -> str:
    """The stage a tuning run's trials train: ``teacher`` (``--teacher-mode``), ``supervised``
    (the low-magnification baseline, ``--supervised``) or ``distill``."""
    if args.teacher_mode:
        return STAGE_TEACHER
    return STAGE_SUPERVISED if args.supervised else STAGE_DISTILL


def settings(stage: str) -> dict[str, Tunable]:
    """The names a search space may use for ``stage``: :func:`resdistill.config.tunable`'s, plus
    :data:`ALIASES` for a student's stages."""
    out = dict(tunable(stage))
    if stage != STAGE_TEACHER:
        out.update({alias: out[name] for alias, name in ALIASES.items() if name in out})
    return out


def canonical(name: str) -> str:
    """The :func:`resdistill.config.tunable` name of ``name`` (an alias or the name itself)."""
    return ALIASES.get(name, name)


class _OptionalFlags:
    """An argparse parser or group whose ``add_argument`` leaves ``flags`` optional."""

    def __init__(self, target: Any, flags: Iterable[str]) -> None:
        self._target, self._flags = target, frozenset(flags)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _OptionalFlags:
        return _OptionalFlags(self._target.add_argument_group(*args, **kwargs), self._flags)

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        if self._flags.intersection(names):
            kwargs["required"] = False
        return self._target.add_argument(*names, **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """``resdistill distill``'s options, with :data:`PER_STAGE_OPTIONS` optional (teacher mode
    needs neither; :func:`base_config` asks for them when distilling)."""
    from resdistill import distill

    distill.add_arguments(_OptionalFlags(parser, PER_STAGE_OPTIONS))  # type: ignore[arg-type]


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The fixed worker config every trial starts from: :func:`resdistill.teacher.build_config`
    with ``--teacher-mode``, else :func:`resdistill.distill.build_config` (their checks; their
    one-line errors raised as :class:`UsageError`)."""
    from resdistill import distill, teacher

    try:
        if args.teacher_mode:
            targs = _with_teacher_defaults(args, teacher.build_parser())
            teacher.check_args(targs)
            return teacher.build_config(targs)
        if not args.student_mag:
            raise UsageError(
                "--student-mag is required (the trials' default; --space student_mag=... tunes it)"
            )
        distill.check_args(args)
        return distill.build_config(args)
    except (distill.UsageError, teacher.UsageError) as exc:
        raise UsageError(str(exc)) from None


def _with_teacher_defaults(
    args: argparse.Namespace, teacher_parser: argparse.ArgumentParser
) -> argparse.Namespace:
    """A copy of ``args`` whose unset (None) options take ``resdistill teacher``'s defaults: its
    ``--arch`` and ``--train-splits`` default to values where distillation's default to None."""
    out = argparse.Namespace(**vars(args))
    for key, value in vars(args).items():
        if value is None:
            setattr(out, key, teacher_parser.get_default(key))
    return out


def data_url(config: Mapping[str, Any]) -> str:
    """The dataset root a worker config reads."""
    return str(config["data"])


def apply_hparams(
    base: Mapping[str, Any], hparams: Mapping[str, Any], opts: Mapping[str, Any]
) -> dict[str, Any]:
    """The worker config of one trial: a copy of ``base`` with ``hparams`` set by name.

    Names are :func:`settings`'s for the base's stage; values are cast as
    :meth:`resdistill.config.TrainConfig.with_values` casts them. Where each lands in the flat
    config: optimiser settings at the top level; loss settings in ``config["loss"]`` (at the
    top level for the teacher); ``batch_size`` sets the per-worker batch and, unless the steps
    were fixed (``opts["fixed_steps"]``), ``steps_per_epoch = n_train // (opts["workers"] x
    batch_size)``; ``mag`` (``student_mag``) is resolved against the dataset and set as the
    teacher's ``mag`` or the student's ``student_mag``, never above a distilling teacher's.
    Raises ``ValueError`` for a name the stage cannot tune or a value the dataset cannot serve.
    """
    from resdistill.data import DatasetInfo, steps_per_epoch
    from sharding.magnification import Magnification

    cfg = copy.deepcopy(dict(base))
    stage = cfg["stage"]
    known = settings(stage)
    for key, raw in hparams.items():
        if key not in known:
            raise ValueError(f"cannot tune {key!r} for the {stage} stage")
        name, section = canonical(key), known[key].section
        value = _typed(stage, name, raw)
        if section == "optim":
            cfg[name] = value
        elif section == "loss":
            (cfg if stage == STAGE_TEACHER else cfg["loss"])[name] = value
        elif name == "batch_size":
            cfg["batch_size"] = value
            if not opts.get("fixed_steps"):
                cfg["steps_per_epoch"] = steps_per_epoch(cfg["n_train"], opts["workers"], value)
        elif name == "mag":
            mag = DatasetInfo.from_json(cfg["data"], cfg["dataset"]).resolve_mag(value)
            if stage == STAGE_TEACHER:
                cfg["mag"] = mag
                continue
            if stage == STAGE_DISTILL and (
                Magnification.parse(mag).power > Magnification.parse(cfg["teacher_mag"]).power
            ):
                raise ValueError(f"{mag} is above the teacher's {cfg['teacher_mag']}")
            cfg["student_mag"] = mag
        else:
            raise ValueError(f"cannot tune {key!r} for the {stage} stage")
    return cfg


def _typed(stage: str, name: str, value: Any) -> Any:
    """``value`` as :meth:`TrainConfig.with_values` stores setting ``name`` (its field's type)."""
    section = tunable(stage)[name].section
    typed = TrainConfig(stage, DataConfig(url="")).with_values({name: value})
    return getattr(getattr(typed, section), name)


def loop_config(config: Mapping[str, Any], start_checkpoint: str | None) -> dict[str, Any]:
    """What :func:`train_function` receives: the trial's worker config, and the checkpoint
    folder (the trial's own latest, or a PBT donor's) its first epoch continues from."""
    return {**config, "start_checkpoint": start_checkpoint}


def train_function(config: dict[str, Any]) -> None:
    """Ray Train function of a trial: the stage's own worker, started from
    ``config["start_checkpoint"]`` when set and the Train run has no checkpoint of its own."""
    from resdistill import train_loop

    train_loop.set_start_checkpoint(config.get("start_checkpoint"))
    if config["stage"] == STAGE_TEACHER:
        from resdistill.teacher import train_worker
    else:
        from resdistill.distill_worker import train_worker
    train_worker(config)
