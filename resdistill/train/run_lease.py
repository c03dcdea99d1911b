"""One writer per output: the lease every resdistill command that writes an output takes.

``teacher``/``distill`` take it on their run folder ``<storage>/<name>``, ``tune`` on its run
folder, ``teacher-targets`` on the targets root, ``predict`` on ``--out``, ``study`` on its
``--out`` (``shard`` takes its own on the dataset). A second run on a held output is refused at
once, in one line naming the holder and how to clear a dead one (:mod:`sharding.lease`: a
heartbeat thread keeps the lease while the run lives; a stale or provably dead holder's lease is
taken over). Before each publish a command calls :func:`check_lease`, so a run that lost its
lease stops before writing more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from resdistill.errors import UsageError


class LeaseLostError(UsageError):
    """This run no longer holds its output's lease (one line): it stopped before publishing."""


def output_lease(url: str, owner: str, note: Callable[[str], None] | None = None) -> Any:
    """The held :class:`sharding.lease.Lease` on the output ``url`` (a local folder or
    ``s3://``) for ``owner`` (``"resdistill teacher"``); use it as a context manager so that it
    is released however the run ends. Another live run holding it is a one-line
    :class:`UsageError`; a stale lease taken over is told to ``note``."""
    from sharding.lease import LeaseHeld, acquire
    from sharding.storage import open_storage

    try:
        lease = acquire(open_storage(url), owner)
    except LeaseHeld as exc:
        raise UsageError(str(exc)) from None
    if lease.note and note is not None:
        note(lease.note)
    return lease


def check_lease(lease: Any) -> None:
    """Before a publish: :meth:`Lease.check <sharding.lease.Lease.check>`, its ``LeaseLost``
    as a one-line :class:`LeaseLostError`."""
    from sharding.lease import LeaseLost

    try:
        lease.check()
    except LeaseLost as exc:
        raise LeaseLostError(str(exc)) from None
