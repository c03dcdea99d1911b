"""The cluster configs in ``cluster/``: checked by Ray's own validators, and the local one run.

* ``aws.yaml`` goes through what ``ray up`` does before it talks to AWS (``prepare_config``:
  defaults merged, then Ray's JSON schema ``ray-schema.json`` via ``validate_config``).
* ``kuberay.yaml`` goes through the converter the KubeRay autoscaler sidecar runs on a
  ``RayCluster`` (``_derive_autoscaling_config_from_ray_cr``, which also validates the result).
* ``local-autoscale.yaml`` is validated, then started for real: a head with Ray's fake multinode
  provider, a ``resdistill shard`` job submitted with ``ray job submit``, worker nodes added by
  the autoscaler for the slide tasks' ``shard`` resource, a complete dataset, and the workers
  removed again once idle. Everything binds to 127.0.0.1 on free ports and is torn down by
  killing this test's own process group and processes (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import yaml

from tests.dataset_checks import verify_dataset
from tests.fixtures_ray import free_port, kill_processes_mentioning, ray_bin, wait_for

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHARD_RESOURCE = "shard"
ROLE_LABEL = "resdistill/role"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def _worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


def _by_role(types: dict[str, dict]) -> dict[str, dict]:
    return {t.get("labels", {}).get(ROLE_LABEL): t for t in types.values()}


# --------------------------------------------------------------------------- static checks


def test_aws_config_passes_ray_up_preparation_and_schema() -> None:
    from ray.autoscaler._private.util import prepare_config

    raw = _load("aws.yaml")
    _validate(raw)
    prepared = prepare_config(raw)  # what `ray up` does before any AWS call
    _validate(prepared)
    assert prepared["provider"]["type"] == "aws"

    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("CPU") == 0
    assert SHARD_RESOURCE not in head["resources"]
    roles = _by_role(_worker_types(prepared))
    shard, train = roles["shard"], roles["train"]
    assert shard["resources"][SHARD_RESOURCE] >= 1 and "GPU" not in shard["resources"]
    # One slide task (1 CPU + shard 1) per vCPU.
    assert shard["resources"][SHARD_RESOURCE] == shard["resources"]["CPU"]
    assert train["resources"]["GPU"] >= 1 and SHARD_RESOURCE not in train["resources"]
    for node_type in (shard, train):
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
        assert node_type["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    assert prepared["max_workers"] >= shard["max_workers"]


def test_aws_config_installs_this_package_with_the_installed_ray() -> None:
    config = _load("aws.yaml")
    commands = "\n".join(config["setup_commands"])
    pins = re.findall(r"ray\[[a-z,]+\]==([0-9][0-9a-z.]*)", commands)
    assert pins == [ray.__version__]
    mounted = {remote: local for remote, local in config["file_mounts"].items()}
    assert mounted.get("~/resdistill") == "."  # the repository, synced by `ray up`
    assert re.search(r"pip install .*~/resdistill\b", commands)
    # The venv holding that Ray is the one the start commands run.
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "resdistill-venv/bin" in cmd
    assert any(
        "--head" in c and "--autoscaling-config" in c for c in config["head_start_ray_commands"]
    )


def test_kuberay_manifest_converts_to_a_valid_autoscaling_config() -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = _load("kuberay.yaml")
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cr["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay passes rayStartParams to `ray start` as strings only.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group
        assert group["template"]["spec"]["containers"][0]["image"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    shard_group = next(g for g in spec["workerGroupSpecs"] if g["labels"][ROLE_LABEL] == "shard")
    start_resources = shard_group["rayStartParams"]["resources"]
    # KubeRay's documented form: a JSON object wrapped in one more pair of double quotes.
    assert start_resources[0] == start_resources[-1] == '"'
    assert json.loads(start_resources[1:-1].replace("\\", "")) == {SHARD_RESOURCE: 16}

    # Nobody on the cluster network submits a job (code with the nodes' S3 role) unasked: the
    # dashboard listens on the head pod's loopback only (kubectl port-forward), and every Ray
    # process, the autoscaler included, runs with token auth and one token from one Secret.
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert "0.0.0.0" not in (CLUSTER / "kuberay.yaml").read_text()
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    tokens = set()
    for env in [spec["autoscalerOptions"]["env"], *(c.get("env", []) for c in containers)]:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token", env
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        tokens.add((ref["name"], ref["key"]))
    assert len(tokens) == 1

    config = _derive_autoscaling_config_from_ray_cr(cr)  # validates against ray-schema.json
    _validate(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and SHARD_RESOURCE not in head["resources"]
    roles = _by_role(_worker_types(config))
    assert roles["shard"]["resources"][SHARD_RESOURCE] == roles["shard"]["resources"]["CPU"] == 16
    assert roles["train"]["resources"]["GPU"] == 1
    assert SHARD_RESOURCE not in roles["train"]["resources"]
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60


def test_kuberay_image_is_built_on_the_installed_ray() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py311", dockerfile, re.M)
    assert base and base.group(1) == ray.__version__
    assert f'"ray[data,default,train,tune]=={ray.__version__}"' in dockerfile
    for copied in ("sharding", "resdistill", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(copied)}\b", dockerfile, re.M)


def test_local_autoscale_config_is_valid_and_needs_workers_for_shard_tasks() -> None:
    config = _load("local-autoscale.yaml")
    _validate(config)  # the monitor validates exactly this (no defaults merged for fake nodes)
    assert config["provider"]["type"] == "fake_multinode"
    # The documented `ray start --node-ip-address 127.0.0.1 --port 6379` is where workers go.
    assert config["provider"]["gcs_address"] == "127.0.0.1:6379"
    head = config["available_node_types"][config["head_node_type"]]
    assert SHARD_RESOURCE not in head["resources"] and head["max_workers"] == 0
    shard = _by_role(_worker_types(config))["shard"]
    assert shard["resources"][SHARD_RESOURCE] >= 1
    assert shard["min_workers"] == 0 < shard["max_workers"]
    assert config["idle_timeout_minutes"] <= 0.25  # tests wait for the scale-down


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=5) as resp:  # fmt: skip
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # not listening (yet)
        return 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kuberay_head_settings_refuse_a_job_api_call_without_the_token() -> None:
    """The installed Ray, started with the head's rayStartParams and auth environment from
    kuberay.yaml, answers its job API only with the token (401 without), and its health check
    (what KubeRay's probes call) without one."""
    head = _load("kuberay.yaml")["spec"]["headGroupSpec"]
    token = os.urandom(16).hex()
    env_names = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env_names["RAY_AUTH_MODE"]["value"] == "token"
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    tmp = Path(tempfile.mkdtemp(prefix="rdauth-", dir=base))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=str(tmp))
    env.pop("RAY_ADDRESS", None)
    params = head["rayStartParams"]
    dash = free_port()
    cmd = [
        ray_bin(), "start", "--head", "--block", "--port", str(free_port()),
        "--node-ip-address", "127.0.0.1", "--num-cpus", params["num-cpus"],
        "--dashboard-host", params["dashboard-host"], "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--temp-dir", str(tmp / "ray"), "--disable-usage-stats",
    ]  # fmt: skip
    log = (tmp / "ray-start.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for(lambda: _http_status(f"{url}/api/gcs_healthz") == 200 or proc.poll() is not None,
                 timeout=120, interval=0.5, what="the token-auth Ray head")  # fmt: skip
        assert proc.poll() is None, (tmp / "ray-start.log").read_text()[-3000:]
        assert _http_status(f"{url}/api/jobs/") == 401
        assert _http_status(f"{url}/api/jobs/", {"Authorization": f"Bearer {token}x"}) == 403
        assert _http_status(f"{url}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_processes_mentioning(str(tmp))
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_runtime_env_is_accepted_by_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**_load("runtime_env.yaml"))
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert ".venv/" in env["excludes"]


