"""What a lease file says about the run holding it, and how a taker tells that run is gone.

A :class:`Holder` is the lease file's content (token, owner description, host, pid, boot id, start
time, heartbeat time, liveness lock). A holder is stale (:meth:`Holder.stale_reason`) when its
heartbeat is older than the stale age, whatever its pid says, or when it provably died on this
machine: for its lifetime a holder keeps a kernel lock (``flock``) on a token-named file in the
temp folder (:func:`liveness_lock`); with the lease's boot id equal to this machine's and that
lock free, its process is gone in whichever PID namespace it ran, since the kernel drops the lock
with the process. No file, another boot, or a busy lock proves nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .storage import is_remote

#: The holder's liveness lock: ``<temp folder>/<prefix><token>.lock``.
LIVENESS_PREFIX = "resdistill-lease-"


def this_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def clear_command(url: str) -> str:
    """The shell command that deletes the member at ``url`` (a local path or ``s3://``)."""
    return f"aws s3 rm {shlex.quote(url)}" if is_remote(url) else f"rm {shlex.quote(url)}"


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the run holding it (``lock``: its liveness lock, or "")."""

    token: str
    host: str
    pid: int
    boot_id: str
    started: float
    heartbeat: float
    owner: str = ""
    lock: str = ""

    @classmethod
    def me(cls, owner: str) -> Holder:
        now = time.time()
        token = uuid.uuid4().hex
        return cls(token, socket.gethostname(), os.getpid(), this_boot_id(), now, now, owner)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(
                str(d["token"]),
                str(d["host"]),
                int(d["pid"]),
                str(d.get("boot_id", "")),
                float(d["started"]),
                float(d["heartbeat"]),
                str(d.get("owner", "")),
                str(d.get("lock", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def stale_reason(self, stale_after_s: float, now: float | None = None) -> str | None:
        """Why this holder cannot be running (see the module docstring), or None."""
        age = (time.time() if now is None else now) - self.heartbeat
        if age > stale_after_s:
            old = f"{age / 60:.0f} min" if age >= 120 else f"{age:.0f} s"
            return f"its last heartbeat is {old} old"
        if self.proven_gone():
            return "its process is gone: its lock on this machine is free"
        return None

    def proven_gone(self) -> bool:
        """True when this holder ran on this machine and its liveness lock is free."""
        if not (self.lock and self.boot_id and self.boot_id == this_boot_id()):
            return False
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if os.read(fd, 256) != self.token.encode():
                return False
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: alive
            return False
        finally:
            os.close(fd)
        return True

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        age = max(0.0, time.time() - self.heartbeat)
        return f"pid {self.pid} on {self.host}, started {started}, last heartbeat {age:.0f} s ago"


def liveness_lock(token: str) -> tuple[int | None, str]:
    """Create and lock this run's liveness file; ``(None, "")`` where that is impossible."""
    path = Path(tempfile.gettempdir()) / f"{LIVENESS_PREFIX}{token}.lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        return None, ""
    try:
        os.write(fd, token.encode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return None, ""
    return fd, str(path)
