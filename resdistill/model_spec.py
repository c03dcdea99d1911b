"""Which checkpoint a model argument names, and where its files are: the one resolver.

Every model argument (``distill --teacher``, ``evaluate``, ``predict``, ``export``, a
``--cascade`` teacher, ``teacher-targets --teacher``, ``--resume-from``, the Python API) is
resolved by :func:`resolve_spec`, which accepts, local or ``s3://``:

* a checkpoint folder (``.../checkpoint_epochNNNN``, weights in its ``model.pt``);
* a weights file itself (``.../model.pt`` or any ``*.pt``);
* a run folder (``<storage>/<name>``): its best checkpoint (:func:`best_in_run`);
* a run summary JSON (``--summary-json``: its ``best_checkpoint``, else ``latest_checkpoint``);
* a tune result JSON ``{"checkpoint": url, "config": {...}}``.

Anything else is refused in one line saying what was expected (:data:`EXPECTED`). Reading the
checkpoint itself is :mod:`resdistill.checkpoint`'s job (the one reader).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from resdistill.errors import CheckpointError

#: the weights file of a checkpoint folder
MODEL_FILE = "model.pt"
#: Ray Train's record of a run's kept checkpoints and their reported metrics, in the run folder
SNAPSHOT = "checkpoint_manager_snapshot.json"
#: what a model argument may be, for one-line refusals
EXPECTED = (
    "expected a checkpoint folder (holding model.pt), a run folder (its best checkpoint), a run "
    "summary JSON (--summary-json) or a tune result JSON, local or s3://"
)


def absolute_url(url: str) -> str:
    """``s3://`` URLs unchanged; a local path made absolute (workers may run elsewhere)."""
    from sharding.storage import is_remote, local_path

    return url if is_remote(url) else str(local_path(url))


def checkpoint_url(checkpoint: Any) -> str | None:
    """``s3://...`` or a local path for a Ray ``Checkpoint`` (None for None)."""
    if checkpoint is None:
        return None
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    path = str(checkpoint.path)
    return f"{kind}://{path}" if kind not in ("local", "") else path


def _parent_and_name(url: str) -> tuple[str, str]:
    from sharding.storage import is_remote

    if is_remote(url):
        head, _, name = url.rstrip("/").rpartition("/")
        return head, name
    p = Path(url)
    return str(p.parent), p.name


def folder_name(url: str) -> str:
    """The last component of a checkpoint URL (local or ``s3://``)."""
    return _parent_and_name(url)[1]


def read_url(url: str) -> bytes:
    """The bytes of one file given as a local path or ``s3://bucket/key`` (FileNotFoundError)."""
    from sharding.storage import is_remote, open_storage

    if not is_remote(url):
        return Path(url).read_bytes()
    parent, name = _parent_and_name(url)
    return open_storage(parent).read_bytes(name)


def resolve_spec(spec: str | os.PathLike[str]) -> tuple[str, str, dict[str, Any] | None]:
    """``(checkpoint folder URL, weights file name, tune config or None)`` for a model argument
    (any form of the module docstring).

    A relative local checkpoint path inside a JSON is taken relative to the JSON's folder when it
    exists there. A folder without ``model.pt`` is read as a run folder (:func:`best_in_run`).
    :class:`CheckpointError`, one line saying what was expected, for anything else.
    """
    from sharding.storage import is_remote

    text = os.fspath(spec)
    if not text.strip():
        raise CheckpointError(f"no model given: {EXPECTED}")
    if text.endswith(".json"):
        return _from_json(text)
    stripped = text.rstrip("/")
    if stripped.endswith(".pt") or (not is_remote(text) and Path(text).is_file()):
        parent, name = _parent_and_name(stripped)
        return parent or ".", name, None
    if _has_file(text, MODEL_FILE):
        return text, MODEL_FILE, None
    best = best_in_run(text)
    return (best, MODEL_FILE, None) if best is not None else (text, MODEL_FILE, None)


def checkpoint_folder(spec: str | os.PathLike[str]) -> str:
    """The absolute URL of the checkpoint folder ``spec`` names (:func:`resolve_spec`), for
    what rereads ``<folder>/model.pt`` (workers, fingerprints); :class:`CheckpointError` when
    ``spec`` names a weights file not called ``model.pt`` or no checkpoint at all."""
    folder, file, _ = resolve_spec(spec)
    if file != MODEL_FILE:
        raise CheckpointError(f"{os.fspath(spec)}: a weights file named {file}: {EXPECTED}")
    if not _has_file(folder, MODEL_FILE):
        raise _missing_checkpoint(folder)
    return absolute_url(folder).rstrip("/")


