"""Every place tuning touches the training side, in one module.

A tuning run needs five things from the training stages, and only this module provides them:

* :func:`base_config` - the planned :class:`~resdistill.config.TrainConfig` every trial starts
  from, checked against the dataset (:func:`resdistill.train.preflight.prepare`);
* :func:`apply_hparams` - one trial's config: the base with the tuned settings set by name
  (:meth:`~resdistill.config.TrainConfig.with_values`);
* :func:`loop_config` - what the trial's Ray Train workers receive (config + start checkpoint);
* :func:`train_function` - the Ray Train function those workers run, the same one
  ``resdistill teacher`` and ``distill`` run (:func:`resdistill.train.worker.train_worker`);
* :func:`ranking` - the rule that ranks trials and their checkpoints: the trials' own
  checkpoint rule (:func:`resdistill.train.selection.selection`).

Which settings are tunable, and which of them PBT may perturb, comes from
:func:`resdistill.config.tunable` (:func:`settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from resdistill.config import STAGE_DISTILL, STAGE_TEACHER, TrainConfig, Tunable, tunable
from resdistill.train.selection import Selection, selection
from resdistill.tune.config import TuneConfig

#: Names a tuning run accepts besides :func:`resdistill.config.tunable`'s: a student's
#: magnification keeps its command-line name (``--student-mag``).
ALIASES = {"student_mag": "mag"}


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


def base_config(cfg: TuneConfig) -> TrainConfig:
    """The planned config every trial starts from (:meth:`TuneConfig.trial_config` through
    :func:`resdistill.train.preflight.prepare`: the training commands' checks and one-line
    errors)."""
    from resdistill.train.preflight import prepare

    return prepare(cfg.trial_config())


def ranking(cfg: TuneConfig, base: TrainConfig | None = None) -> Selection:
    """What ranks trials (the schedulers, the table, the best trial) and their checkpoints: the
    rule each trial keeps its own checkpoint by, ``selection`` of ``base`` (the planned trial
    config, which counts the labelled validation slides) or of :meth:`TuneConfig.trial_config`
    (count 0). One rule for both, so choosing among trials reads no more labels than choosing
    an epoch: none for distillation unless ``--select metric`` (a search that picks by labels
    spends them as surely as training does: Oliver et al. 2018)."""
    return selection(base if base is not None else cfg.trial_config())


def data_url(config: TrainConfig) -> str:
    """The dataset root a config reads."""
    return config.data.url


def apply_hparams(
    base: TrainConfig, hparams: Mapping[str, Any], opts: Mapping[str, Any]
) -> TrainConfig:
    """The config of one trial: ``base`` with ``hparams`` set by name.

    Names are :func:`settings`'s for the base's stage, values cast to their field's type by
    :meth:`~resdistill.config.TrainConfig.with_values`. ``mag`` (``student_mag``) is resolved
    against the dataset, never above a distilling teacher's; ``batch_size`` also sets, unless
    the steps were fixed (``opts["fixed_steps"]``), the planned ``steps_per_epoch = n_train //
    (opts["workers"] x batch_size)``. Raises ``ValueError`` for a name the stage cannot tune or
    a value the dataset cannot serve.
    """
    from resdistill.data import DatasetInfo, steps_per_epoch
    from sharding.magnification import Magnification

    assert base.plan is not None, "apply_hparams takes a planned config (base_config)"
    known = settings(base.stage)
    values: dict[str, Any] = {}
    for key, value in hparams.items():
        if key not in known:
            raise ValueError(f"cannot tune {key!r} for the {base.stage} stage")
        values[canonical(key)] = value
    if "mag" in values:
        mag = DatasetInfo.from_json(base.data.url, base.plan.dataset).resolve_mag(values["mag"])
        if (
            base.stage == STAGE_DISTILL
            and base.teacher is not None
            and (Magnification.parse(mag).power > Magnification.parse(base.teacher.mag).power)
        ):
            raise ValueError(f"{mag} is above the teacher's {base.teacher.mag}")
        values["mag"] = mag
    try:
        cfg = base.with_values(values)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    if "batch_size" in values and not opts.get("fixed_steps"):
        steps = steps_per_epoch(cfg.plan.n_train, opts["workers"], cfg.data.batch_size)
        cfg = replace(cfg, plan=replace(cfg.plan, steps_per_epoch=steps))
    return cfg


def loop_config(config: TrainConfig, start_checkpoint: str | None) -> dict[str, Any]:
    """What :func:`train_function` receives: the trial's config, and the checkpoint folder (the
    trial's own latest, or a PBT donor's) its first epoch continues from."""
    from resdistill.train.worker import loop_config as worker_loop_config

    return worker_loop_config(config, start_checkpoint=start_checkpoint)


def train_function(config: dict[str, Any]) -> None:
    """Ray Train function of a trial: :func:`resdistill.train.worker.train_worker`, started from
    ``config["start_checkpoint"]`` when set and the Train run has no checkpoint of its own."""
    from resdistill.train.worker import train_worker

    train_worker(config)
