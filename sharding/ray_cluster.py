"""One Ray start-up policy for every driver of the project (sharding, training, tuning).

:func:`ray_init` connects to ``address`` when given, else to the cluster of a submitted job
(``RAY_ADDRESS``), else starts a local Ray bound to 127.0.0.1. The driver's non-secret AWS
settings (endpoint, region, profile name, config file paths; :data:`AWS_ENV_FORWARD`) travel to
every task and actor of the job through its ``runtime_env``, so workers reach the same ``s3://``
endpoint as the driver. Credentials never do (the dashboard shows a job's runtime_env): each
node authenticates with its own chain (instance role, environment of ``ray start``, its
``~/.aws`` files or the forwarded profile). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set first: with it Ray (and the DDP rendezvous
address Ray Train picks) stays on the node's IP, 127.0.0.1 locally, instead of any interface.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

#: AWS settings forwarded from the driver to the job's workers: where S3 is and which profile or
#: config files to read, never a secret (a job's runtime_env is shown by the dashboard and the
#: State API). Workers authenticate with their node's own credential chain.
AWS_ENV_FORWARD = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)

#: Credentials that never travel in a runtime_env.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_STARTED_LOCAL = False


def forwarded_env(keys: Sequence[str] = AWS_ENV_FORWARD) -> dict[str, str]:
    """The variables of ``keys`` set in this process, secrets (:data:`SECRET_ENV`) never."""
    return {k: os.environ[k] for k in keys if os.environ.get(k) and k not in SECRET_ENV}


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (0 when Ray is not started)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def ray_init(
    address: str | None = None,
    *,
    forward_env: bool = True,
    num_cpus: int | None = None,
    dashboard: bool = True,
    log_to_driver: bool = True,
) -> bool:
    """Connect this driver to Ray; True when this call started a local Ray (the caller owns it).

    ``address`` if given, else the job's cluster (``RAY_ADDRESS``), else a local Ray on
    127.0.0.1 with ``num_cpus`` CPUs (default: all) and, with ``dashboard``, its dashboard (the
    State API, which Ray Train's placement-group cleaner polls) on a free loopback port.
    With ``forward_env`` the AWS settings set here (never credentials) become the job's
    ``runtime_env`` env vars.
    When Ray is already initialised in this process it is kept if its job already carries these
    variables (and ``address``, when given, is the cluster it is connected to); otherwise this
    driver disconnects and connects again with them.
    """
    global _STARTED_LOCAL
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    env_vars = forwarded_env() if forward_env else {}
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        current = (ctx.runtime_env or {}).get("env_vars") or {}
        same_env = all(current.get(k) == v for k, v in env_vars.items())
        same_cluster = not address or address in (ctx.gcs_address, "auto")
        if same_env and same_cluster:
            return False
        if not address and not _STARTED_LOCAL:
            address = ctx.gcs_address
        ray.shutdown()
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if not log_to_driver:
        kwargs["configure_logging"] = False
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    _STARTED_LOCAL = False
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):  # a local cluster: keep the driver on loopback too
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, **kwargs)
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return False
    if dashboard:
        kwargs.update(
            include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_local_port()
        )
    else:
        kwargs["include_dashboard"] = False
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(_node_ip_address="127.0.0.1", **kwargs)
    _STARTED_LOCAL = True
    return True
