"""One tracked run per kind: MLflow, TensorBoard, Weights & Biases, behind one small interface.

A :class:`TrackedRun` is built on the driver, where :meth:`~TrackedRun.start` checks the target
(an MLflow run is created or found there, its params logged), and may then be pickled to the
process that logs the epochs (the Ray Train controller, or the Tune driver itself):

* ``log(metrics, step)`` - the epoch's numeric metrics at ``step`` (the epoch);
* ``best(url, epoch, metrics)`` - the checkpoint now best by the run's rule;
* ``end(status)`` - ``FINISHED`` or ``FAILED``; safe to call from either process, and twice.

A rerun of a run (same folder) continues its record: the MLflow run carrying its key tag, the
same TensorBoard folder, the W&B run whose id is that key. The best checkpoint is referenced,
never copied: a tag (and for MLflow a small ``best_checkpoint.json`` artifact) holds its URL,
which ``evaluate``, ``predict`` and ``export`` take as a model; the weights stay in the run
storage (a local folder or ``s3://``) instead of doubling every run's gigabytes in the store.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resdistill.errors import UsageError
from resdistill.tracking.spec import KEY_TAG, Tracking, run_key

#: tags holding the best checkpoint (MLflow tags, W&B summary keys)
BEST_TAG, BEST_EPOCH_TAG = "resdistill.best_checkpoint", "resdistill.best_epoch"
#: the MLflow artifact that references the best checkpoint
BEST_ARTIFACT = "best_checkpoint.json"


@dataclass(frozen=True)
class RunInfo:
    """What a tracked run is: ``url`` (its folder, or ``<tune run>#<trial id>``: its key),
    ``name`` shown in the UI, ``params`` (flattened config), ``tags``."""

    url: str
    name: str
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return run_key(self.url)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The int and float values of ``metrics`` (not bools) as floats."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
            out[k] = float(v.item())
    return out


class TrackedRun:
    """The interface (see the module docstring); the base class tracks nothing."""

    def __init__(self, tracking: Tracking, info: RunInfo) -> None:
        self.tracking, self.info = tracking, info

    def start(self) -> None:
        """On the driver, before any epoch: check the target, create or find the record."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record the numeric ``metrics`` of epoch ``step``."""

    def best(self, url: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Record ``url`` as the run's best checkpoint (chosen at ``epoch``)."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the record: ``FINISHED`` or ``FAILED``."""

    def __getstate__(self) -> dict[str, Any]:
        # live clients, writers and W&B runs stay in the process that made them
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class MlflowRun(TrackedRun):
    """An MLflow run in experiment ``tracking.experiment``, found again by its key tag."""

    run_id: str | None = None

    def _client(self) -> Any:
        client = self.__dict__.get("_mlflow_client")
        if client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves unasked
            from mlflow.tracking import MlflowClient

            client = self._mlflow_client = MlflowClient(tracking_uri=self.tracking.target)
        return client

    def _experiment_id(self, client: Any) -> str:
        name = self.tracking.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=self.tracking.artifacts)
            except Exception:  # created meanwhile by a concurrent run
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        return exp.experiment_id

    def start(self) -> None:
        # a server that does not answer is refused in seconds, not after MLflow's ~4 minutes
        # of retries; the epochs' writes keep MLflow's patience
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # fmt: skip
        unset = [k for k in quick if k not in os.environ]
        os.environ.update({k: quick[k] for k in unset})
        try:
            self._start()
        except UsageError:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--tracking mlflow:{self.tracking.target}: {text}") from None
        finally:
            for k in unset:
                os.environ.pop(k, None)

    def _start(self) -> None:
        from mlflow.entities import Param, RunStatus, RunTag

        client = self._client()
        exp_id = self._experiment_id(client)
        info = self.info
        found = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{info.key}'",
                                   max_results=1)  # fmt: skip
        tags = {**info.tags, KEY_TAG: info.key, "mlflow.runName": info.name}
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            old = run.data.params
        else:
            run = client.create_run(exp_id, run_name=info.name, tags=tags)
            self.run_id, old = run.info.run_id, {}
        # MLflow never changes a logged param: a rerun's changed settings (more --epochs, a
        # PBT-perturbed lr) are recorded as tags "changed.<param>" instead
        params = [Param(k, v[:6000]) for k, v in info.params.items() if k not in old]
        changed = {f"changed.{k}": v[:5000] for k, v in info.params.items()
                   if k in old and old[k] != v[:6000]}  # fmt: skip
        all_tags = [RunTag(k, str(v)) for k, v in {**tags, **changed}.items()]
        for i in range(0, max(len(params), len(all_tags)), 100):  # MLflow's batch limit
            client.log_batch(self.run_id, params=params[i : i + 100], tags=all_tags[i : i + 100])

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        for i in range(0, len(batch), 1000):
            self._client().log_batch(self.run_id, metrics=batch[i : i + 1000])

    def best(self, url: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        client = self._client()
        client.set_tag(self.run_id, BEST_TAG, url)
        client.set_tag(self.run_id, BEST_EPOCH_TAG, str(epoch))
        doc = {"checkpoint": url, "epoch": epoch, "metrics": numeric(metrics)}
        client.log_dict(self.run_id, doc, BEST_ARTIFACT)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        try:
            self._client().set_terminated(self.run_id, status)
        except Exception as exc:  # the run's own outcome matters more than its record's
            print(f"tracking: mlflow could not mark run {self.run_id} {status} ({exc})",
                  file=sys.stderr)  # fmt: skip


class TensorBoardRun(TrackedRun):
    """Event files in ``tracking.target`` (a local folder, or ``s3://``: written to a local
    folder and uploaded after every epoch). The first epoch logged by a process also writes the
    params and tags as a text summary (the TEXT tab)."""

    def _writer(self) -> Any:
        writer = self.__dict__.get("_tb_writer")
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter  # flush() waits for the queue

            from sharding.storage import is_remote

            target = self.tracking.target
            local = tempfile.mkdtemp(prefix="rdtb-") if is_remote(target) else target
            self._tb_local = local
            writer = self._tb_writer = SummaryWriter(log_dir=local, flush_secs=3600)
            rows = "\n".join(f"| {k} | {v} |" for k, v in {**self.info.tags,
                                                           **self.info.params}.items())  # fmt: skip
            writer.add_text("config", f"| setting | value |\n|---|---|\n{rows}", 0)
        return writer

    def start(self) -> None:
        from sharding.storage import is_remote, local_path

        if not is_remote(self.tracking.target):
            local_path(self.tracking.target).mkdir(parents=True, exist_ok=True)

    def _flush(self) -> None:
        from sharding.storage import is_remote, open_storage

        self._tb_writer.flush()
        if is_remote(self.tracking.target):
            store = open_storage(self.tracking.target)
            for name in os.listdir(self._tb_local):
                store.put_file(name, os.path.join(self._tb_local, name))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        writer = self._writer()
        for k, v in numeric(metrics).items():
            writer.add_scalar(k, v, step)
        self._flush()

    def best(self, url: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._writer().add_text("best_checkpoint", f"epoch {epoch}: {url}", epoch)
        self._flush()

    def end(self, status: str = "FINISHED") -> None:
        if self.__dict__.get("_tb_writer") is None:
            return  # nothing written by this process
        self._flush()
        self._tb_writer.close()
        del self._tb_writer
        if self._tb_local != self.tracking.target:
            shutil.rmtree(self._tb_local, ignore_errors=True)


class WandbRun(TrackedRun):
    """A W&B run (id: the run's key, so a rerun resumes it) in project ``tracking.target``,
    group ``tracking.experiment``; its config is the params, the best checkpoint's URL goes to
    its summary. Its local files go to the run folder's ``wandb/`` when that is local."""

    def _run(self) -> Any:
        run = self.__dict__.get("_wandb_run")
        if run is None:
            import wandb

            from sharding.storage import is_remote, local_path

            url = self.info.url.split("#")[0]
            folder = None if is_remote(url) else str(local_path(url))
            if folder:
                os.makedirs(folder, exist_ok=True)
            run = self._wandb_run = wandb.init(
                project=self.tracking.target, group=self.tracking.experiment or None,
                name=self.info.name, id=self.info.key, resume="allow", dir=folder,
                config=dict(self.info.params), tags=[f"{k}={v}"[:64] for k, v in self.info.tags.items()],
                reinit="create_new",
            )  # fmt: skip
        return run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run().log(numeric(metrics), step=step)

    def best(self, url: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._run().summary.update({BEST_TAG: url, BEST_EPOCH_TAG: epoch})

    def end(self, status: str = "FINISHED") -> None:
        run = self.__dict__.pop("_wandb_run", None)
        if run is not None:
            run.finish(exit_code=0 if status == "FINISHED" else 1)


KINDS: dict[str, type[TrackedRun]] = {
    "mlflow": MlflowRun, "tensorboard": TensorBoardRun, "wandb": WandbRun, "none": TrackedRun,
}  # fmt: skip


def tracked_run(tracking: Tracking, info: RunInfo) -> TrackedRun:
    """The :class:`TrackedRun` of ``tracking``'s kind for ``info`` (not started)."""
    return KINDS[tracking.kind](tracking, info)