def _from_json(text: str) -> tuple[str, str, dict[str, Any] | None]:
    """:func:`resolve_spec` of a run summary or tune result JSON."""
    from sharding.storage import StorageError, is_remote

    try:
        doc = json.loads(read_url(text))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{text}: no such file: {EXPECTED}") from None
    except StorageError as exc:
        raise CheckpointError(f"{text}: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{text}: not valid JSON ({exc}): {EXPECTED}") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{text}: a JSON {type(doc).__name__}, not an object: {EXPECTED}")
    url = doc.get("checkpoint") or doc.get("best_checkpoint") or doc.get("latest_checkpoint")
    if not url or not isinstance(url, str):
        raise CheckpointError(
            f"{text}: names no checkpoint: expected a run summary (--summary-json, with "
            "'best_checkpoint') or a tune result {'checkpoint': url, 'config': {...}}"
        )
    config = doc.get("config") if isinstance(doc.get("config"), dict) else None
    if not is_remote(url) and not Path(url).is_absolute() and not is_remote(text):
        beside = Path(text).parent / url
        if beside.exists():
            url = str(beside)
    if url.endswith(".json"):
        raise CheckpointError(f"{text}: its checkpoint {url} is another JSON, not a checkpoint")
    folder, file, _ = resolve_spec(url)
    return folder, file, config


def _has_file(url: str, name: str) -> bool:
    """Whether folder ``url`` (local or ``s3://``) holds file ``name``; False when unreadable."""
    from sharding.storage import StorageError, open_storage

    try:
        return open_storage(url).exists(name)
    except (StorageError, OSError, ValueError):
        return False


def best_in_run(url: str) -> str | None:
    """The URL of the best checkpoint of run folder ``url``, None when ``url`` holds no
    checkpoint (not a run folder).

    The best is the kept checkpoint of the epoch the run's last report names ``best_epoch``
    (ranked by the run's own ``--select`` rule as it trained, ties to the later epoch: the one
    its summary printed), read from Ray Train's record (:data:`SNAPSHOT`); the last one when
    nothing was ranked yet. :class:`CheckpointError` (one line naming a checkpoint there) when
    the folder holds checkpoints but not the record (a copy without it cannot say which is
    best), or the best one is no longer kept.
    """
    from sharding.storage import StorageError, open_storage

    store = open_storage(url)
    try:
        raw = store.read_bytes(SNAPSHOT)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raw = None
    except (StorageError, OSError) as exc:
        raise CheckpointError(f"{url}: {exc}") from None
    if raw is None:
        kept = _checkpoints_in(store)
        if kept:
            raise CheckpointError(
                f"{url} is a run folder, not a checkpoint, and holds no record of its best one "
                f"({SNAPSHOT}, written by Ray Train): pass one of its checkpoints, e.g. "
                f"{store.child_url(kept[-1])}"
            )
        return None
    try:
        doc = json.loads(raw)
        latest = doc["latest_checkpoint_result"]
        best = int(latest["metrics"].get("best_epoch") or 0)
        names = [r["checkpoint_dir_name"] for r in doc.get("checkpoint_results") or ()]
        last = latest["checkpoint_dir_name"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{store.child_url(SNAPSHOT)}: unreadable ({type(exc).__name__}: {exc}): pass one of "
            "the run's checkpoint folders instead"
        ) from None
    name = f"checkpoint_epoch{best:04d}" if best > 0 else last
    if name not in names and name != last:
        raise CheckpointError(
            f"{url}: its best epoch {best}'s checkpoint is not kept (kept: "
            f"{', '.join(names) or 'none'}): pass one of those, or rerun with a larger --keep"
        )
    return store.child_url(name)


def _checkpoints_in(store: Any) -> list[str]:
    """The ``checkpoint_*`` folders holding a ``model.pt`` directly under ``store``, sorted."""
    from sharding.storage import StorageError

    try:
        found = store.list("checkpoint_")
    except (StorageError, OSError, ValueError):
        return []
    return sorted({p.split("/")[0] for p in found if p.count("/") == 1 and p.endswith(MODEL_FILE)})


def _missing_checkpoint(url: str) -> CheckpointError:
    """The most helpful one-line message for a model argument naming no checkpoint."""
    from sharding.storage import is_remote

    if not is_remote(url) and not Path(url).exists():
        return CheckpointError(f"{url}: no such checkpoint: {EXPECTED}")
    return CheckpointError(f"{url}: no model.pt there and no checkpoint inside: {EXPECTED}")
