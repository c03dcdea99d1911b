"""The S3 backend (``s3://bucket/prefix`` through boto3) and webdataset's ``s3://`` scheme.

Conditional writes: ``create_exclusive`` is ``PutObject`` with ``If-None-Match: *``;
``replace_if`` / ``delete_if`` carry ``If-Match: <ETag>`` (the version ``read_versioned`` returns),
so a writer replaces only the object it has read. An endpoint that ignores either condition is
detected and refused (:class:`StorageError`), never trusted.

Atomicity: ``write_bytes`` is a single ``PutObject``; ``put_file`` uses boto3's managed transfer
(``upload_file``): objects of at least ``multipart_threshold`` bytes go up as a multipart upload,
which becomes visible only when completed. The threshold defaults to
``$RESDISTILL_MULTIPART_THRESHOLD`` (bytes) or 64 MiB; s3transfer never uses parts smaller than
5 MiB. Objects pickle as their URL and options only, so Ray and multiprocessing can ship them.

webdataset 1.0.2 has no ``s3://`` scheme: :func:`register_webdataset_s3` adds one to
``webdataset.gopen.gopen_schemes`` that streams ``GetObject`` bodies through the per-process
client (resumed after a broken connection, within a bound: :mod:`sharding.storage.s3_read`),
so ``webdataset.WebDataset("s3://bucket/prefix/train/shard-000000.tar")`` works in the main
process and in forked DataLoader workers.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sharding.storage.aws import (
    bucket_missing,
    endpoint_text,
    error_code,
    s3_client,
    translate_error,
)
from sharding.storage.base import (
    MIB,
    Storage,
    StorageError,
    clean_prefix,
    clean_rel,
    is_temp_name,
    split_s3_url,
)
from sharding.storage.s3_read import READ_BUFFER, open_s3_object

#: Default multipart threshold / part size of ``put_file`` on S3 (bytes).
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MIB
MULTIPART_THRESHOLD_ENV = "RESDISTILL_MULTIPART_THRESHOLD"
#: Error codes of a conditional write that was refused: precondition failed, or another
#: conditional write to the key in flight.
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _default_threshold() -> int:
    from .base import positive_env

    return int(positive_env(MULTIPART_THRESHOLD_ENV, DEFAULT_MULTIPART_THRESHOLD, int, "bytes"))


class S3Storage:
    """``s3://bucket/prefix`` through boto3 (atomicity and configuration: see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        multipart_threshold: int | None = None,
        multipart_chunksize: int | None = None,
        max_concurrency: int = 4,
    ) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.multipart_threshold = int(multipart_threshold or _default_threshold())
        self.multipart_chunksize = int(multipart_chunksize or DEFAULT_MULTIPART_CHUNKSIZE)
        self.max_concurrency = int(max_concurrency)
        self._bucket_ok: bool = False
        self._if_match_ok: bool = False

    def _options(self) -> dict[str, int]:
        return {
            "multipart_threshold": self.multipart_threshold,
            "multipart_chunksize": self.multipart_chunksize,
            "max_concurrency": self.max_concurrency,
        }

    def __reduce__(self) -> tuple[Callable[..., Storage], tuple[Any, ...]]:
        return (_rebuild_s3, (self.url, self._options()))

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Storage) and other.url == self.url

    def __hash__(self) -> int:
        return hash(("s3", self.url))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, rel: str) -> str:
        """Object key of member ``rel`` (validated)."""
        rel = clean_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def child_url(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _fail(self, exc: BaseException, key: str | None) -> BaseException:
        return translate_error(exc, self.bucket, key)

    def check(self) -> None:
        """HeadBucket: BucketNotFoundError / StorageError / PermissionError when unusable."""
        try:
            s3_client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._fail(exc, None)
            if isinstance(err, FileNotFoundError):  # HEAD has no body: 404 means no bucket
                err = bucket_missing(self.bucket)
            raise err from exc
        self._bucket_ok = True

    def exists(self, rel: str) -> bool:
        key = self.key(rel)
        try:
            s3_client().head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            err = self._fail(exc, key)
            if not isinstance(err, FileNotFoundError):
                raise err from exc
            if not self._bucket_ok:  # a HEAD 404 cannot tell a missing key from a missing bucket
                self.check()
            return False
        return True

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as fh:
            return fh.read()

    def open_read(self, rel: str) -> BinaryIO:
        return open_s3_object(self.bucket, self.key(rel))  # type: ignore[return-value]

    def write_bytes(self, rel: str, data: bytes) -> None:
        key = self.key(rel)
        try:
            s3_client().put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        except Exception as exc:
            raise self._fail(exc, key) from exc

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """``PutObject`` with ``If-None-Match: *``: False when the key exists (412) or another
        conditional write to it is in flight (409). The put is repeated once after a success: an
        endpoint that honours the condition refuses it; one that accepts it would let two runs
        both "create" the key, so it raises :class:`StorageError` instead."""
        key = self.key(rel)
        if not self._put_if_absent(key, data):
            return False
        if self._put_if_absent(key, data):
            raise StorageError(
                f"{self.url}: the S3 endpoint {endpoint_text()} ignores conditional writes "
                "(If-None-Match: *), so it cannot keep two writers apart: use an endpoint that "
                "supports them (AWS S3 does) or a local/shared folder"
            )
        return True

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            s3_client().put_object(Bucket=self.bucket, Key=key, Body=bytes(data), IfNoneMatch="*")
        except Exception as exc:
            code = error_code(exc)
            if code in _CONDITION_FAILED:
                return False
            if code in ("NotImplemented", "501"):
                raise StorageError(
                    f"s3://{self.bucket}/{key}: the S3 endpoint {endpoint_text()} does not "
                    "support conditional writes (If-None-Match: *), which locking the output "
                    "needs: use an endpoint that does (AWS S3 does) or a local/shared folder"
                ) from None
            raise self._fail(exc, key) from exc
        return True

    # Compare-and-swap on the ETag: what the lease's heartbeat, takeover and release use.

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """The member's bytes and its ETag (its version for :meth:`replace_if`)."""
        key = self.key(rel)
        try:
            resp = s3_client().get_object(Bucket=self.bucket, Key=key)
            with contextlib.closing(resp["Body"]) as body:
                return body.read(), str(resp["ETag"])
        except Exception as exc:
            raise self._fail(exc, key) from exc

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None:
        """``PutObject`` with ``If-Match: <version>``: the new ETag, or None when the object
        changed (412), another conditional write is in flight (409) or it is gone (404). An
        endpoint that ignores ``If-Match`` (probed once per object) raises :class:`StorageError`."""
        key = self.key(rel)
        self._check_if_match(key)
        try:
            resp = s3_client().put_object(
                Bucket=self.bucket, Key=key, Body=bytes(data), IfMatch=version
            )
        except Exception as exc:
            self._refused(exc, key, "If-Match")
            return None
        return str(resp["ETag"])

    def delete_if(self, rel: str, version: str) -> bool:
        """``DeleteObject`` with ``If-Match``; False when the object changed or is gone. (An
        endpoint without conditional deletes deletes unconditionally: the lease only deletes
        what it has just seen as its own.)"""
        key = self.key(rel)
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=key, IfMatch=version)
        except Exception as exc:
            self._refused(exc, key, "If-Match")
            return False
        return True

    def _refused(self, exc: BaseException, key: str, header: str) -> None:
        """Return if ``exc`` is a condition's refusal (412, 409, 404), else raise one line."""
        code = error_code(exc)
        if code in (*_CONDITION_FAILED, "NoSuchKey", "404", "NotFound"):
            return
        if code in ("NotImplemented", "501"):
            raise StorageError(
                f"s3://{self.bucket}/{key}: the S3 endpoint {endpoint_text()} does not support "
                f"conditional writes ({header}), which keeping writers apart needs: use an "
                "endpoint that does (AWS S3 does) or a local/shared folder"
            ) from None
        raise self._fail(exc, key) from exc

    def _check_if_match(self, key: str) -> None:
        """Once per object: a put with a mismatching ``If-Match`` to a fresh hidden key must be
        refused; an endpoint that accepts it would let a stalled writer overwrite its successor."""
        if self._if_match_ok:
            return
        head, _, base = key.rpartition("/")
        probe = f"{head}/" * bool(head) + f".{base}.if-match-{uuid.uuid4().hex[:12]}.tmp"
        try:
            s3_client().put_object(Bucket=self.bucket, Key=probe, Body=b"", IfMatch=f'"{0:032}"')
        except Exception as exc:
            self._refused(exc, probe, "If-Match")
            self._if_match_ok = True
            return
        s3_client().delete_object(Bucket=self.bucket, Key=probe)
        raise StorageError(
            f"{self.url}: the S3 endpoint {endpoint_text()} ignores conditional writes "
            "(If-Match), so it cannot keep a stalled writer from overwriting its successor: use "
            "an endpoint that supports them (AWS S3 does) or a local/shared folder"
        )

    def transfer_config(self) -> Any:
        """boto3 TransferConfig of ``put_file`` (threshold, part size, threads)."""
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
        )

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        key = self.key(rel)
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file to publish")
        try:
            s3_client().upload_file(str(src), self.bucket, key, Config=self.transfer_config())
        except Exception as exc:
            raise self._fail(exc, key) from exc

    def list(self, prefix: str = "") -> list[str]:
        prefix = clean_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        out: list[str] = []
        try:
            pages = (
                s3_client()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=self.bucket, Prefix=root + prefix)
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][len(root) :]
                    if _addressable(rel) and not is_temp_name(rel):
                        out.append(rel)
        except Exception as exc:
            raise self._fail(exc, None) from exc
        return sorted(out)

    def delete(self, rel: str) -> None:
        key = self.key(rel)
        try:
            s3_client().delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            err = self._fail(exc, key)
            if not isinstance(err, FileNotFoundError):
                raise err from exc


