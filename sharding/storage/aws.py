"""The AWS side of storage: the per-process boto3 S3 client, the pyarrow S3 filesystem, and the
translation of botocore errors into the one-line errors users see.

Endpoint and credentials come only from the standard AWS chain (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the
config files, instance roles, ...). Nothing here stores or prints a secret. boto3 clients are not
fork-safe, so :func:`s3_client` builds one lazily per process (keyed by ``os.getpid()`` and the
endpoint-related environment).
"""

from __future__ import annotations

import os
import threading
from typing import Any
from urllib.parse import urlparse

from sharding.storage.base import (
    BucketNotFoundError,
    StorageError,
    is_remote,
    local_path,
    split_s3_url,
)

#: Seconds a request to S3 (a body read included) waits for the next bytes before it fails,
#: so a stalled connection never hangs a reader (:mod:`sharding.storage.s3_read` resumes it).
READ_TIMEOUT_ENV = "RESDISTILL_S3_READ_TIMEOUT"
DEFAULT_READ_TIMEOUT = 60.0
#: Environment variables that change which endpoint/account a new client talks to.
_CLIENT_ENV = (
    READ_TIMEOUT_ENV,
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def read_timeout() -> float:
    """``$RESDISTILL_S3_READ_TIMEOUT`` (seconds), else :data:`DEFAULT_READ_TIMEOUT`."""
    from .base import positive_env

    return positive_env(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT, float, "seconds")


def s3_client() -> Any:
    """The boto3 S3 client of this process, created on first use.

    Cached per ``os.getpid()`` (a forked child never reuses its parent's connection pool) and per
    endpoint-related environment (so a test that points ``AWS_ENDPOINT_URL`` elsewhere gets a new
    client). Configuration comes only from the standard AWS chain.
    """
    key = (os.getpid(), *(os.environ.get(k) for k in _CLIENT_ENV))
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            client = session.client(
                "s3",
                config=Config(
                    retries={"mode": "standard", "max_attempts": 5},
                    max_pool_connections=16,
                    read_timeout=read_timeout(),
                ),
            )
            _clients[key] = client
    return client


def arrow_filesystem(url: str | os.PathLike[str]) -> tuple[str, Any]:
    """``(path, pyarrow filesystem)`` for a storage URL, as Ray's ``storage_path`` /
    ``storage_filesystem`` want them.

    ``s3://bucket/prefix`` -> ``("bucket/prefix", pyarrow.fs.S3FileSystem)`` configured from the
    same standard AWS environment as :func:`s3_client`: the endpoint from ``AWS_ENDPOINT_URL_S3``
    or ``AWS_ENDPOINT_URL`` (split into scheme and host:port, as pyarrow wants), the region from
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; credentials are resolved by the AWS SDK where the
    filesystem is used, never embedded. A local path -> its absolute path (created) and ``None``
    (Ray's local filesystem).
    """
    text = os.fspath(url)
    if not is_remote(text):
        path = local_path(text)
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    bucket, prefix = split_s3_url(text)
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc.rsplit("@", 1)[-1]
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return (f"{bucket}/{prefix}" if prefix else bucket), pyarrow.fs.S3FileSystem(**kwargs)


def endpoint_text() -> str:
    """Where requests go, without any user-info part of the URL (never a secret)."""
    try:
        url = urlparse(s3_client().meta.endpoint_url)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "the configured endpoint"
    host = url.hostname or ""
    return f"{url.scheme}://{host}{':' + str(url.port) if url.port else ''}"


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError (or its HTTP status), else ``""``."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code", ""))
        if code:
            return code
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status or "")
    return ""


def bucket_missing(bucket: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"S3 bucket '{bucket}' does not exist at {endpoint_text()}: create it "
        f"(aws s3 mb s3://{bucket}) or check AWS_ENDPOINT_URL / AWS_PROFILE"
    )


def translate_error(exc: BaseException, bucket: str, key: str | None) -> BaseException:
    """Map a botocore/boto3 error to the one-line error users should see (or the original)."""
    from botocore import exceptions as bex

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    cause: BaseException | None = exc
    # boto3's S3UploadFailedError wraps the ClientError only as its context.
    while cause is not None and not isinstance(cause, (bex.ClientError, bex.BotoCoreError)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return exc
    if isinstance(cause, bex.NoCredentialsError):
        return StorageError(
            f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(cause, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return StorageError(
            f"{where}: cannot reach S3 endpoint {endpoint_text()}; check AWS_ENDPOINT_URL"
        )
    if isinstance(cause, bex.NoRegionError):
        return StorageError(f"{where}: no AWS region configured; set AWS_DEFAULT_REGION")
    code = error_code(cause)
    if code == "NoSuchBucket":
        return bucket_missing(bucket)
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{where}: no such object")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return PermissionError(f"{where}: access denied ({code}); check the AWS credentials in use")
    return exc
