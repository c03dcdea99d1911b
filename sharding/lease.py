"""An exclusive lease on an output, so that two runs never write one output at once.

Any command that writes an output takes it, on a local folder or ``s3://`` alike::

    with acquire(store, "resdistill predict") as lease:   # LeaseHeld: one line, who and how to clear
        ...
        lease.check()          # before every publish: LeaseLost if the output is no longer ours
        store.write_bytes(...)

The lease is the member ``_state/lease.json`` (``member=`` names another). Whoever creates it with
:meth:`Storage.create_exclusive <sharding.storage>` holds it; the file names its holder (owner
description, host, pid, boot id, start time) and a heartbeat time that the holder rewrites every
``heartbeat_s`` seconds on a thread.

Taking over. A held lease is taken over only when its holder cannot be running:

- its heartbeat is older than ``stale_after_s``, whatever its pid, host or boot id say (hosts'
  clocks are trusted to agree within half that age). A pid proves nothing: a holder in another PID
  namespace (a container, ``unshare``) shows a pid that means nothing here;
- or it provably died on this machine (a ``kill -9``): its kernel lock on a token-named file,
  held for its lifetime, is free (:mod:`sharding.lease_holder`).

Conditional writes. Heartbeat, takeover and release are compare-and-swaps on the version read
(``Storage.replace_if`` / ``delete_if``: S3 ``If-Match`` on the ETag; a local folder swaps under a
kernel lock, see :mod:`sharding.storage.local`). Of racing takers exactly one wins; a holder that
beats between a taker's read and its write keeps its lease; a beat never overwrites a run that
took over.

A holder stops itself. A beat that finds the lease changed marks it lost. A beat that fails (a
network error) is logged and retried; once the last good beat is older than half the stale age,
the holder can no longer know that nobody took over, and marks it lost too. :meth:`Lease.check`
(before each publish: it also reads the lease) and :meth:`Lease.check_heartbeat` (no I/O, for
loops) then raise :class:`LeaseLost`, so the run stops before publishing anything more.

The lease is released (deleted if still its holder's) when the ``with`` block ends, on failure too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from .layout import STATE_DIR
from .lease_holder import Holder, clear_command, liveness_lock
from .storage import Storage

LEASE = f"{STATE_DIR}/lease.json"
#: Every member the lease machinery writes starts with this (``--overwrite`` keeps them).
LEASE_PREFIX = f"{STATE_DIR}/lease"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Another run holds the output; the message is one line naming it and how to clear it."""


