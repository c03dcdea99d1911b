"""A real local Ray cluster for the test session, bound to 127.0.0.1 and torn down at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def kill_processes_mentioning(text: str) -> int:
    """SIGKILL every process whose command line contains ``text``; returns how many."""
    killed = 0
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
            continue
        try:
            cmdline = (
                (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if text in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc_dir.name), signal.SIGKILL)
                killed += 1
    return killed


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[str]:
    """A Ray head on 127.0.0.1 (2 CPUs) for the session; yields its GCS address.

    Tests hand the address to the code under test (``--address``) so every run connects to this
    cluster instead of paying for a fresh local Ray each time. It depends on ``s3_server`` so that
    Ray's workers inherit the S3 endpoint and dummy credentials from the environment.

    ``ray start --block`` runs in its own process group and is stopped by signalling that group,
    never by ``ray stop`` (which would kill every Ray on the machine, other test runs' included).
    """
    tmp = Path(tempfile.mkdtemp(prefix="rdray-"))
    port = free_port()
    env = dict(os.environ, RAY_TMPDIR=str(tmp), TMPDIR=str(tmp))
    cmd = [
        ray_bin(),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        str(max(2, os.cpu_count() or 2)),
        "--num-gpus",
        "0",
        # The dashboard serves the State API, which Ray Train's placement-group cleaner polls to
        # free the group of a controller that died without cleaning up (a trial Tune stopped):
        # without it such groups hold their CPUs until the job ends. Local product runs start it too.
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(free_port()),
        "--temp-dir",
        str(tmp / "ray"),
        "--disable-usage-stats",
        # Every other listening port free too, so concurrent test sessions never collide.
        "--ray-client-server-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
    ]
    log = (tmp / "ray-start.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "TMPDIR")}
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start failed:\n{(tmp / 'ray-start.log').read_text()[-3000:]}"
                )
            return _port_open(port) and any((tmp / "ray").glob("session_*/logs/raylet.out"))

        wait_for(ready, timeout=180, what="the Ray head to start")
        os.environ["TMPDIR"] = str(tmp)
        yield address
    finally:
        # A driver still connected when its GCS dies makes Ray abort this process a minute later
        # ("Failed to connect to GCS"), failing the whole pytest run after every test passed.
        ray_module = sys.modules.get("ray")
        if ray_module is not None and ray_module.is_initialized():
            ray_module.shutdown()
        # A graceful stop of a head takes about a minute here; the cluster is throw-away, so
        # kill its process group, then any Ray process that still names our temp folder.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_processes_mentioning(str(tmp))
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
