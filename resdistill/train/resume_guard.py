"""A rerun resumes only its own run: the checkpoint it would continue must have learnt the same
thing on the same data, unless ``--resume-from`` names that checkpoint.

Ray Train continues a run named again (``--name``) from its latest checkpoint whatever the new
run's options are, so a rerun on another dataset or with another learning rate would silently
continue someone else's weights. :func:`check_resume` runs on the driver, under the run folder's
lease and before Ray starts: it reads the checkpoint a rerun would continue (the latest one in
Ray Train's ``checkpoint_manager_snapshot.json``), and refuses in one line naming the first
difference (``--lr 0.001 in the run, 0.01 now``) when the dataset's fingerprint
(:func:`resdistill.run_config.dataset_fingerprint` of ``dataset.json``) or a setting that
changes what is learnt differs.

May differ on resume (they say how long, where and how a run executes, or which checkpoint it
keeps, not what it learns): ``--epochs`` (extending a run), every ``run`` option except
``--workers`` (name, storage, device, failures, kept checkpoints, ``--select``/``--metric``,
logging), the ``speed`` section, ``--loader-workers``, ``--eval-batch-size``,
``--teacher-eval`` and the dataset's URL (a copied dataset is the same dataset: it is compared by
fingerprint). ``--workers`` must match: the global batch (workers x batch) and the steps per
epoch, hence the learning-rate schedule, depend on it. Everything else must match.

``--resume-from CHECKPOINT`` takes a checkpoint's weights, optimiser state and epoch count under
the new options. In a run folder with checkpoints it must name the one a rerun continues (Ray
Train resumes nothing else there); in a new run folder it is the start checkpoint handed to the
workers (:func:`resdistill.train.loop.restore`). Either way the weights must fit: the stage,
the architecture, the classes and the teacher's feature channels must match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from resdistill.config import TrainConfig
from resdistill.errors import UsageError
from resdistill.fields import dataclass_of, field_types, flag_of
from resdistill.model_spec import SNAPSHOT  # Ray Train's record of a run's checkpoints

#: settings that may differ when a run resumes (see the module docstring)
MAY_DIFFER = frozenset({"optim.epochs", "data.url", "data.loader_workers",
                        "data.eval_batch_size", "teacher.evaluate"})  # fmt: skip
#: sections that may differ as a whole; ``run`` except the settings in :data:`RUN_MUST_MATCH`
FREE_SECTIONS = ("speed", "run", "plan")
RUN_MUST_MATCH = ("run.workers",)
#: what a checkpoint's weights need to load into this run's networks
WEIGHTS_FIT = ("stage", "model.arch", "teacher.feature_channels")
#: a setting a config does not record
ABSENT = object()


def latest_checkpoint(folder: str) -> str | None:
    """URL of the checkpoint Ray Train resumes in the run folder ``folder``, or None (a new
    run). An unreadable record is refused in one line: nobody could tell what would resume."""
    from sharding.storage import open_storage

    store = open_storage(folder)
    try:
        doc = json.loads(store.read_bytes(SNAPSHOT))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UsageError(f"{store.child_url(SNAPSHOT)}: unreadable ({exc}); a rerun cannot tell "
                         "which checkpoint it would continue: choose another --name") from None  # fmt: skip
    latest = doc.get("latest_checkpoint_result") if isinstance(doc, dict) else None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    return store.child_url(name) if name else None


def checkpoint_config(url: str) -> dict[str, Any]:
    """The planned config (``TrainConfig.to_dict()``, ``plan`` included) a checkpoint's
    ``trainer.pt`` records; one-line :class:`UsageError` when it cannot be read."""
    from resdistill.checkpoint import TRAINER_FILE, load_checkpoint

    try:
        config = load_checkpoint(url, TRAINER_FILE).get("config")
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise UsageError(f"{url}: cannot read its {TRAINER_FILE} ({exc})") from None
    if not isinstance(config, Mapping):
        raise UsageError(f"{url}/{TRAINER_FILE} records no config: it cannot be resumed safely")
    return dict(config)


def _show(value: Any) -> str:
    if value is None or value == "":
        return "unset"
    if isinstance(value, list | tuple):
        return ",".join(_show(v) for v in value) or "unset"
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _fingerprint(config: Mapping[str, Any]) -> str | None:
    from resdistill.run_config import dataset_fingerprint

    dataset = (config.get("plan") or {}).get("dataset")
    return dataset_fingerprint(dataset) if dataset else None


def _settings(config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{dotted path: (flag, value)}`` of every setting of a planned config (``stage`` too); a
    section that is None gives None for each of its settings, one the config lacks
    :data:`ABSENT` (a setting newer than the checkpoint: nothing to compare)."""
    out: dict[str, tuple[str, Any]] = {"stage": ("stage", config.get("stage", ABSENT))}
    hints = field_types(TrainConfig)
    for section in fields(TrainConfig):
        cls = dataclass_of(hints[section.name])
        if cls is None:
            continue
        values = config.get(section.name, ABSENT)
        for f in fields(cls):
            path = f"{section.name}.{f.name}"
            name = flag_of(f) if f.metadata.get("cli", True) else path
            if values is ABSENT or values is None:
                out[path] = (name, values)
            else:
                out[path] = (name, values.get(f.name, ABSENT))
    return out


