"""Reading an S3 object as a stream that survives a broken connection, within a stated bound.

A ``GetObject`` body that fails part-way (connection reset, read timeout on a stalled
connection, body cut short) is resumed where it stopped: a ranged ``GetObject`` from the byte
offset reached, with ``If-Match`` on the first response's ETag, so a replaced object is refused
(:class:`StorageError`) and never spliced onto the old one's first part. botocore retries a
request that fails before its body; nothing retried a body, so one reset failed a whole shard.

Bound: at most :data:`READ_RETRIES` resumes per stream, waiting ``READ_BACKOFF * 2**i`` s
(at most 2 s) before each; none starts once :data:`READ_RETRY_WINDOW` s have passed since the
stream's first failure. Each try waits at most the client's read timeout for a byte
(:func:`sharding.storage.aws.read_timeout`, ``$RESDISTILL_S3_READ_TIMEOUT``). Then one line:
:class:`StorageError` naming the object, the byte offset and the count.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

from sharding.storage.aws import endpoint_text, error_code, s3_client, translate_error
from sharding.storage.base import MIB, StorageError

#: Read buffer of streams returned by ``open_read`` and the webdataset ``s3`` handler.
READ_BUFFER = 1 * MIB
#: Resumes of one stream after its body broke off (see the module docstring for the bound).
READ_RETRIES = 4
READ_BACKOFF = 0.2
READ_RETRY_WINDOW = 120.0


def _transient(exc: BaseException) -> bool:
    """True for a failure of the connection rather than of the request: reset, timeout, a body
    cut short, a server error that outlived botocore's own retries."""
    import urllib3.exceptions
    from botocore import exceptions as bex

    if isinstance(
        exc,
        bex.HTTPClientError  # reset/closed connection, read timeout, broken response stream
        | bex.ConnectionError  # endpoint unreachable, connect timeout
        | bex.IncompleteReadError  # body ended before its Content-Length
        | urllib3.exceptions.HTTPError
        | ConnectionError
        | TimeoutError,
    ):
        return True
    response = getattr(exc, "response", None)
    status = (
        response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(response, dict)
        else None
    )
    return isinstance(status, int) and status >= 500


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _S3BodyReader(io.RawIOBase):
    """Raw read stream over a ``GetObject`` response that resumes a broken body (see the module
    docstring); close() releases the HTTP connection.

    IOBase closes on garbage collection too, so a stream dropped half-read (webdataset does not
    close its shard streams) still gives its connection back.
    """

    def __init__(self, bucket: str, key: str, response: dict[str, Any]) -> None:
        super().__init__()
        self.bucket, self.key = bucket, key
        self.name = f"s3://{bucket}/{key}"
        self._body = response["Body"]
        self._etag = response.get("ETag")
        self._size = int(response.get("ContentLength", -1))
        self._pos = 0
        self._failures = 0
        self._first_failure = 0.0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            try:
                chunk = self._body.read(len(buffer))
            except Exception as exc:  # noqa: BLE001 - sorted by _transient, else re-raised
                if not _transient(exc):
                    raise
                self._resume(exc)
                continue
            n = len(chunk)
            buffer[:n] = chunk
            self._pos += n
            return n

    def _resume(self, exc: BaseException) -> None:
        """Replace the broken body by one from the current offset, or raise StorageError once
        the bound is spent."""
        while True:
            now = time.monotonic()
            if not self._failures:
                self._first_failure = now
            self._failures += 1
            elapsed = now - self._first_failure
            if self._failures > READ_RETRIES or elapsed > READ_RETRY_WINDOW:
                raise StorageError(
                    f"{self.name}: the read broke off at byte {self._pos} of {self._size} "
                    f"{self._failures} times in {elapsed:.1f} s (last: {_one_line(exc)}); "
                    f"check the network and the S3 endpoint {endpoint_text()}"
                ) from exc
            time.sleep(min(READ_BACKOFF * 2 ** (self._failures - 1), 2.0))
            self._close_body()
            if 0 <= self._size <= self._pos:  # broke off after the last byte: nothing to resume
                self._body = io.BytesIO()
                return
            try:
                self._body = self._get(self._pos)["Body"]
                return
            except Exception as again:  # noqa: BLE001 - sorted by _transient, else re-raised
                if not _transient(again):
                    raise self._fail(again) from again
                exc = again

    def _get(self, start: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Range": f"bytes={start}-"}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        return s3_client().get_object(Bucket=self.bucket, Key=self.key, **kwargs)

    def _fail(self, exc: BaseException) -> BaseException:
        if error_code(exc) in ("PreconditionFailed", "412"):
            return StorageError(
                f"{self.name}: the object changed while it was read (its ETag is no longer "
                f"{self._etag}); read it again"
            )
        return translate_error(exc, self.bucket, self.key)

    def _close_body(self) -> None:
        with contextlib.suppress(Exception):  # a broken connection may fail to close: dropped
            self._body.close()

    def close(self) -> None:
        if not self.closed:
            try:
                self._close_body()
            finally:
                super().close()

    def __repr__(self) -> str:
        return f"<s3 stream {self.name}>"


def open_s3_object(bucket: str, key: str, buffer_size: int = READ_BUFFER) -> io.BufferedReader:
    """A buffered binary stream of ``s3://bucket/key`` via the per-process client, resumed after
    a broken connection within the module's bound."""
    try:
        response = s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        err = translate_error(exc, bucket, key)
        if err is exc and _transient(exc):  # botocore's own retries are spent
            err = StorageError(
                f"s3://{bucket}/{key}: no answer from the S3 endpoint {endpoint_text()} "
                f"({_one_line(exc)}); check the network and the endpoint"
            )
        raise err from exc
    return io.BufferedReader(_S3BodyReader(bucket, key, response), buffer_size=buffer_size)
