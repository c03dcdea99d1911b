"""The exclusive lease on an output: the storage's exclusive create, takeover only of a lease whose
heartbeat is stale (or whose holder is provably dead on this machine), conditional heartbeats and
takeovers, a holder that stops itself, on a local folder and on the S3 endpoint. Real
``resdistill shard`` runs are in ``test_lease_runs.py``."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sharding.lease import LEASE, Lease, LeaseHeld, LeaseLost
from sharding.lease_holder import this_boot_id
from sharding.storage import StorageError, open_storage, s3_client
from tests.fixtures_ray import wait_for
from tests.fixtures_s3 import endpoint_ignoring_if_match

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def out_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty output: a folder under tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "ds")
    return f"{request.getfixturevalue('s3_bucket')}/datasets/ds"


# ------------------------------------------------------------------------- the storage primitive


def test_create_exclusive_has_one_winner(out_url: str) -> None:
    store = open_storage(out_url)
    wins: list[int] = []
    start = threading.Barrier(8)

    def attempt(i: int) -> None:
        start.wait()
        if store.create_exclusive("_state/claim.json", f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.read_bytes("_state/claim.json") == f"writer {wins[0]}".encode()
    assert not store.create_exclusive("_state/claim.json", b"late")
    assert store.read_bytes("_state/claim.json") == f"writer {wins[0]}".encode()
    assert store.list("_state/") == ["_state/claim.json"]  # no temp file left behind


def test_endpoint_ignoring_the_condition_is_refused(s3_bucket: str) -> None:
    """An S3-compatible store that drops ``If-None-Match`` would let two runs both "create" the
    lease: it is refused with one line, never trusted."""
    client = s3_client()

    def drop_condition(request, **_kw) -> None:
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    client.meta.events.register("before-sign.s3.PutObject", drop_condition)
    try:
        with pytest.raises(StorageError, match=r"ignores conditional writes \(If-None-Match"):
            open_storage(s3_bucket).create_exclusive("_state/lease.json", b"x")
    finally:
        client.meta.events.unregister("before-sign.s3.PutObject", drop_condition)


def test_endpoint_ignoring_if_match_is_refused_when_the_lease_is_taken(s3_bucket: str) -> None:
    """Heartbeats are ``If-Match`` writes: an endpoint that drops the condition is refused when
    the run starts (not minutes later), and the refused run leaves no lease behind."""
    store = open_storage(f"{s3_bucket}/ds")
    with (
        endpoint_ignoring_if_match(),
        pytest.raises(StorageError, match=r"ignores conditional writes \(If-Match"),
    ):
        Lease(store).acquire()
    assert store.list() == []


# ------------------------------------------------------------------------- takeover


def _write_holder(store, **changes) -> dict:
    """Another run's lease file, written as a holder writes it."""
    now = time.time()
    fields = dict(token="other", host="elsewhere", pid=1, boot_id="", started=now, heartbeat=now)
    fields.update(changes)
    store.write_bytes(LEASE, json.dumps(fields).encode())
    return fields


def _token(store) -> str:
    return json.loads(store.read_bytes(LEASE))["token"]


def test_fresh_lease_refused_stale_ones_taken_over(out_url: str) -> None:
    store = open_storage(out_url)
    _write_holder(store)  # another host, heartbeat now
    with pytest.raises(LeaseHeld) as info:
        Lease(store).acquire()
    line = str(info.value)
    assert "\n" not in line and "pid 1 on elsewhere" in line and store.child_url(LEASE) in line
    assert _token(store) == "other", "a refused run changes nothing"

    _write_holder(store, heartbeat=time.time() - 3600)  # another host, silent for an hour
    with Lease(store) as lease:
        assert "heartbeat is 60 min old" in lease.acquire()
        assert _token(store) == lease.me.token
    assert not store.exists(LEASE) and store.list("_state/") == []