def _may_differ(path: str) -> bool:
    section = path.partition(".")[0]
    if path in MAY_DIFFER:
        return True
    return section in FREE_SECTIONS and path not in RUN_MUST_MATCH


def differences(old: Mapping[str, Any], new: Mapping[str, Any], *, only: tuple[str, ...] = ()
                ) -> list[str]:  # fmt: skip
    """What differs between the planned configs ``old`` (a checkpoint's) and ``new``, one
    ``"--lr 0.001 in the run, 0.01 now"`` per setting: the dataset's fingerprint first, then
    every setting that must match on resume (or only the dotted paths ``only``)."""
    out: list[str] = []
    if not only:
        was, now = _fingerprint(old), _fingerprint(new)
        if was and now and was != now:
            urls = [(c.get("data") or {}).get("url") for c in (old, new)]
            out.append(f"--data {urls[0]} (dataset.json fingerprint {was}) in the run, "
                       f"{urls[1]} ({now}) now")  # fmt: skip
    before, after = _settings(old), _settings(new)
    for path, (flag, value) in after.items():
        if (only and path not in only) or (not only and _may_differ(path)):
            continue
        was = before.get(path, ("", ABSENT))[1]
        if was is ABSENT or value is ABSENT or _plain(was) == _plain(value):
            continue
        if _show(was) != _show(value):  # None and "" alike: an unset section's settings
            out.append(f"{flag} {_show(was)} in the run, {_show(value)} now")
    if only:
        classes = [((c.get("plan") or {}).get("dataset") or {}).get("classes") for c in (old, new)]
        if all(classes) and list(classes[0]) != list(classes[1]):
            out.append(f"the classes {_show(classes[0])} in the run, {_show(classes[1])} now")
    return out


def _plain(value: Any) -> Any:
    """Tuples and lists compare alike (a config's tuples are a checkpoint's lists)."""
    from resdistill.fields import to_plain

    return to_plain(value)


def check_resume(cfg: TrainConfig, folder: str) -> str | None:
    """Refuse (one-line :class:`UsageError`) to resume in the run folder ``folder`` a checkpoint
    that is not this run's (see the module docstring); the start checkpoint to hand the workers
    (``--resume-from`` into a run folder without checkpoints), else None."""
    from resdistill.checkpoint import absolute_url, resolve_spec

    named = None
    if cfg.run.resume_from:
        try:
            named = absolute_url(resolve_spec(cfg.run.resume_from)[0]).rstrip("/")
        except ValueError as exc:
            raise UsageError(f"--resume-from: {exc}") from None
    latest = latest_checkpoint(folder)
    new = cfg.to_dict()
    if latest is None:
        if named is not None:
            _weights_fit(named, checkpoint_config(named), new)
        return named
    latest = absolute_url(latest).rstrip("/")
    if named is not None and named != latest:
        raise UsageError(
            f"--resume-from {cfg.run.resume_from}: run {folder} has checkpoints already, and a "
            f"rerun continues its latest, {latest}: name that one, or choose another --name to "
            "start a new run from this checkpoint"
        )
    old = checkpoint_config(latest)
    if named is not None:
        _weights_fit(latest, old, new)
        return None
    differ = differences(old, new)
    if differ:
        raise UsageError(
            f"{folder}: its checkpoint {latest} learnt with other data or settings "
            f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): rerun with its "
            f"settings, choose another --name, or pass --resume-from {latest} to continue its "
            "weights under these settings"
        )
    return None


def _weights_fit(url: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose weights cannot load into this run's networks."""
    misfit = differences(old, new, only=WEIGHTS_FIT)
    if misfit:
        raise UsageError(
            f"--resume-from {url}: its weights do not fit this run ({'; '.join(misfit)}): "
            "resume a checkpoint of the same stage, architecture and classes"
        )
