"""What a driver hands Ray about AWS: settings only, never a secret (the dashboard shows a job's
runtime_env). Workers reach S3 with the credentials of their own node."""

from __future__ import annotations

import pytest

from sharding.ray_cluster import SECRET_ENV, forwarded_env, ray_init
from sharding.storage import open_storage


def test_secrets_are_not_forwarded_and_workers_still_reach_s3(
    s3_bucket: str, ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-must-not-travel")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    sent = forwarded_env()
    assert not set(sent) & set(SECRET_ENV)
    assert sent["AWS_ENDPOINT_URL"] and sent["AWS_REGION"] == "us-east-1"

    ray.shutdown()
    ray_init(ray_cluster)
    try:
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert key not in job_env, key
        assert job_env.get("AWS_ENDPOINT_URL") == sent["AWS_ENDPOINT_URL"]

        url = f"{s3_bucket}/from-worker"

        @ray.remote(num_cpus=0)
        def write(url: str) -> str | None:
            import os

            open_storage(url).write_bytes("hello.txt", b"hi")
            return os.environ.get("AWS_SESSION_TOKEN")

        # The node's own environment (the cluster was started with the endpoint's credentials)
        # authenticates the worker; the driver's session token never reached it.
        assert ray.get(write.remote(url)) is None
        assert open_storage(url).read_bytes("hello.txt") == b"hi"
    finally:
        ray.shutdown()
