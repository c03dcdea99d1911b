"""A real S3 endpoint for the test session: ``moto_server`` on 127.0.0.1 and fresh buckets.

``s3_server`` (session) starts moto's HTTP server on a free port, waits until it answers, and
points the standard AWS variables at it for the whole session (dummy credentials, us-east-1,
shared config files redirected to an empty temp folder so a developer's ~/.aws is never read).
Subprocesses started by tests inherit these variables. Ray workers do not: they inherit the
environment of the ``ray start`` that created their raylet, so a Ray task that talks to S3 gets
:func:`s3_env` through ``runtime_env={"env_vars": s3_env()}``.

``s3_bucket`` (function) creates a uniquely named bucket and yields ``s3://<bucket>``; the bucket
and its objects are removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_ray import free_port, wait_for

#: Variables the fixture sets for the session (values are dummies for moto, not secrets).
S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)
#: Variables that would override the fixture's endpoint/credentials; removed for the session.
_UNSET = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
)


def moto_server_cmd() -> list[str]:
    """The moto[server] console script beside this interpreter, else ``python -m moto.server``."""
    script = Path(sys.executable).with_name("moto_server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]


def s3_env() -> dict[str, str]:
    """The AWS variables of the running ``s3_server`` session (for Ray ``runtime_env``)."""
    return {k: os.environ[k] for k in S3_ENV_KEYS if k in os.environ}


def _answers(endpoint: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{tail}")
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, whatever the status
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto_server on 127.0.0.1:<free port>, export the AWS variables, yield the endpoint."""
    tmp = Path(tempfile.mkdtemp(prefix="rdmoto-"))
    log = tmp / "moto.log"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [*moto_server_cmd(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    saved = {k: os.environ.get(k) for k in (*S3_ENV_KEYS, *_UNSET)}
    try:
        wait_for(
            lambda: _answers(endpoint, proc, log), timeout=60, interval=0.05, what="moto_server"
        )
        for k in _UNSET:
            os.environ.pop(k, None)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=str(tmp / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, uniquely named bucket on ``s3_server``; yields ``s3://<bucket>``."""
    import boto3

    client = boto3.session.Session().client("s3", endpoint_url=s3_server)
    name = f"rd-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    try:
        yield f"s3://{name}"
    finally:
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", ())
            for up in uploads:
                client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            client.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup of an in-memory server; never mask the test
            pass
        client.close()


@contextlib.contextmanager
def endpoint_ignoring_if_match() -> Iterator[None]:
    """The S3 client drops ``If-Match`` from PutObject while inside: an endpoint that ignores
    conditional writes (some S3-compatible stores do)."""
    from sharding.storage import s3_client

    client = s3_client()

    def drop_condition(request, **_kw) -> None:  # noqa: ANN001 - botocore's event signature
        if "If-Match" in request.headers:
            del request.headers["If-Match"]

    client.meta.events.register("before-sign.s3.PutObject", drop_condition)
    try:
        yield
    finally:
        client.meta.events.unregister("before-sign.s3.PutObject", drop_condition)
