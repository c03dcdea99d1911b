"""Experiment tracking (``--tracking``): every epoch of ``teacher``, ``distill``, ``tune`` and
``study`` recorded in TensorBoard (the default), MLflow or Weights & Biases.

What a record holds: params, the run's resolved config flattened (``optim.lr``,
``data.batch_size``, ..., and the planned sample and step counts); tags (stage, command, run
folder, dataset; the trial, and for the study the cell); one value per epoch of every metric
the run reports (``train_loss``, ``val_*``, ``val_distill_loss`` - the label-free selection
score -, ``lr``, ``best_epoch``, throughput), step = epoch; and the best checkpoint's URL.
Only rank 0's all-reduced report is recorded, so a run of N workers leaves one record.

* :mod:`resdistill.tracking.spec` - ``--tracking KIND[:TARGET]`` resolved (where, which store);
* :mod:`resdistill.tracking.backends` - one :class:`TrackedRun` per kind;
* :mod:`resdistill.tracking.hooks` - the Ray Train and Ray Tune callbacks that feed them (they
  import Ray: import that module where Ray is already loaded).
"""

from __future__ import annotations

from collections.abc import Mapping

from resdistill.config import TrainConfig
from resdistill.tracking.backends import RunInfo, TrackedRun, tracked_run
from resdistill.tracking.spec import Tracking, config_params, resolve

__all__ = ["RunInfo", "TrackedRun", "Tracking", "config_params", "resolve", "tracked_run",
           "training_run"]  # fmt: skip


def training_run(cfg: TrainConfig, folder: str, *, command: str,
                 tags: Mapping[str, str] | None = None) -> TrackedRun:  # fmt: skip
    """The (not yet started) record of the named, planned training run ``cfg`` whose folder is
    ``folder``: named for the run, keyed by its folder, params from ``cfg``. Raises
    :class:`~resdistill.errors.UsageError` for a ``--tracking`` that cannot work here."""
    tracking = resolve(cfg.run.tracking, storage=cfg.run.storage, name=cfg.run.name,
                       folder=folder)  # fmt: skip
    base_tags = {"resdistill.stage": cfg.stage, "resdistill.command": command,
                 "resdistill.run": folder, "resdistill.dataset": cfg.data.url}  # fmt: skip
    info = RunInfo(
        folder, cfg.run.name, config_params(cfg.to_dict()), {**base_tags, **(tags or {})}
    )
    return tracked_run(tracking, info)
