"""The world the chaos check (``benchmarks/chaos.py``) runs its commands in, and takes down after.

:class:`World` starts, each in a process group of its own and all on 127.0.0.1: a moto S3 server
with one bucket, a :class:`tests.fault_proxy.FaultProxy` in front of it (the endpoint every
command and every Ray worker is given, so their S3 reads can be broken mid-body), and one Ray
head that every Ray-based command joins with ``--address`` (a local Ray per command would cost
its start-up and leave nothing shared to go wrong). This process itself talks to moto directly,
so polling for kill markers and checking outputs never spends or meets a fault.

Closing stops exactly what it started: the Ray head's and moto's process groups (SIGKILL: the
cluster is throw-away, and a graceful Ray stop takes a minute), never another Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.fault_proxy import FaultProxy
from tests.fixtures_ray import free_port, ray_bin, wait_for
from tests.fixtures_s3 import moto_server_cmd

BUCKET = "chaos"
#: Seconds an S3 read waits for its next byte: what a stalled connection costs per fault.
READ_TIMEOUT_S = 5
#: Dummy credentials for moto (not secrets); a developer's ~/.aws is never read.
_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_AWS_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN")
#: Longest path Ray appends to its ``--temp-dir``: ``/session_<date>_<time>_<usec>_<7-digit pid>``
#: then ``/sockets/dash_TaskEventsHead`` (its longest dashboard module socket).
RAY_SUFFIX_LEN = len("/session_2026-12-07_07-47-04_400380_1234567/sockets/dash_TaskEventsHead")
#: Linux's AF_UNIX path limit less its terminating NUL (Ray checks the same bound).
SOCKET_PATH_MAX = 107


#: What :class:`World` puts between that folder and Ray's session: ``/rc-<8 random>/r<attempt>``.
WORLD_LEAF_LEN = len("/rc-12345678/r9")


def short_temp_root() -> str:
    """The folder to make the chaos temp folder in: the temp folder when a Ray session under it
    (``WORLD_LEAF_LEN`` more characters) keeps every socket path within :data:`SOCKET_PATH_MAX`,
    else ``/tmp``. A longer path makes a dashboard module die at start ("Module ... failed to
    start. Received EOF from pipe")."""
    base = tempfile.gettempdir()
    fits = len(os.fsencode(base)) + WORLD_LEAF_LEN + RAY_SUFFIX_LEN <= SOCKET_PATH_MAX
    return base if fits else "/tmp"


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """True while a process (not a zombie) of process group ``pgid`` is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def stop_group(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGKILL) -> None:
    """Signal ``proc``'s process group (it was started in a session of its own) and reap it."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


class World:
    """The working folder, moto, the fault proxy and the Ray head; a context manager.

    ``env`` is what every command runs with (S3 through the proxy, a short read timeout, Ray's
    temp folder and 127.0.0.1-only settings); ``address`` is the Ray head's; ``proxy`` is armed
    per command (:meth:`FaultProxy.arm`).
    """

    def __init__(self, workdir: Path, ray_cpus: int) -> None:
        self.workdir = workdir
        # Ray's session lives at <tmp>/r<attempt>: short, for its socket paths (see short_temp_root)
        self.tmp = Path(tempfile.mkdtemp(prefix="rc-", dir=short_temp_root()))
        self.ray_cpus = ray_cpus
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proxy: FaultProxy | None = None
        self.address = ""
        self.env: dict[str, str] = {}
        self.s3 = ""

    def __enter__(self) -> World:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _start(self) -> None:
        (self.tmp / "aws").mkdir()
        for key in _AWS_UNSET:
            os.environ.pop(key, None)
        os.environ.update(_AWS, AWS_CONFIG_FILE=str(self.tmp / "aws" / "config"),
                          AWS_SHARED_CREDENTIALS_FILE=str(self.tmp / "aws" / "credentials"))  # fmt: skip
        port = free_port()
        self.s3 = f"http://127.0.0.1:{port}"
        moto = self._spawn([*moto_server_cmd(), "-H", "127.0.0.1", "-p", str(port)], "moto", {})
        wait_for(lambda: moto.poll() is None and _answers(self.s3), 60, 0.05, "moto_server")
        os.environ["AWS_ENDPOINT_URL"] = self.s3  # this process: straight to moto
        import boto3

        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        self.proxy = FaultProxy(self.s3, mode="reset", after=0, times=0).__enter__()
        self.env = {
            **os.environ,
            "AWS_ENDPOINT_URL": self.proxy.endpoint,
            "RESDISTILL_S3_READ_TIMEOUT": str(READ_TIMEOUT_S),
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": str(self.tmp),
            "TMPDIR": str(self.tmp),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        # Ray Train's placement-group cleaner finds "the" cluster through the State API; with
        # other Rays on the machine it would ask the newest one whether our controller lives.
        self.address = f"127.0.0.1:{free_port()}"
        self.env["RAY_ADDRESS"] = self.address
        self._start_ray()

    def _spawn(self, cmd: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env or None,
                                    start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def _start_ray(self, attempts: int = 2) -> None:
        """Start the Ray head; a head that exits while starting is started again, once: on a
        loaded machine its dashboard can die before it is up, which says nothing of the code
        under test (attempt n logs to ``ray-<n>.log``, its session under ``r<n>/``)."""
        port = self.address.rsplit(":", 1)[1]
        for attempt in range(1, attempts + 1):
            ports = {flag: str(free_port()) for flag in (
                "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--metrics-export-port",
                "--runtime-env-agent-port")}  # fmt: skip
            cmd = [ray_bin(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                   "--port", port, "--num-cpus", str(self.ray_cpus), "--num-gpus", "0",
                   "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                   "--temp-dir", str(self.tmp / f"r{attempt}"), "--disable-usage-stats",
                   *(x for kv in ports.items() for x in kv)]  # fmt: skip
            head = self._spawn(cmd, f"ray-{attempt}", self.env)

            def ready(head: subprocess.Popen[bytes] = head, n: int = attempt) -> bool:
                if head.poll() is not None:
                    log = (self.tmp / f"ray-{n}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"ray start failed:\n{log}")
                return any((self.tmp / f"r{n}").glob("session_*/logs/raylet.out"))

            try:
                wait_for(ready, timeout=180, interval=0.2, what="the Ray head to start")
                return
            except RuntimeError:
                stop_group(head)
                if attempt == attempts:
                    raise
                print(f"[chaos] the Ray head exited while starting; starting it again "
                      f"(attempt {attempt + 1} of {attempts})", flush=True)  # fmt: skip

    def close(self) -> None:
        """Stop the proxy, the Ray head's and moto's process groups; remove the temp folder."""
        if self.proxy is not None:
            self.proxy.close()
        for proc in reversed(self.procs):
            stop_group(proc)
        # Ray's processes all live in the head's group: gone before their temp folder goes.
        for proc in self.procs:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda p=proc: not group_alive(p.pid), 60, 0.1, "its group to end")
        shutil.rmtree(self.tmp, ignore_errors=True)
