"""The chaos check (``benchmarks/chaos.py``): its harness keeps every subprocess within a bound
and kills whole process groups at a marker, the fault proxy re-arms between commands, and the
quick run (a kill -9 and a rerun of each of shard, teacher, teacher-targets, distill and predict,
S3 reads broken mid-body) leaves outputs equal to uninterrupted runs'."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from http.client import HTTPException
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.chaos import COMMANDS, Chaos, CheckFailed
from benchmarks.chaos_env import World
from tests.fault_proxy import FaultProxy

REPO = Path(__file__).resolve().parents[1]


def _chaos(tmp_path: Path, scale: float) -> Chaos:
    world = SimpleNamespace(env=dict(os.environ), proxy=None, address="")
    return Chaos(world, tmp_path, quick=True, seed=0, scale=scale)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


#: What Ray appends to ``--temp-dir`` at most: its session (7-digit pid) and the longest socket.
_RAY_SUFFIX = "/session_2026-12-07_07-47-04_400380_1234567/sockets/dash_TaskEventsHead"


@pytest.mark.parametrize("depth", [0, 3])
def test_the_ray_session_fits_unix_socket_paths_under_a_long_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """Under a nested TMPDIR (a test session's own) the head's dashboard sockets must stay within
    Linux's 107-byte AF_UNIX limit, or a dashboard module dies at start and the head with it."""
    base = tmp_path.joinpath(*(["nested-temp-folder"] * depth))
    base.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr("tempfile.tempdir", str(base))
    world = World(tmp_path / "work", ray_cpus=2)
    try:
        assert len(os.fsencode(str(world.tmp / "r2") + _RAY_SUFFIX)) <= 107
    finally:
        world.close()


def test_a_command_past_its_bound_is_a_hang_naming_it(tmp_path: Path) -> None:
    chaos = _chaos(tmp_path, scale=1 / 120)  # shard's bound: 2 s
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    with pytest.raises(CheckFailed) as info:
        chaos.run("shard", argv, "sleeper")
    assert str(info.value).startswith("hang: ran past its 2 s bound: ")
    assert " ".join(argv) in str(info.value)


def test_a_kill_at_a_marker_takes_the_whole_group(tmp_path: Path) -> None:
    """The child starts a grandchild and writes a marker; the kill right after it takes both."""
    chaos = _chaos(tmp_path, scale=1 / 12)  # 20 s
    pids = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(120)\n"
    )
    line = chaos.kill_run("shard", [sys.executable, "-c", code], "group",
                          ("marker", "pids written"), pids.exists)  # fmt: skip
    assert re.fullmatch(r"marker 'pids written': killed at [\d.]+ s", line), line
    parent, child = (int(p) for p in pids.read_text().split())
    assert not _alive(parent) and not _alive(child)


def test_the_fault_proxy_re_arms_between_commands(s3_server: str, s3_bucket: str) -> None:
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    boto3.session.Session().client("s3").put_object(Bucket=bucket, Key="o", Body=os.urandom(300_000))  # fmt: skip

    with FaultProxy(s3_server, mode="reset", after=0, times=0) as proxy:
        client = boto3.session.Session().client("s3", endpoint_url=proxy.endpoint)
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "o"})

        def read() -> int:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return len(resp.read())

        assert read() == 300_000 and proxy.faults == 0  # unarmed: nothing broken
        for _ in range(2):  # each arm is a fresh budget of one fault
            proxy.arm("reset", after=100_000, times=1)
            with pytest.raises((OSError, HTTPException)):
                read()
            assert proxy.faults == 1
            assert read() == 300_000


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_chaos_run_leaves_outputs_equal_to_clean_runs(tmp_path: Path) -> None:
    """Each command killed once and rerun, S3 reads broken 2-4 times per run: every rerun
    exits 0 and its output equals the clean run's. About 2.5 minutes on an idle 2-core machine
    (Ray Train's start-up dominates), several times that on a loaded one."""
    res = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--quick", "--seed", "0", "--workdir",
         str(tmp_path / "chaos")],
        cwd=REPO, capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in COMMANDS]
    killed = {r[0] for r in rows if r[1] == "r1"}
    assert killed == set(COMMANDS), out
    assert all("ok:" in " ".join(r) for r in rows), out
    summary = re.search(r"^5 kill\(s\), 0 failure\(s\), (\d+) S3 fault\(s\) injected", out, re.M)
    assert summary and int(summary.group(1)) > 0, out  # reads were broken, and survived
    assert "killed at" in out, out  # at least one kill landed before its command ended
