"""One run at a time on a sharding output: the storage's exclusive create, the lease built on it,
and real ``resdistill shard`` runs on a local folder and on the S3 endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sharding.lease import LEASE, Holder, Lease, LeaseHeld, LeaseLost, _boot_id
from sharding.storage import StorageError, open_storage, s3_client
from tests.dataset_checks import verify_dataset
from tests.fixtures_ray import wait_for
from tests.slide_factory import blob_image, write_slide

MAGS = ["--mags", "20,10,5", "--tile-px", "128"]


@pytest.fixture(params=["local", "s3"])
def out_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty output: a folder under tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "ds")
    return f"{request.getfixturevalue('s3_bucket')}/datasets/ds"


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 40x slides, enough work that a run is still cutting after its first shards."""
    folder = tmp_path_factory.mktemp("lease-slides")
    for i in range(4):
        write_slide(folder / f"k{i}.svs", blob_image(3072, 2048, seed=30 + i), app_mag=40, mpp=0.25)
    return folder


def shard_cmd(slides: Path, out: str) -> list[str]:
    return [
        *(sys.executable, "-m", "resdistill", "shard", "--no-progress", str(slides)),
        *("--out", out, *MAGS, "--shard-size", "150KB", "--workers", "0"),
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


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


# ------------------------------------------------------------------------- the lease


def _write_holder(store, **changes) -> Holder:
    now = time.time()
    fields = dict(token="other", host="elsewhere", pid=1, boot_id="", started=now, heartbeat=now)
    holder = Holder(**{**fields, **changes})
    store.write_bytes(LEASE, holder.to_bytes())
    return holder


def test_fresh_lease_refused_stale_ones_taken_over(out_url: str) -> None:
    store = open_storage(out_url)
    _write_holder(store)  # another host, heartbeat now
    with pytest.raises(LeaseHeld) as info:
        Lease(store).acquire()
    line = str(info.value)
    assert "\n" not in line and "pid 1 on elsewhere" in line and store.child_url(LEASE) in line

    _write_holder(store, heartbeat=time.time() - 3600)  # another host, silent for an hour
    with Lease(store) as lease:
        assert "heartbeat is 60 min old" in lease.acquire()
        assert Holder.parse(store.read_bytes(LEASE)).token == lease.me.token
    assert not store.exists(LEASE) and store.list("_state/") == []

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_holder(store, host=socket.gethostname(), pid=gone.pid, boot_id=_boot_id())
    with Lease(store) as lease:
        assert f"process {gone.pid}" in lease.acquire()


def test_lease_taken_from_a_stalled_holder_stops_it(tmp_path: Path) -> None:
    store = open_storage(tmp_path / "ds")
    lease = Lease(store, heartbeat_s=0.05)
    lease.acquire()
    try:
        _write_holder(store, token="newcomer")
        wait_for(lambda: lease.lost, timeout=10, what="the heartbeat to notice")
        with pytest.raises(LeaseLost, match="taken over"):
            lease.check()
    finally:
        lease.release()
    assert Holder.parse(store.read_bytes(LEASE)).token == "newcomer", "not ours to delete"


# ------------------------------------------------------------------------- real runs


def _mid_run(store) -> bool:
    """The run holds the lease and has planned a slide (recorded before any tile is cut)."""
    return store.exists(LEASE) and bool(store.list("_state/slides/"))


def test_second_run_refused_while_the_first_holds_the_output(slides: Path, out_url: str) -> None:
    store = open_storage(out_url)
    first = subprocess.Popen(
        shard_cmd(slides, out_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: _mid_run(store), timeout=240, what="the first run to start cutting")
        os.kill(first.pid, signal.SIGSTOP)  # the first run is alive and holds the lease
        assert not store.exists("manifest.parquet"), "the first run ended before the check"
        second = run(shard_cmd(slides, out_url))
        assert second.returncode == 2, second.stderr
        msg = " ".join(second.stderr.split())
        assert f"is in use by another 'resdistill shard' run (pid {first.pid} on" in msg
        assert store.child_url(LEASE) in msg
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not store.exists(LEASE), "the lease is released at the end"
    verify_dataset(out_url, check_pixels=False)
    again = run(shard_cmd(slides, out_url))
    assert again.returncode == 0 and "4 slide(s) already done" in again.stderr


def test_sigterm_releases_and_a_killed_runs_lease_is_taken_over(slides: Path, tmp_path: Path):
    out = str(tmp_path / "ds")
    store = open_storage(out)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            shard_cmd(slides, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _mid_run(store), timeout=240, what="the run to start cutting")
        os.kill(proc.pid, signal.SIGSTOP)
        assert not store.exists("manifest.parquet"), "the run ended before the signal"
        proc.send_signal(sig)  # a stopped process takes SIGTERM when continued
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=60)
        assert not store.exists("manifest.parquet")
        assert store.exists(LEASE) == (sig == signal.SIGKILL), signal.Signals(sig).name
    rerun = run(shard_cmd(slides, out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"took over the stale lease of pid {proc.pid}" in " ".join(rerun.stderr.split())
    assert not store.exists(LEASE)
    verify_dataset(out, check_pixels=False)
