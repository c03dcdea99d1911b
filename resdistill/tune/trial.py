"""One Tune trial: a Tune function trainable that runs one Ray Train run per (re)start.

:func:`trial_function` runs in the trial's actor. It builds the trial's worker config from its
hyperparameters (:mod:`resdistill.tune.stage`), starts a Ray Train ``TorchTrainer``
(:func:`resdistill.train.runner.make_trainer`) and forwards every epoch to Tune:

* the Train controller calls :class:`ForwardToTrial` after each ``ray.train.report``: rank 0's
  metrics (already all-reduced over the ranks) plus the persisted Train checkpoint's path go
  into a Ray queue owned by the trial;
* the trial function takes them off the queue and calls ``ray.tune.report(metrics,
  checkpoint=...)``, so Tune persists the checkpoint in the trial's folder. Schedulers see the
  metric per epoch (ASHA stops a trial by ending its actor; the Train controller and workers it
  owns end with it), and PBT can copy a trial's latest checkpoint to another trial.

Resume: ``ray.tune.get_checkpoint()`` is the trial's own latest checkpoint after
``Tuner.restore`` or a retry, or the donor's after a PBT exploit. Ray Train V2 resumes only a
run of the same ``storage_path/name``, so every start of a trial is a NEW Train run
(``<trial id>-<8 hex>``, under ``<storage>/<experiment>/_train``) whose workers load that
checkpoint: weights, optimiser state and training state (epoch, step, history) continue from
it, while the trial's own (possibly mutated) hyperparameters apply from the next step on.

Placement groups: Ray Train V2 frees its workers' placement group when the controller ends
cleanly or, through its detached cleaner, when the controller dies - which needs the State API
(the dashboard). A trial killed by its scheduler could leave its reservation for the whole job,
so rank 0 sends the group's id through the queue, every result carries it
(:data:`PLACEMENT_GROUP_KEY`) and :class:`FreePlacementGroups` frees it when the trial
restarts or ends.

Failures: a trial's Train run never restarts its own worker group (``max_failures=0``); Tune
restarts the trial from its latest checkpoint instead (the tuning run's ``FailureConfig``). A
trial Tune stops ends its actor, and the Train controller it owns ends with it, but not at once:
one allowed to retry could see its workers go (the freed group) and reserve a new group in that
moment, which then holds its CPUs for the rest of the job and starves the next trials.
"""

from __future__ import annotations

import contextlib
import os
import queue as pyqueue
import threading
import uuid
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from resdistill.checkpoint import checkpoint_url
from resdistill.config import TrainConfig
from resdistill.train.runner import make_trainer, run_url, storage_for
from resdistill.tune.stage import apply_hparams, loop_config, train_function

#: Keys the trial function adds to every result it reports to Tune.
TRAIN_CHECKPOINT_KEY = "train_checkpoint"
RESUMED_FROM_KEY = "resumed_from"
TRAIN_RUN_KEY = "train_run"
PLACEMENT_GROUP_KEY = "placement_group"
#: Keys of a trial's options passed to :func:`resdistill.train.runner.make_trainer`.
TRAINER_OPTIONS = ("workers", "cpus_per_worker", "gpu", "keep", "metric", "mode")


#: Tune forces an experiment snapshot whenever a trial has saved ``num_to_keep`` checkpoints and
#: warns each time two come within 5 s: with one kept checkpoint and short epochs that is a
#: multi-line warning every few seconds that buries the progress. The snapshots stay; only the
#: warning goes.
QUIET_TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def quiet_tune() -> None:
    """Set :data:`QUIET_TUNE_ENV` in this driver unless the user set those variables."""
    for key, value in QUIET_TUNE_ENV.items():
        os.environ.setdefault(key, value)


class ForwardToTrial(TuneReportCallback):
    """``TuneReportCallback`` writing into a queue the trial function reads (not the session's
    own queue, which would hand Tune the metrics without the checkpoint).

    Each item: rank 0's metrics of one ``ray.train.report`` plus ``checkpoint_path`` (the
    checkpoint's path on the run storage's filesystem) when the report carried a checkpoint.
    """

    def __init__(self, items: Any) -> None:  # noqa: D107 - no super(): not the session queue
        self._training_actor_item_queue = items


class WorkerFunction:
    """:func:`resdistill.tune.stage.train_function` bound to the trial's queue: rank 0 first
    sends the hex id of the placement group holding the Train workers."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __call__(self, config: dict[str, Any]) -> None:
        import ray.train
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        if pg is not None and ray.train.get_context().get_world_rank() == 0:
            self.items.put({PLACEMENT_GROUP_KEY: pg.id.hex()})
        train_function(config)


def free_placement_group(hex_id: str | None) -> bool:
    """Remove placement group ``hex_id`` if it still holds resources; True when removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    if not hex_id:
        return False
    info = placement_group_table().get(hex_id)
    if not info or info.get("state") == "REMOVED":
        return False
    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
    return True


class FreePlacementGroups(tune.Callback):
    """Frees the Train placement group a restarted (PBT exploit, retry), stopped or failed trial
    leaves behind (the one its last result names)."""

    def _free(self, trial: Any) -> None:
        with contextlib.suppress(Exception):
            free_placement_group((trial.last_result or {}).get(PLACEMENT_GROUP_KEY))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)  # a restart: the previous run's group

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._free(trial)


def trial_function(hparams: dict[str, Any], *, base: TrainConfig, opts: dict[str, Any]) -> None:
    """A Tune function trainable: one Ray Train run per (re)start of the trial, see module doc.

    ``base``: the stage's worker config (:func:`resdistill.tune.stage.base_config`). ``opts``:
    ``storage`` (run storage URL), ``experiment`` (the tuning run's name), ``fixed_steps``
    (``--steps-per-epoch`` was given) and the :data:`TRAINER_OPTIONS`.
    """
    import ray.tune

    start_url = checkpoint_url(ray.tune.get_checkpoint())
    run_in_trial(apply_hparams(base, hparams, opts), opts, start_url)


def run_in_trial(cfg: TrainConfig, opts: dict[str, Any], start_url: str | None) -> None:
    """Run ``cfg`` as one Ray Train run inside the current Tune trial, started from
    ``start_url`` (the trial's own latest or a donor's checkpoint), every epoch forwarded to
    Tune with its checkpoint (see the module docstring). ``opts`` as :func:`trial_function`'s;
    ``resdistill study`` runs its grid cells through it too."""
    import ray.tune
    from ray.train import Checkpoint
    from ray.util.queue import Queue

    config = loop_config(cfg, start_url)
    run_name = f"{ray.tune.get_context().get_trial_id()}-{uuid.uuid4().hex[:8]}"
    train_storage = f"{run_url(opts['storage'], opts['experiment'])}/_train"

    items: Any = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = make_trainer(
        WorkerFunction(items),
        config,
        name=run_name,
        storage=train_storage,
        callbacks=[ForwardToTrial(items)],
        max_failures=0,  # Tune restarts the trial instead: see the module docstring
        **{k: opts[k] for k in TRAINER_OPTIONS},
    )
    _, fs = storage_for(train_storage)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"fit-{run_name}", daemon=True)
    thread.start()
    placement_group = ""
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
            path = metrics.pop("checkpoint_path", None)
            checkpoint = Checkpoint(path, filesystem=fs) if path else None
            metrics[PLACEMENT_GROUP_KEY] = placement_group
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
