"""``--tracking KIND[:TARGET]`` resolved into where a run's records go, and the records' params.

Kinds (:data:`resdistill.config.TRACKING_KINDS`):

* ``tensorboard[:DIR]`` (the default) - TensorBoard event files in ``<run folder>/tensorboard``,
  or ``DIR/<run name>`` when a ``DIR`` (local or ``s3://``) is named, by PyTorch's
  ``SummaryWriter``; ``tensorboard`` (a dependency) is the viewer. Nothing leaves the machine.
* ``mlflow[:URI]`` - one MLflow run per training run (per trial under Tune). Without a URI the
  run storage's own database ``sqlite:///<storage>/mlflow.db`` (artifacts beside it in
  ``mlartifacts/``); a URI is a tracking server (``http(s)://``, ``databricks``), any MLflow
  store URI, or a local path, taken as a SQLite database file. MLflow's file store
  (``./mlruns``) is in maintenance mode and refuses to open by default since MLflow 3.7, so the
  local default is SQLite, MLflow's own recommendation. Needs ``pip install 'resdistill[mlflow]'``.
* ``wandb[:PROJECT]`` - Weights & Biases (project ``resdistill`` unless named); needs ``pip
  install wandb``; ``WANDB_MODE=offline`` keeps it on the machine.
* ``none``.

Only standard-library imports here: configs and ``--help`` read this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resdistill.config import TRACKING_KINDS
from resdistill.errors import UsageError

#: the MLflow experiment of teacher and distill runs unless $MLFLOW_EXPERIMENT_NAME names one
DEFAULT_EXPERIMENT = "resdistill"
#: the W&B project unless ``wandb:PROJECT`` names one
DEFAULT_PROJECT = "resdistill"
#: the local MLflow database of a run storage, and its artifact folder
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
#: the TensorBoard folder inside a run folder
TENSORBOARD_DIR = "tensorboard"
#: the tag holding a run's key (a hash of its folder URL): how a rerun finds its own record
KEY_TAG = "resdistill.key"
#: what each kind needs installed, and the line that says how
NEEDS = {
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "pip install 'resdistill[mlflow]'"),
    "wandb": (("wandb",), "pip install wandb"),
    "tensorboard": (("tensorboard",), "pip install tensorboard"),
}


@dataclass(frozen=True)
class Tracking:
    """A resolved ``--tracking``: ``kind``; ``target`` (the TensorBoard folder URL, the MLflow
    tracking URI or the W&B project); ``experiment`` (MLflow experiment, W&B group);
    ``artifacts`` (the artifact location of an MLflow experiment this run creates in a local
    database, else None); ``logdir`` (the TensorBoard folder to open to see this run beside
    the others of its storage)."""

    kind: str
    target: str = ""
    experiment: str = ""
    artifacts: str | None = None
    logdir: str = ""

    @property
    def on(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        """One line for a run's header: where the records go and how to look at them."""
        if self.kind == "tensorboard":
            return f"tensorboard -> {self.target} (view: tensorboard --logdir {self.logdir})"
        if self.kind == "mlflow":
            view = f"mlflow ui --backend-store-uri {self.target}"
            local = self.target.startswith("sqlite:")
            return (f"mlflow -> {self.target}, experiment {self.experiment!r}"
                    + (f" (view: {view})" if local else ""))  # fmt: skip
        if self.kind == "wandb":
            return f"wandb -> project {self.target}" + (
                f", group {self.experiment}" if self.experiment else ""
            )
        return "none"


def split(text: str) -> tuple[str, str]:
    """``"mlflow:http://h:5000"`` -> ``("mlflow", "http://h:5000")``; the kind is checked."""
    kind, _, target = text.partition(":")
    if kind not in TRACKING_KINDS:
        raise UsageError(f"--tracking must be one of {', '.join(TRACKING_KINDS)} (with :TARGET), "
                         f"got {text!r}")  # fmt: skip
    if kind == "none" and target:
        raise UsageError(f"--tracking none takes no target, got {text!r}")
    return kind, target


def require(kind: str) -> None:
    """Refuse, in one line saying what to install, a kind whose packages are missing."""
    modules, how = NEEDS.get(kind, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"--tracking {kind} needs {', '.join(missing)}: {how}")


