"""The resume seal: ``tune --resume`` unpickles only files this user's runs wrote.

``Tuner.restore`` unpickles files from the run folder on the driver: ``tuner.pkl``, the newest
``experiment_state-*.json`` (cloudpickle inside), the searcher's and callbacks' state (every
``*.pkl`` / ``*.json`` at the folder's root) and a trial's ``error.pkl``. Whoever can write the
run's prefix could otherwise run code on the driver, with its credentials. So:

* while a run writes them, the driver records each such file's SHA-256 in
  ``<run>/_state/tune-seal.json``: ``tuner.pkl`` right after ``Tuner()`` wrote it, the rest in
  :meth:`ResumeSeal.get_state`, which Tune calls while it saves its experiment state, after the
  files are staged on the driver and before they are uploaded, so the seal never lags the
  folder. Every sealed name keeps its last :data:`HISTORY` hashes (an upload may trail);
* the seal carries an HMAC-SHA256 under a per-user key that stays on the driver machine
  (:func:`key_file`, mode 0600, created on the first tuning run, never uploaded), so a writer
  of the prefix cannot forge it;
* ``--resume`` (:func:`verify`) refuses in one line unless the seal's MAC holds and every
  sealed-scope file (:func:`in_scope`) in the folder has a recorded hash. ``--trust-resume``
  skips the check: a run started on another machine (copy the key file there instead), before
  seals existed, or whose key is lost.

The boundary: the check runs just before ``Tuner.restore`` reads the files, so a writer racing
that window is not stopped; a running tuning job reads a failed trial's ``error.pkl`` back from
the folder for its final table without a check; checkpoints need none (``weights_only``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ray import tune

from resdistill.errors import UsageError

SEAL = "_state/tune-seal.json"
TUNER_PKL = "tuner.pkl"
#: hashes kept per file name (the newest last)
HISTORY = 32
FORMAT = 1


def key_file() -> Path:
    """``$XDG_CONFIG_HOME/resdistill/tune-resume.key`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "resdistill" / "tune-resume.key"


def load_key(create: bool) -> bytes | None:
    """This user's seal key; with ``create``, made (0600, in a 0700 folder) when missing."""
    path = key_file()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            return None
    except ValueError:
        raise UsageError(f"{path}: not a resdistill seal key: delete it (new runs make a new "
                         "one; resuming an older run then needs --trust-resume)") from None  # fmt: skip
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run made it just now
        return load_key(create=False)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return load_key(create=False)


def in_scope(rel: str) -> bool:
    """Files Tune may unpickle on restore: ``*.pkl`` / ``*.json`` at the run folder's root and
    ``*.pkl`` in a trial folder (not in ``_train/``, ``_state/``)."""
    parts = rel.split("/")
    if len(parts) == 1:
        return rel.endswith((".pkl", ".json"))
    return len(parts) == 2 and not parts[0].startswith("_") and rel.endswith(".pkl")


def _mac(key: bytes, files: Mapping[str, list[str]]) -> str:
    body = json.dumps({"format": FORMAT, "files": files}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def read_seal(store: Any, key: bytes | None) -> dict[str, list[str]] | None:
    """The seal's ``{file: [sha256, ...]}`` when its MAC holds under ``key``, else None."""
    try:
        doc = json.loads(store.read_bytes(SEAL))
        files = {str(k): [str(h) for h in v] for k, v in doc["files"].items()}
        good = key is not None and hmac.compare_digest(str(doc["mac"]), _mac(key, files))
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return files if good else None


def add_hashes(files: dict[str, list[str]], new: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``files`` with each ``(name, sha256)`` of ``new`` appended (the last :data:`HISTORY`)."""
    out = {k: list(v) for k, v in files.items()}
    for rel, digest in new:
        kept = [h for h in out.get(rel, []) if h != digest]
        out[rel] = [*kept, digest][-HISTORY:]
    return out


def write_seal(store: Any, key: bytes, files: dict[str, list[str]]) -> None:
    doc = {"format": FORMAT, "files": files, "mac": _mac(key, files)}
    store.write_bytes(SEAL, json.dumps(doc, sort_keys=True).encode())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal_stored(store: Any, names: Iterable[str] | None = None) -> None:
    """Add the stored bytes of ``names`` (default: every :func:`in_scope` file of ``store``) to
    the seal: ``tuner.pkl`` after ``Tuner()`` wrote it, or a folder the user chose to trust."""
    key = load_key(create=True)
    assert key is not None
    names = [r for r in store.list() if in_scope(r)] if names is None else list(names)
    files = read_seal(store, key) or {}
    write_seal(store, key, add_hashes(files, ((r, sha256(store.read_bytes(r))) for r in names)))


def verify(store: Any) -> None:
    """Refuse (one line: the file, why, the fix) to resume ``store``'s run unless its seal's MAC
    holds under this user's key and every :func:`in_scope` file has a recorded hash."""
    where = store.child_url(SEAL)
    hint = "; resume only a run you trust with --trust-resume"
    if not store.exists(SEAL):
        raise UsageError(f"{where}: missing, so the run's pickled state (tuner.pkl, experiment "
                         f"state) cannot be checked{hint}")  # fmt: skip
    key = load_key(create=False)
    if key is None:
        raise UsageError(f"{where}: cannot check the run's pickled state: no seal key "
                         f"{key_file()} on this machine (copy it from where the run started)"
                         f"{hint}")  # fmt: skip
    files = read_seal(store, key)
    if files is None:
        raise UsageError(f"{where}: its signature does not match this user's seal key: the "
                         f"seal was altered or made elsewhere{hint}")  # fmt: skip
    for rel in sorted(r for r in store.list() if in_scope(r)):
        if sha256(store.read_bytes(rel)) not in files.get(rel, []):
            raise UsageError(f"{store.child_url(rel)}: not a file this run wrote (its SHA-256 "
                             f"is not in {SEAL}): resuming would unpickle it, refused{hint}")  # fmt: skip


class ResumeSeal(tune.Callback):
    """Seals every state file Tune stages on the driver before Tune uploads it (see module
    doc). Where the run folder and the staging folder are comes from the trials' storage, so a
    restored copy (unpickled from ``tuner.pkl``) holds nothing of the old run's."""

    def __init__(self) -> None:
        self._staging: Path | None = None
        self._url = ""
        self._files: dict[str, list[str]] | None = None
        self._seen: dict[str, tuple[int, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def _learn(self, trials: Iterable[Any]) -> None:
        for trial in trials:
            storage = trial.storage
            kind = getattr(storage.storage_filesystem, "type_name", "local")
            path = storage.experiment_fs_path
            self._url = f"s3://{path}" if kind == "s3" else path
            self._staging = Path(storage.experiment_driver_staging_path)
            return

    def on_trial_add(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._staging is None:
            self._learn([trial])

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._staging is None:
            self._learn(trials)

    def get_state(self) -> dict | None:
        """Tune's hook inside its experiment-state save: seal what is staged. Returns None (no
        state of its own, so Tune writes no callback-state file)."""
        if self._staging is not None:
            self.seal_staged(self._staging, self._url)
        return None

    def seal_staged(self, root: Path, url: str) -> None:
        """Add to the seal of the run folder ``url`` the hash of every in-scope file under the
        staging folder ``root`` that changed since last seen."""
        from sharding.storage import open_storage

        new = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if not in_scope(rel) or not path.is_file():
                continue
            st = path.stat()
            if self._seen.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            new.append((rel, sha256(path.read_bytes())))
            self._seen[rel] = (st.st_size, st.st_mtime_ns)
        if not new:
            return
        store = open_storage(url)
        key = load_key(create=True)
        assert key is not None
        if self._files is None:
            self._files = read_seal(store, key) or {}
        self._files = add_hashes(self._files, new)
        write_seal(store, key, self._files)
