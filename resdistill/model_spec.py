"""Which checkpoint a model argument names, and where its files are.

A model is named to a command by any of (:func:`resolve_spec`): a checkpoint folder, its
``model.pt`` (or any ``*.pt``), a tune result JSON ``{"checkpoint": url, "config": {...}}``, or a
run summary JSON (``best_checkpoint``, else ``latest_checkpoint``); local or ``s3://``. Reading
the checkpoint itself is :mod:`resdistill.checkpoint`'s job (the one reader).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from resdistill.errors import CheckpointError

#: the weights file of a checkpoint folder
MODEL_FILE = "model.pt"


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
    """``(checkpoint folder URL, weights file name, tune config or None)`` for a model argument.

    Accepted: a checkpoint folder (``.../checkpoint_epochNNNN``, local or ``s3://``; weights in
    its ``model.pt``), a weights file itself (``.../model.pt`` or any ``*.pt``), a tune result
    JSON ``{"checkpoint": url, "config": {...}}``, or a run summary JSON (``--summary-json``: its
    ``best_checkpoint``, else ``latest_checkpoint``). A relative local checkpoint path inside a
    JSON is taken relative to the JSON's folder when it exists there.
    """
    from sharding.storage import is_remote

    text = os.fspath(spec)
    if text.endswith(".json"):
        try:
            doc = json.loads(read_url(text))
        except (FileNotFoundError, IsADirectoryError):
            raise CheckpointError(
                f"{text}: no such file: pass a checkpoint folder or a tune result JSON"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{text}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise CheckpointError(f"{text}: expected a JSON object with a 'checkpoint' field")
        url = doc.get("checkpoint") or doc.get("best_checkpoint") or doc.get("latest_checkpoint")
        if not url or not isinstance(url, str):
            raise CheckpointError(
                f"{text}: names no checkpoint: expected {{'checkpoint': url, 'config': {{...}}}} "
                "(a tune result) or a run summary with 'best_checkpoint'"
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
    stripped = text.rstrip("/")
    if stripped.endswith(".pt") or (not is_remote(text) and Path(text).is_file()):
        parent, name = _parent_and_name(stripped)
        return parent or ".", name, None
    return text, MODEL_FILE, None


def _missing_checkpoint(url: str) -> CheckpointError:
    """The most helpful one-line message for a checkpoint folder without ``model.pt``."""
    from sharding.storage import StorageError, is_remote, open_storage

    if not is_remote(url) and not Path(url).exists():
        return CheckpointError(
            f"{url}: no such checkpoint: pass a checkpoint folder printed by a run "
            "(.../checkpoint_epochNNNN), its model.pt, or a tune result JSON"
        )
    try:
        inside = [p for p in open_storage(url).list("checkpoint_") if "/" in p]
    except (StorageError, OSError, ValueError):
        inside = []
    if inside:
        first = sorted({p.split("/", 1)[0] for p in inside})[-1]
        return CheckpointError(
            f"{url} is a run folder, not a checkpoint: pass one of its checkpoints, e.g. "
            f"{url.rstrip('/')}/{first} (the run summary prints the best one)"
        )
    return CheckpointError(
        f"{url}: no model.pt there: pass a checkpoint folder printed by a run "
        "(.../checkpoint_epochNNNN), its model.pt, or a tune result JSON"
    )