def test_fresh_heartbeat_is_never_taken_over_whatever_the_pid_says(out_url: str) -> None:
    """A holder in another PID namespace (a container, ``unshare``) shows a pid this run cannot
    see, and one on a host with another boot id looks "restarted"; while its heartbeat is fresh it
    is alive, and taking its lease over would let two runs write one output."""
    store = open_storage(out_url)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for holder in (
        dict(
            host=socket.gethostname(), pid=gone.pid, boot_id=this_boot_id()
        ),  # pid not visible here
        dict(host=socket.gethostname(), pid=gone.pid, boot_id="another-boot"),
    ):
        _write_holder(store, **holder)
        with pytest.raises(LeaseHeld, match="is in use by another"):
            Lease(store).acquire()
        assert _token(store) == "other", holder


HOLD = """
import sys
from sharding.lease import Lease
from sharding.storage import open_storage
Lease(open_storage(sys.argv[1]), heartbeat_s=0.2).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _holder(out_url: str, *prefix: str) -> subprocess.Popen:
    """A process holding the lease (beating every 0.2 s) until it is killed."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", HOLD, out_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_killed_holders_lease_is_taken_over_at_once(out_url: str) -> None:
    """A holder killed with ``kill -9`` on this machine is provably gone (its lock is free): the
    next run need not wait out the stale age."""
    store = open_storage(out_url)
    proc = _holder(out_url)
    with pytest.raises(LeaseHeld):
        Lease(store).acquire()
    proc.kill()
    proc.wait(timeout=30)
    with Lease(store) as lease:
        assert f"took over the stale lease of pid {proc.pid}" in lease.acquire()
        assert "gone" in lease.note


def _unshare_works() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-rpf", "--mount-proc", "true"], timeout=30).returncode == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged PID namespaces (unshare)")
def test_holder_in_another_pid_namespace(tmp_path: Path) -> None:
    """A real holder in its own PID namespace (it records pid 1): refused while it beats, taken
    over at once after ``kill -9``, whatever its pid means here."""
    out = str(tmp_path / "ds")
    store = open_storage(out)
    proc = _holder(out, "unshare", "-rpf", "--mount-proc")
    try:
        assert json.loads(store.read_bytes(LEASE))["pid"] == 1
        with pytest.raises(LeaseHeld):
            Lease(store).acquire()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)  # the namespace's pid 1: all of it goes
        proc.wait(timeout=30)
        with Lease(store) as lease:
            assert "took over the stale lease of pid 1 on" in lease.acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)


class Interleaved:
    """A real store on which another run's write of the lease lands at the worst moment: right
    after this run read it (``after_read``) or right before this run writes it (``before_write``).
    """

    def __init__(self, store, *, after_read=None, before_write=None) -> None:
        self.store, self.after_read, self.before_write = store, after_read, before_write

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def _fire(self, which: str, rel: str) -> None:
        hook = getattr(self, which)
        if hook is not None and rel == LEASE:
            setattr(self, which, None)
            hook()

    def read_bytes(self, rel: str) -> bytes:
        data = self.store.read_bytes(rel)
        self._fire("after_read", rel)
        return data

    def read_versioned(self, rel: str):
        out = self.store.read_versioned(rel)
        self._fire("after_read", rel)
        return out

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._fire("before_write", rel)
        self.store.write_bytes(rel, data)

    def replace_if(self, rel: str, data: bytes, version: str):
        self._fire("before_write", rel)
        return self.store.replace_if(rel, data, version)


def test_takeover_is_conditional(out_url: str) -> None:
    """The holder beats between the taker's read (stale) and its write: the taker must not win."""
    store = open_storage(out_url)
    stale = _write_holder(store, heartbeat=time.time() - 3600)
    racing = Interleaved(
        store, after_read=lambda: _write_holder(store, **{**stale, "heartbeat": time.time()})
    )
    with pytest.raises(LeaseHeld, match="is in use by another"):
        Lease(racing).acquire()
    assert _token(store) == "other"
    assert json.loads(store.read_bytes(LEASE))["heartbeat"] > time.time() - 60


def test_heartbeat_is_conditional(out_url: str) -> None:
    """Another run takes the lease over just before the holder's heartbeat writes: the beat must
    not overwrite it, and the holder must stop."""
    store = open_storage(out_url)
    racing = Interleaved(store)
    lease = Lease(racing, heartbeat_s=0.05)
    lease.acquire()
    try:
        racing.before_write = lambda: _write_holder(store, token="taker")
        wait_for(lambda: _raises(lease.check), timeout=10, what="the holder to see the takeover")
        assert racing.before_write is None, "the takeover happened inside a heartbeat"
    finally:
        lease.release()
    assert _token(store) == "taker", "the heartbeat overwrote the run that took over"