# --------------------------------------------------------------------------- the local cluster


@dataclass
class FakeCluster:
    """A running fake-multinode head: its GCS port, dashboard URL and temp folder."""

    gcs_port: int
    dashboard: str
    tmp: Path
    log: Path

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)

    def shard_nodes(self, state: str | None = None) -> list:
        return [
            n
            for n in self.nodes()
            if n.resources_total.get(SHARD_RESOURCE, 0) > 0 and (state is None or n.state == state)
        ]

    def logs(self) -> str:
        parts = [self.log.read_text(errors="replace")[-3000:]]
        monitor = next(self.tmp.glob("ray/session_*/logs/monitor.log"), None)
        if monitor is not None:
            parts.append(monitor.read_text(errors="replace")[-4000:])
        return "\n".join(parts)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    """``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster/local-autoscale.yaml``.

    The config is used as committed, plus ``provider.gcs_address``: the fake provider points its
    worker nodes at that address (default: port 6379), so the head can take a free port and
    test runs beside each other do not collide. Every other port is chosen free too.
    """
    # Short, whatever TMPDIR is: the head's and the fake nodes' unix sockets live under it, and
    # a socket path may not exceed 107 bytes (a longer TMPDIR left the head unable to start).
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    tmp = Path(tempfile.mkdtemp(prefix="rdas-", dir=base))
    gcs_port, dash_port = free_port(), free_port()
    config = _load("local-autoscale.yaml")
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    config_path = tmp / "autoscale.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]

    venv_bin = str(Path(sys.executable).parent)
    env = dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_TMPDIR=str(tmp),
        TMPDIR=str(tmp),
        # Job entrypoints run in the head's environment: `resdistill` must be on its PATH.
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
    )
    env.pop("RAY_ADDRESS", None)
    cmd = [
        ray_bin(), "start", "--head", "--block",
        f"--autoscaling-config={config_path}",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--num-cpus", str(head_cpus), "--num-gpus", "0",
        "--object-store-memory", str(200 * 1024 * 1024),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--temp-dir", str(tmp / "ray"), "--disable-usage-stats",
    ]  # fmt: skip
    log_path = tmp / "ray-start.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    cluster = FakeCluster(gcs_port, f"http://127.0.0.1:{dash_port}", tmp, log_path)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start failed:\n{cluster.logs()}")
            return _http_ok(f"{cluster.dashboard}/api/version") and any(
                tmp.glob("ray/session_*/logs/monitor.log")
            )

        wait_for(ready, timeout=120, interval=0.5, what="the fake-multinode Ray head")
        yield cluster
    finally:
        # The fake worker nodes are children of the autoscaler monitor, in this process group;
        # the sweep by temp folder catches any worker that left it. No `ray stop`.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        kill_processes_mentioning(str(tmp))
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_job_submit_shard_scales_up_and_back_down(fake_cluster: FakeCluster) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_tasks

    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    slides = fake_cluster.tmp / "slides"
    write_synthetic_slides(slides, 2, seed=11, size_um=(800.0, 600.0))
    out = fake_cluster.tmp / "dataset"
    assert not fake_cluster.shard_nodes(), "no shard worker before there is work"

    submission_id = "resdistill-shard-autoscale"
    submit = [
        ray_bin(), "job", "submit",
        "--address", fake_cluster.dashboard,
        "--submission-id", submission_id,
        "--runtime-env", str(CLUSTER / "runtime_env.yaml"),
        "--",
        "resdistill", "shard", str(slides), "--out", str(out),
        "--labels", str(slides / LABELS_CSV), "--mags", "10,5", "--tile-px", "64",
        "--address", "auto", "--resources", f"{SHARD_RESOURCE}=1", "--no-progress",
    ]  # fmt: skip
    # Submitted from the repository root: the runtime env's working_dir "." ships it.
    job = subprocess.Popen(
        submit, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Up: the slide tasks need `shard`, which only autoscaled worker nodes have.
        wait_for(
            lambda: fake_cluster.shard_nodes("ALIVE") or job.poll() is not None,
            timeout=120, interval=0.5, what="the autoscaler to add a shard worker node",
        )  # fmt: skip
        assert job.poll() is None or job.returncode == 0, job.stdout.read()
        assert fake_cluster.shard_nodes("ALIVE"), fake_cluster.logs()
        output, _ = job.communicate(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    client = JobSubmissionClient(fake_cluster.dashboard)
    status = client.get_job_status(submission_id)
    assert job.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"job {status}:\n{output[-4000:]}\n{fake_cluster.logs()}"
    )

    # The dataset is complete: every contract of the layout, both slides in it.
    report = verify_dataset(str(out), check_pixels=False)
    assert report["samples"] > 0
    assert len(report["slides"]) == 2

    # Every slide task ran on an autoscaled `shard` node, none on the head.
    shard_ids = {n.node_id for n in fake_cluster.shard_nodes()}
    assert all(n.labels.get(ROLE_LABEL) == "shard" for n in fake_cluster.shard_nodes()), (
        "shard nodes carry the role label from the config"
    )
    job_id = client.get_job_info(submission_id).job_id
    tasks = list_tasks(
        address=fake_cluster.dashboard,
        filters=[("job_id", "=", job_id), ("type", "=", "NORMAL_TASK")],
        detail=True,
        raise_on_missing_output=False,
    )
    assert tasks, "the job ran no Ray tasks"
    assert {t.node_id for t in tasks} <= shard_ids
    assert all(t.required_resources.get(SHARD_RESOURCE) == 1 for t in tasks)

    # Down: idle workers are removed after idle_timeout_minutes (6 s in the config).
    wait_for(
        lambda: not fake_cluster.shard_nodes("ALIVE"),
        timeout=90, interval=0.5, what="the autoscaler to remove the idle shard nodes",
    )  # fmt: skip
    assert fake_cluster.shard_nodes("DEAD"), "the added nodes are the ones removed"