def _absolute(url: str) -> str:
    """A local path made absolute (Ray's actors run elsewhere), an ``s3://`` URL unchanged."""
    from sharding.storage import is_remote, local_path

    return url.rstrip("/") if is_remote(url) else str(local_path(url))


def mlflow_uri(target: str, storage: str) -> tuple[str, str | None]:
    """``(tracking URI, artifact location or None)`` of ``mlflow[:target]`` for runs stored in
    ``storage``: see the module docstring."""
    from sharding.storage import is_remote

    if target and ("://" in target or target in ("databricks",) or target.startswith("sqlite:")):
        return target, None
    if target:
        db = Path(_absolute(target))
    elif is_remote(storage):
        raise UsageError(f"--tracking mlflow: the run storage {storage} cannot hold a local "
                         "MLflow database; name a tracking server (mlflow:http://HOST:5000) or a "
                         "local file (mlflow:PATH/mlflow.db)")  # fmt: skip
    else:
        db = Path(_absolute(storage)) / MLFLOW_DB
    return f"sqlite:///{db}", (db.parent / MLFLOW_ARTIFACTS).as_uri()


def resolve(text: str, *, storage: str, name: str, folder: str | None = None,
            experiment: str = "") -> Tracking:  # fmt: skip
    """The :class:`Tracking` of ``--tracking text`` for run ``name`` stored in ``storage``.

    ``folder``: where the TensorBoard files go without a ``DIR`` (the run folder's
    ``tensorboard/``); None for Tune and the study, whose trials Ray Tune's own TensorBoard
    logger records in their trial folders (a ``DIR`` is then refused). ``experiment``: the MLflow
    experiment (W&B group); empty for ``$MLFLOW_EXPERIMENT_NAME`` or :data:`DEFAULT_EXPERIMENT`.
    Raises :class:`UsageError` (one line) for an unknown kind or a missing package.
    """
    kind, target = split(text)
    if kind == "none":
        return Tracking("none")
    require(kind)
    if kind == "tensorboard":
        if folder is None:
            if target:
                raise UsageError("--tracking tensorboard:DIR: tune and study trials keep their "
                                 "TensorBoard files in their own trial folders; drop :DIR")  # fmt: skip
            root = _absolute(storage)
            where = f"{root}/{name}" if name else root
            return Tracking(kind, where, logdir=where)
        root = _absolute(target or storage)
        base = f"{root}/{name}" if target else f"{_absolute(folder)}/{TENSORBOARD_DIR}"
        return Tracking(kind, base, logdir=root)
    if kind == "mlflow":
        uri, artifacts = mlflow_uri(target, storage)
        exp = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        return Tracking(kind, uri, exp, artifacts)
    return Tracking(kind, target or DEFAULT_PROJECT, experiment)


def run_key(url: str) -> str:
    """A short stable key of a run (its folder URL, or a trial's ``<tune run URL>#<trial id>``):
    the tag a rerun finds its own MLflow run by, and its W&B run id."""
    return hashlib.sha1(url.encode()).hexdigest()[:20]


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested plain values as ``{"optim.lr": "0.001", ...}``: dotted paths, strings as they are,
    lists and mappings below the leaves as JSON, None as ``"None"``."""
    out: dict[str, str] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{path}."))
        elif isinstance(value, str):
            out[path] = value
        elif isinstance(value, list | tuple | Mapping):
            out[path] = json.dumps(value, default=str)
        else:
            out[path] = str(value)
    return out


#: what a run's params keep of its planned data (the dataset.json snapshot stays out: the
#: run's config.yaml and checkpoints hold it)
PLAN_PARAMS = ("n_train", "n_labelled", "n_val", "n_val_slides", "train_shards", "steps_per_epoch")


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The params of a run: its resolved :class:`~resdistill.config.TrainConfig` (``to_dict()``)
    flattened, with ``plan`` reduced to :data:`PLAN_PARAMS`."""
    doc = dict(config)
    plan = doc.pop("plan", None) or {}
    doc["plan"] = {k: plan[k] for k in PLAN_PARAMS if k in plan}
    return flatten(doc)