def _raises(check) -> str:
    try:
        check()
    except LeaseLost as exc:
        return str(exc)
    return ""


# ------------------------------------------------------------------------- the holder stops


def test_lease_taken_from_a_stalled_holder_stops_it(tmp_path: Path) -> None:
    store = open_storage(tmp_path / "ds")
    lease = Lease(store, heartbeat_s=0.05)
    lease.acquire()
    try:
        lease.check()
        _write_holder(store, token="newcomer")
        wait_for(lambda: lease.lost, timeout=10, what="the heartbeat to notice")
        with pytest.raises(LeaseLost, match="taken over"):
            lease.check()
    finally:
        lease.release()
    assert _token(store) == "newcomer", "not ours to delete"


def test_check_before_publishing_sees_a_takeover_at_once(out_url: str) -> None:
    """``check()`` reads the lease: a run publishing every few seconds must not wait for its next
    heartbeat (30 s) to learn that another run holds the output."""
    store = open_storage(out_url)
    with Lease(store) as lease:
        lease.acquire()
        lease.check()
        _write_holder(store, token="newcomer")
        with pytest.raises(LeaseLost, match="taken over") as info:
            lease.check()
        assert "\n" not in str(info.value) and store.url in str(info.value)
    assert _token(store) == "newcomer"


def test_a_holder_whose_heartbeats_fail_stops_itself(
    s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Once its last good beat is older than half the stale age, the holder cannot know that the
    lease is still its own: it stops (one line naming the error), and each failure is logged."""
    store = open_storage(f"{s3_bucket}/ds")
    client = s3_client()

    def reset(request, **_kw) -> None:
        raise ConnectionResetError("connection reset by peer (test)")

    lease = Lease(store, heartbeat_s=0.05, stale_after_s=4.0)
    lease.acquire()
    try:
        lease.check()
        with caplog.at_level(logging.WARNING, logger="sharding.lease"):
            client.meta.events.register("before-sign.s3.PutObject", reset)
            try:
                message = wait_for(
                    lambda: _raises(lease.check), timeout=20, what="the holder to stop itself"
                )
            finally:
                client.meta.events.unregister("before-sign.s3.PutObject", reset)
        assert "heartbeat" in message and "connection reset by peer (test)" in message
        assert "\n" not in message
        assert any("connection reset by peer" in r.getMessage() for r in caplog.records)
        lost_at = time.monotonic()
        wait_for(lambda: time.monotonic() - lost_at > 0.2, what="a few more beat periods")
        assert _raises(lease.check), "a holder that stopped stays stopped"
    finally:
        lease.release()


# ------------------------------------------------------------------------- messages and the API


def test_unparseable_lease_names_the_command_that_clears_it(out_url: str) -> None:
    store = open_storage(out_url)
    store.write_bytes(LEASE, b"{not json")
    with pytest.raises(LeaseHeld) as info:
        Lease(store).acquire()
    line = str(info.value)
    target = shlex.quote(store.child_url(LEASE))
    command = f"aws s3 rm {target}" if out_url.startswith("s3://") else f"rm {target}"
    assert "\n" not in line and command in line, line
    assert "heartbeat" not in line, "it has no heartbeat to wait for"
    assert store.read_bytes(LEASE) == b"{not json", "never cleared without being asked"


def test_acquire_is_a_context_manager_for_any_command(out_url: str) -> None:
    from sharding.lease import acquire

    store = open_storage(out_url)
    with acquire(store, "resdistill predict") as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == "resdistill predict"
        lease.check()
        with pytest.raises(LeaseHeld, match="in use by another 'resdistill predict' run"):
            acquire(store, "resdistill teacher")
    assert not store.exists(LEASE)
    with pytest.raises(RuntimeError), acquire(store, "resdistill predict"):
        raise RuntimeError("the command failed")
    assert not store.exists(LEASE), "released however the command ends"
