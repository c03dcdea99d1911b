"""The Ray side of :mod:`resdistill.tune` (kept apart so ``resdistill --help`` imports no Ray).

One Tune trial = one call of :func:`trial_function` (a Tune *function* trainable, run in the
trial's actor). It builds the stage's worker config from the tuned hyperparameters, starts a
Ray Train V2 ``TorchTrainer`` running :func:`train_worker` (the teacher's or the distillation
worker), and forwards every epoch to Tune:

* the Train controller calls :class:`ForwardToTrial` (a ``TuneReportCallback``) after each
  ``ray.train.report``: rank 0's metrics (already all-reduced over the ranks by
  :func:`resdistill.train.validate.evaluate`) plus the persisted Train checkpoint's path go into a
  Ray queue owned by the trial;
* the trial function takes them off the queue and calls ``ray.tune.report(metrics,
  checkpoint=...)``, so Tune persists the checkpoint in the trial's folder. Schedulers see the
  metric per epoch (ASHA stops a trial by ending its actor; the Train controller and workers it
  owns end with it), and PBT can copy a trial's latest checkpoint to another trial.

Resume: ``ray.tune.get_checkpoint()`` is the trial's own latest checkpoint after
``Tuner.restore`` or a retry, or the donor's checkpoint after a PBT exploit. Ray Train V2 has no
``resume_from_checkpoint`` any more (its trainer resumes from its own ``storage_path/name``), so
every start of a trial is a NEW Train run (``<trial id>-<8 hex>``) whose workers get that
checkpoint as ``start_checkpoint`` (:func:`resdistill.train.worker.loop_config`): weights,
optimizer state and :class:`~resdistill.train.loop.TrainState` (epoch, step, history) continue
from it, while the
trial's own (possibly mutated) hyperparameters apply from the next step on.
"""

from __future__ import annotations

import contextlib
import queue as pyqueue
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

#: metric keys added by the trial function to every result it reports to Tune
TRAIN_CHECKPOINT_KEY = "train_checkpoint"
RESUMED_FROM_KEY = "resumed_from"
TRAIN_RUN_KEY = "train_run"


class ForwardToTrial(TuneReportCallback):
    """``TuneReportCallback`` writing into a queue the trial function reads (not the session's
    own queue, which would hand Tune the metrics without the checkpoint).

    Each item: rank 0's metrics of one ``ray.train.report`` plus ``checkpoint_path`` (the
    checkpoint's path on the run storage's filesystem) when the report carried a checkpoint.
    """

    def __init__(self, items: Any) -> None:  # noqa: D107 - no super(): not the session queue
        self._training_actor_item_queue = items


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train function of a tuning trial: :func:`resdistill.train.worker.train_worker`
    (``loop_config["start_checkpoint"]`` is where the trial continues from, when set)."""
    from resdistill.train.worker import train_worker as run_worker

    run_worker(loop_config)


PLACEMENT_GROUP_KEY = "placement_group"


class WorkerFunction:
    """``train_worker`` bound to the trial's queue: rank 0 first sends the hex id of the
    placement group holding the Train workers, so the driver can free it should the trial's
    actor be killed (an ASHA stop, a PBT exploit) without the Train controller's clean-up."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __call__(self, config: dict[str, Any]) -> None:
        import ray.train
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        if pg is not None and ray.train.get_context().get_world_rank() == 0:
            self.items.put({PLACEMENT_GROUP_KEY: pg.id.hex()})
        train_worker(config)


def apply_hparams(base: Any, hparams: Mapping[str, Any], opts: Mapping[str, Any]) -> Any:
    """The :class:`~resdistill.config.TrainConfig` of one trial: the planned ``base`` with
    ``hparams`` set by name (:meth:`TrainConfig.with_values`).

    ``batch_size`` also sets, unless the steps were fixed (``opts["fixed_steps"]``), the planned
    ``steps_per_epoch = n_train // (workers x batch)``; ``student_mag`` (distillation) or ``mag``
    (teacher) picks the magnification. Raises ``ValueError`` for a setting the stage cannot tune
    or a value the dataset cannot serve.
    """
    from dataclasses import replace

    from resdistill.data import DatasetInfo, steps_per_epoch

    values = dict(hparams)
    mag = values.pop("student_mag" if base.stage != "teacher" else "mag", None)
    if mag is not None:
        info = DatasetInfo.from_json(base.data.url, base.plan.dataset)
        values["mag"] = info.resolve_mag(str(mag))
    try:
        cfg = base.with_values(values)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    if "batch_size" in values and not opts.get("fixed_steps"):
        steps = steps_per_epoch(cfg.plan.n_train, opts["workers"], cfg.data.batch_size)
        cfg = replace(cfg, plan=replace(cfg.plan, steps_per_epoch=steps))
    return cfg


