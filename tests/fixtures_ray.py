"""A real local Ray cluster for the test session, bound to 127.0.0.1 and torn down at the end."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[str]:
    """Start ``ray start --head`` on 127.0.0.1 (2 CPUs), yield its GCS address, ``ray stop`` after.

    Tests hand the address to the code under test (``--address``) so every run connects to this
    cluster instead of paying for a fresh local Ray each time. It depends on ``s3_server`` so that
    Ray's workers inherit the S3 endpoint and dummy credentials from the environment.
    """
    tmp = Path(tempfile.mkdtemp(prefix="rdray-"))
    port = free_port()
    env = dict(os.environ, RAY_TMPDIR=str(tmp), TMPDIR=str(tmp))
    cmd = [
        ray_bin(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", str(max(2, os.cpu_count() or 2)), "--num-gpus", "0",
        "--include-dashboard", "false", "--temp-dir", str(tmp / "ray"), "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "TMPDIR")}
    os.environ["TMPDIR"] = str(tmp)
    try:
        yield address
    finally:
        subprocess.run([ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)
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