def _addressable(rel: str) -> bool:
    """True if ``rel`` is its own clean form (keys like ``a//b`` or ``../x`` are not members)."""
    try:
        return rel == clean_rel(rel)
    except ValueError:
        return False


def _rebuild_s3(url: str, options: dict[str, int]) -> S3Storage:
    return S3Storage(url, **options)


# --------------------------------------------------------------------------------------------------
# webdataset s3:// scheme
# --------------------------------------------------------------------------------------------------


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw: Any) -> io.BufferedReader:
    """webdataset gopen handler for ``s3://bucket/key``: a streaming GetObject body (read only).

    Writing through gopen is refused on purpose: write the shard locally and publish it with
    ``Storage.put_file`` so that no partial object can ever become visible.
    """
    if not mode.startswith("r"):
        raise ValueError(
            f"{url}: s3:// is read-only in webdataset; write locally and use Storage.put_file"
        )
    bucket, key = split_s3_url(url)
    if not key:
        raise ValueError(f"{url}: no object key")
    return open_s3_object(bucket, key, buffer_size=max(int(bufsize), READ_BUFFER))


def register_webdataset_s3() -> None:
    """Register :func:`gopen_s3` as webdataset's ``s3`` scheme (idempotent, per process).

    Every webdataset path that opens URLs (``WebDataset``, ``url_opener``, ``StreamingOpen``,
    ``FileCache`` downloads) goes through ``webdataset.gopen.gopen``, which dispatches on
    ``gopen_schemes``. Forked DataLoader workers inherit the table; spawned ones must call this
    again (it is cheap).
    """
    import importlib

    # ``webdataset.gopen`` the attribute is the function; the module lives in sys.modules
    wds_gopen = importlib.import_module("webdataset.gopen")
    wds_gopen.gopen_schemes["s3"] = gopen_s3
