"""The local-folder backend: members are files below a root folder.

Atomicity: a write goes to a temporary file in the destination folder named
``.<name>.<random>.tmp`` (see :func:`~sharding.storage.base.is_temp_name`), is fsync'ed and
published with :func:`os.replace`; :meth:`LocalStorage.list` never reports such names.

Compare-and-swap (:meth:`LocalStorage.replace_if`, :meth:`LocalStorage.delete_if`): a member's
version is the SHA-256 of its bytes (like an S3 ETag, equal bytes are the same version). The swap
runs under an exclusive ``flock`` on the member's sidecar ``.<name>.lock`` (created once, never
deleted, never listed): read, compare, then publish the new bytes by renaming a token-named temp
file over the member. The member never goes missing during a swap, so ``create_exclusive`` (a hard
link, no lock) cannot slip into one; the kernel drops the lock of a process that dies, so nothing
is ever left locked. The lock serialises processes of one machine in any PID namespace sharing the
folder, and hosts sharing an NFS mount with working locks (NFSv4; not ``local_lock``/``nolock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from sharding.storage.base import (
    MIB,
    TEMP_SUFFIX,
    Storage,
    StorageError,
    clean_prefix,
    clean_rel,
    is_temp_name,
)

#: Suffix of a member's compare-and-swap lock: ``.<name>.lock`` beside it, never listed.
LOCK_SUFFIX = ".lock"
#: A swap holds the lock for one read and one write; a lock held longer than this is a paused or
#: hung process, reported instead of waited on.
LOCK_WAIT_S = 30.0


def _is_lock_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(LOCK_SUFFIX)


def version_of(data: bytes) -> str:
    """The version of a local member's bytes (see the module docstring)."""
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class LocalStorage:
    """A local folder; members are files below it (atomic writes: see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStorage) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("local", self.root))

    def __reduce__(self) -> tuple[Callable[..., Storage], tuple[Any, ...]]:
        return (LocalStorage, (str(self.root),))

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        """Local path of member ``rel`` (validated)."""
        return self.root.joinpath(*clean_rel(rel).split("/"))

    def child_url(self, rel: str) -> str:
        return str(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def open_read(self, rel: str) -> BinaryIO:
        return open(self.path(rel), "rb")

    def _publish(self, dest: Path, fill: Callable[[IO[bytes]], None]) -> None:
        """Write through ``fill`` into a hidden temp file beside ``dest``, fsync, os.replace."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            with open(tmp, "xb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

    def write_bytes(self, rel: str, data: bytes) -> None:
        view = memoryview(data)
        self._publish(self.path(rel), lambda fh: fh.write(view))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if absent: a complete temp file is hard-linked to the name, which
        fails when the name exists (atomic on local and NFS file systems alike)."""
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, dest)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(dest.parent)
        return True

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        data = self.read_bytes(rel)
        return data, version_of(data)

    @contextlib.contextmanager
    def _swap_lock(self, dest: Path) -> Iterator[None]:
        """Hold the member's compare-and-swap lock (see the module docstring)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = dest.with_name(f".{dest.name}{LOCK_SUFFIX}")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(
                            f"{lock}: another process has held this lock for {LOCK_WAIT_S:g} s "
                            "(a paused or hung run): let it finish or stop it"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        """Replace ``rel`` by ``data`` if its version is still ``version``: the new version, or
        None when the member changed or is gone (see the module docstring)."""
        dest = self.path(rel)
        view = memoryview(data)
        with self._swap_lock(dest):
            try:
                current = dest.read_bytes()
            except FileNotFoundError:
                return None
            if version_of(current) != version:
                return None
            self._publish(dest, lambda fh: fh.write(view))
        return version_of(data)

    def delete_if(self, rel: str, version: str) -> bool:
        """Delete ``rel`` if its version is still ``version``; False when it changed or is gone."""
        dest = self.path(rel)
        with self._swap_lock(dest):
            try:
                current = dest.read_bytes()
            except FileNotFoundError:
                return False
            if version_of(current) != version:
                return False
            dest.unlink()
        _fsync_dir(dest.parent)
        return True

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file to publish")

        def fill(fh: IO[bytes]) -> None:
            with open(src, "rb") as sfh:
                shutil.copyfileobj(sfh, fh, 4 * MIB)

        self._publish(self.path(rel), fill)

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_prefix(prefix)
        # Walk only the deepest folder the prefix names fully, then filter by string prefix.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*head.split("/")) if head else self.root
        if not base.is_dir():
            return []
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if is_temp_name(name) or _is_lock_name(name):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def check(self) -> None:
        """Fail if the root exists but is not a folder (a missing folder is created on write)."""
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: storage root is not a folder")
