"""An exclusive lease on a sharding output, so that two runs on one ``--out`` never interleave.

Two runs on one output (a retried job starting while the first still runs) would compute the same
next shard numbers and overwrite each other's shards. The run that creates ``_state/lease.json``
with :meth:`Storage.create_exclusive <sharding.storage>` (one winner, on a local folder and on S3
alike) holds the lease; it names its holder (host, pid, boot id, start time) and a heartbeat
time the holder rewrites every ``heartbeat_s`` seconds.

A lease is stale, and taken over by the next run, when its holder ran on this host (same boot) and
its process is gone (a run killed with ``kill -9``), when that host has rebooted since, or when its
heartbeat is older than ``stale_after_s`` (a holder on another host that died; hosts' clocks are
trusted to agree within minutes). A takeover is itself exclusive: the run that creates
``_state/lease-takeover-<stale token>.json`` removes the stale lease and creates its own; any other
run is refused. The holder's heartbeat notices a lease that is no longer its own (it stalled past
the stale age and was taken over) and :meth:`Lease.check` then stops the run.

The lease is released (deleted) when the run ends, on failure and on interrupt too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from .layout import STATE_DIR
from .storage import Storage

LEASE = f"{STATE_DIR}/lease.json"
#: Every member the lease machinery writes starts with this (``--overwrite`` keeps them).
LEASE_PREFIX = f"{STATE_DIR}/lease"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class LeaseHeld(Exception):
    """Another run holds the output; the message is one line naming it and how to clear it."""


class LeaseLost(Exception):
    """This run's lease was taken over (it looked dead to another run); it must stop writing."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the run holding it."""

    token: str
    host: str
    pid: int
    boot_id: str
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _boot_id(), now, now)

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
            )
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def stale_reason(self, stale_after_s: float, now: float | None = None) -> str | None:
        """Why this holder is gone, or None while it may still be running."""
        age = (time.time() if now is None else now) - self.heartbeat
        if self.host == socket.gethostname() and self.boot_id == _boot_id():
            if not _pid_alive(self.pid):
                return f"its process {self.pid} on {self.host} is gone"
        elif self.host == socket.gethostname() and self.boot_id and _boot_id():
            return f"{self.host} has restarted since"
        if age > stale_after_s:
            return f"its last heartbeat is {age / 60:.0f} min old"
        return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        age = max(0.0, time.time() - self.heartbeat)
        return f"pid {self.pid} on {self.host}, started {started}, last heartbeat {age:.0f} s ago"


class Lease:
    """The exclusive lease of one run on ``store`` (see the module docstring).

    ``acquire()`` takes it or raises :class:`LeaseHeld`; it returns a note when it took over a
    stale lease. Use as a context manager so it is released however the run ends.
    """

    def __init__(
        self,
        store: Storage,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.me = Holder.me()
        self.lost: str | None = None
        self._marker: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        note = None
        if not self.store.create_exclusive(LEASE, self.me.to_bytes()):
            note = self._take_over()
        self._thread = threading.Thread(target=self._beat, name="shard-lease", daemon=True)
        self._thread.start()
        return note

    def _held(self, holder: Holder | None) -> LeaseHeld:
        who = holder.describe() if holder else "a lease file this version cannot read"
        return LeaseHeld(
            f"{self.store.url} is in use by another 'resdistill shard' run ({who}): wait for it "
            f"to finish; if it is gone, the next run takes over once its heartbeat is "
            f"{self.stale_after_s / 60:g} min old, or delete {self.store.child_url(LEASE)} now"
        )

    def _take_over(self) -> str | None:
        """Take a stale lease over (see the module docstring); a note saying whose, or None when
        the lease was released meanwhile and created afresh."""
        try:
            holder = Holder.parse(self.store.read_bytes(LEASE))
        except FileNotFoundError:  # released meanwhile: try once more from the start
            if self.store.create_exclusive(LEASE, self.me.to_bytes()):
                return None
            holder = Holder.parse(self.store.read_bytes(LEASE))
        reason = holder.stale_reason(self.stale_after_s) if holder else None
        if holder is None or reason is None:
            raise self._held(holder)
        marker = f"{LEASE_PREFIX}-takeover-{holder.token}.json"
        if not self.store.create_exclusive(marker, self.me.to_bytes()):
            raise LeaseHeld(
                f"{self.store.url}: another run is taking over the stale lease of "
                f"{holder.describe()}: let it run, or stop it first"
            )
        self._marker = marker
        self.store.delete(LEASE)
        if not self.store.create_exclusive(LEASE, self.me.to_bytes()):
            self.store.delete(marker)
            raise self._held(Holder.parse(self.store.read_bytes(LEASE)))
        return f"took over the stale lease of {holder.describe()} ({reason})"

    def _current(self) -> Holder | None:
        try:
            return Holder.parse(self.store.read_bytes(LEASE))
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self._current()
                if current is None or current.token != self.me.token:
                    self.lost = current.describe() if current else "nobody (it was deleted)"
                    return
                fresh = Holder(**{**asdict(self.me), "heartbeat": time.time()})
                self.store.write_bytes(LEASE, fresh.to_bytes())
            except Exception:  # noqa: BLE001 - a missed beat is retried; staleness takes minutes
                continue

    def check(self) -> None:
        """Raise :class:`LeaseLost` once the heartbeat has found the lease held by another run."""
        if self.lost is not None:
            raise LeaseLost(
                f"{self.store.url}: this run's lease was taken over (now held by {self.lost}) "
                "after its heartbeat stalled; stopping so the two runs do not interleave"
            )

    def release(self) -> None:
        """Stop the heartbeat; delete the lease if it is still this run's, and the takeover mark."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = self._current()
        if current is not None and current.token == self.me.token:
            self.store.delete(LEASE)
        if self._marker:
            self.store.delete(self._marker)
            self._marker = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
