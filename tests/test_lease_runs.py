"""The lease in real ``resdistill shard`` runs, on a local folder and on the S3 endpoint: a second
run is refused, a killed run's lease is taken over, and a run whose lease was taken over publishes
nothing more (no shard, no manifest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharding.lease import LEASE
from sharding.storage import open_storage
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


def _mid_run(store) -> bool:
    """The run holds the lease and has planned a slide (recorded before any tile is cut)."""
    return store.exists(LEASE) and bool(store.list("_state/slides/"))


def _stop_mid_run(cmd: list[str], store, **popen) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, **popen)
    wait_for(lambda: _mid_run(store), timeout=240, what="the run to start cutting")
    os.kill(proc.pid, signal.SIGSTOP)
    assert not store.exists("manifest.parquet"), "the run ended before it was stopped"
    return proc


def test_second_run_refused_while_the_first_holds_the_output(slides: Path, out_url: str) -> None:
    store = open_storage(out_url)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _stop_mid_run(shard_cmd(slides, out_url), store, **pipes)
    try:  # the first run is alive and holds the lease
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
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = _stop_mid_run(shard_cmd(slides, out), store, **quiet)
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


def test_a_run_whose_lease_was_taken_over_publishes_nothing_more(slides: Path, out_url: str):
    """The run is paused mid-way, another run takes its lease over, and the run resumes: before
    its next shard (and before the manifest) it finds the lease gone and stops with one line,
    leaving the other run's lease in place."""
    store = open_storage(out_url)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = _stop_mid_run(shard_cmd(slides, out_url), store, **pipes)
    try:
        shards = {n for n in store.list() if n.endswith(".tar")}
        now = time.time()
        taker = dict(token="taker", host="elsewhere", pid=7, boot_id="", started=now, heartbeat=now)
        store.write_bytes(LEASE, json.dumps(taker).encode())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if "taken over" in line]
    assert len(lines) == 1 and store.url in lines[0], err
    assert not store.exists("manifest.parquet"), "the manifest was written without the lease"
    later = {n for n in store.list() if n.endswith(".tar")} - shards
    assert len(later) <= 1, f"published after the takeover: {sorted(later)}"
    assert json.loads(store.read_bytes(LEASE))["token"] == "taker", "the other run keeps it"