def make_trainer(
    config: dict[str, Any], *, name: str, storage: str, opts: Mapping[str, Any], items: Any
) -> Any:
    """The trial's ``TorchTrainer`` (:func:`resdistill.train.runner.make_trainer`) running
    :class:`WorkerFunction`, plus the :class:`ForwardToTrial` callback feeding ``items``."""
    from resdistill.train.runner import make_trainer as train_trainer

    return train_trainer(WorkerFunction(items), config, name=name, storage=storage,
                         workers=opts["workers"], gpu=bool(opts["gpu"]),
                         cpus_per_worker=opts["cpus_per_worker"],
                         max_failures=opts["max_failures"], metric=opts["metric"],
                         mode=opts["mode"], keep=opts["keep"],
                         callbacks=[ForwardToTrial(items)])  # fmt: skip


def free_placement_group(hex_id: str | None) -> bool:
    """Remove placement group ``hex_id`` if it still holds resources; True when removed.

    Ray Train V2 frees its workers' placement group when the controller ends cleanly or, via its
    detached ``PlacementGroupCleaner``, when the controller dies - which needs the State API
    (the dashboard); without it a killed trial's reservation would stay for the whole job.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    if not hex_id:
        return False
    info = placement_group_table().get(hex_id)
    if not info or info.get("state") == "REMOVED":
        return False
    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
    return True


def trial_function(hparams: dict[str, Any], *, base: Any, opts: dict[str, Any]) -> None:
    """A Tune function trainable: one Ray Train run per (re)start of the trial, see module doc.

    ``opts``: ``storage`` (run storage URL), ``experiment`` (the tuning run's name), ``workers``,
    ``cpus_per_worker``, ``gpu``, ``max_failures``, ``keep``, ``metric``, ``mode``,
    ``fixed_steps``.
    """
    import ray.tune
    from ray.train import Checkpoint
    from ray.util.queue import Queue

    from resdistill.checkpoint import checkpoint_url
    from resdistill.train.runner import run_url, storage_for
    from resdistill.train.worker import loop_config

    start = ray.tune.get_checkpoint()
    start_url = checkpoint_url(start) if start is not None else None
    config = loop_config(apply_hparams(base, hparams, opts), start_url)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{trial_id}-{uuid.uuid4().hex[:8]}"
    train_storage = f"{run_url(opts['storage'], opts['experiment'])}/_train"

    items: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make_trainer(config, name=run_name, storage=train_storage, opts=opts, items=items)
    _, fs = storage_for(train_storage)

    outcome: dict[str, Any] = {}
    placement_group = ""

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"fit-{run_name}", daemon=True)
    thread.start()
    try:
        while True:
            alive = thread.is_alive()
            try:
                item = items.get(block=True, timeout=0.5)
            except Exception as exc:  # ray.util.queue.Empty
                if type(exc).__name__ != "Empty" and not isinstance(exc, pyqueue.Empty):
                    raise
                if not alive:
                    break
                continue
            metrics = dict(item)
            if set(metrics) == {PLACEMENT_GROUP_KEY}:
                placement_group = metrics[PLACEMENT_GROUP_KEY]
                continue
            metrics[PLACEMENT_GROUP_KEY] = placement_group
            path = metrics.pop("checkpoint_path", None)
            checkpoint = Checkpoint(path, filesystem=fs) if path else None
            metrics[TRAIN_CHECKPOINT_KEY] = checkpoint_url(checkpoint) or ""
            metrics[RESUMED_FROM_KEY] = start_url or ""
            metrics[TRAIN_RUN_KEY] = run_name
            ray.tune.report(metrics, checkpoint=checkpoint)
        thread.join()
    finally:
        with contextlib.suppress(Exception):  # the queue actor may already be gone
            items.shutdown(force=True)
    if "error" in outcome:
        raise outcome["error"]