class LeaseLost(Exception):
    """This run can no longer be sure it holds the output (taken over, or its heartbeat failed
    for half the stale age); it must stop writing."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class Lease:
    """The exclusive lease of one run on ``store`` (see the module docstring).

    ``acquire()`` takes it or raises :class:`LeaseHeld`; it returns (and keeps in ``note``) a
    line when it took over a stale lease. Use as a context manager so it is released however the
    run ends. ``owner`` says what holds it (``"resdistill shard"``), in the messages of others.
    """

    def __init__(
        self,
        store: Storage,
        owner: str = "",
        *,
        member: str = LEASE,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.store = store
        self.member = member
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.me = Holder.me(owner)
        self.note: str | None = None
        #: Why this run no longer holds the lease (a one-line message), once it does not.
        self.lost: str | None = None
        self._version = ""
        self._last_good = 0.0  # time.monotonic() of the last beat that stored our lease
        self._last_error = ""
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking it

    def acquire(self) -> str | None:
        self._lock_fd, lock = liveness_lock(self.me.token)
        self.me = replace(self.me, lock=lock)
        try:
            self._version = self._take()
            self._last_good = time.monotonic()
            # A first beat at once: an S3 endpoint that ignores If-Match fails here, not later.
            if not self._store_beat():
                raise LeaseHeld(self.lost)
        except BaseException:
            if self._version:
                with contextlib.suppress(Exception):  # the error being raised says more
                    self._delete_if_mine()
            self._drop_liveness_lock()
            raise
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self.note

    def _take(self) -> str:
        """Create the lease, or take a stale one over; the version stored. Sets ``note``."""
        holder: Holder | None = None
        for _ in range(3):  # a lease released or beaten meanwhile is looked at again
            if self.store.create_exclusive(self.member, self.me.to_bytes()):
                data, version = self.store.read_versioned(self.member)
                holder = Holder.parse(data)
                if holder is not None and holder.token == self.me.token:
                    return version
                continue
            try:
                data, version = self.store.read_versioned(self.member)
            except FileNotFoundError:
                continue
            holder = Holder.parse(data)
            if holder is None:
                raise self._unreadable()
            reason = holder.stale_reason(self.stale_after_s)
            if reason is None:
                raise self._held(holder)
            new = self.store.replace_if(self.member, self.me.to_bytes(), version)
            if new is not None:
                if holder.lock and holder.proven_gone():
                    Path(holder.lock).unlink(missing_ok=True)
                self.note = f"took over the stale lease of {holder.describe()} ({reason})"
                return new
        raise self._held(holder)

    def _held(self, holder: Holder | None) -> LeaseHeld:
        who = f"another '{holder.owner}' run" if holder and holder.owner else "another run"
        what = f" ({holder.describe()})" if holder else ""
        return LeaseHeld(
            f"{self.store.url} is in use by {who}{what}: wait for it to finish; if it is gone, "
            f"the next run takes it over once its heartbeat is {self.stale_after_s / 60:g} min "
            f"old, or clear it now with: {clear_command(self.store.child_url(self.member))}"
        )

    def _unreadable(self) -> LeaseHeld:
        where = self.store.child_url(self.member)
        return LeaseHeld(
            f"{where} is not a lease this version can read, so nothing can tell whether a run "
            f"still writes {self.store.url}: if none does, clear it with: {clear_command(where)}"
        )

    # ------------------------------------------------------------------ holding it

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self._beat_once():
            pass

    def _store_beat(self) -> bool:
        """Store a fresh heartbeat if the lease is still ours; False (and ``lost``) once it is
        not. Storage errors propagate."""
        fresh = replace(self.me, heartbeat=time.time())
        new = self.store.replace_if(self.member, fresh.to_bytes(), self._version)
        if new is None:  # changed: taken over, deleted, or our own last write not seen as done
            try:
                data, new = self.store.read_versioned(self.member)
            except FileNotFoundError:
                data = b""
            holder = Holder.parse(data)
            if holder is None or holder.token != self.me.token:
                self._taken_over(holder)
                return False
        self._version = new
        self._last_good = time.monotonic()
        return True

    def _beat_once(self) -> bool:
        """One heartbeat of the thread; False once the lease is lost."""
        if self.lost is not None:
            return False
        try:
            return self._store_beat()
        except Exception as exc:  # noqa: BLE001 - reported, retried, bounded by the stale age
            self._last_error = _one_line(exc)
            log.warning(
                "%s: the lease's heartbeat failed (%s); retrying every %g s",
                self.store.url,
                self._last_error,
                self.heartbeat_s,
            )
            return self._silent_for() is None

    def _taken_over(self, holder: Holder | None) -> None:
        who = holder.describe() if holder else "nobody: it was deleted or overwritten"
        self.lost = (
            f"{self.store.url}: this run's lease was taken over (now held by {who}); stopping "
            "so that two runs never write one output"
        )

    def _silent_for(self) -> str | None:
        """Mark the lease lost once the last good beat is older than half the stale age."""
        silent = time.monotonic() - self._last_good
        if self.lost is None and silent > self.stale_after_s / 2:
            err = f" (last error: {self._last_error})" if self._last_error else ""
            self.lost = (
                f"{self.store.url}: the lease's heartbeat has not been stored for {silent:.0f} s"
                f"{err}, so another run may take the output over: stopping before anything more "
                "is published: rerun to resume"
            )
        return self.lost

    def check_heartbeat(self) -> None:
        """No I/O: raise :class:`LeaseLost` once the lease is lost or its last good beat is
        older than half the stale age (a beat stuck in a hung call counts as failing)."""
        if self._silent_for() is not None:
            raise LeaseLost(self.lost)

    def check(self) -> None:
        """Before publishing: :meth:`check_heartbeat`, then read the lease and raise
        :class:`LeaseLost` unless it still names this run. A read that fails is logged and
        trusted to the heartbeat's age (no other run can take over before the stale age)."""
        self.check_heartbeat()
        try:
            holder = Holder.parse(self.store.read_versioned(self.member)[0])
        except FileNotFoundError:
            holder = None
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("%s: could not read the lease (%s)", self.store.url, _one_line(exc))
            return
        if holder is None or holder.token != self.me.token:
            if self.lost is None:
                self._taken_over(holder)
            raise LeaseLost(self.lost)

    # ------------------------------------------------------------------ letting it go

    def release(self) -> None:
        """Stop the heartbeat; delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self._delete_if_mine()
        except Exception as exc:  # noqa: BLE001 - it goes stale; the run's own error matters more
            log.warning(
                "%s: could not release the lease (%s); the next run takes it over once it is stale",
                self.store.url,
                _one_line(exc),
            )
        self._drop_liveness_lock()

    def _delete_if_mine(self) -> None:
        try:
            data, version = self.store.read_versioned(self.member)
        except FileNotFoundError:
            return
        holder = Holder.parse(data)
        if holder is not None and holder.token == self.me.token:
            self.store.delete_if(self.member, version)

    def _drop_liveness_lock(self) -> None:
        if self._lock_fd is not None:
            Path(self.me.lock).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(
    store: Storage,
    owner: str,
    *,
    member: str = LEASE,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
) -> Lease:
    """Take the lease on ``store`` for ``owner`` (``"resdistill predict"``): a held
    :class:`Lease` to use as a context manager; :class:`LeaseHeld` when another run holds it."""
    lease = Lease(store, owner, member=member, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)
    lease.acquire()
    return lease
