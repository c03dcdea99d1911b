"""Storage URLs: a local folder or ``s3://bucket/prefix``, behind one small interface.

Contract (both backends)::

    store = open_storage(url)              # local path (absolute/relative), file:// URL, or s3://bucket/prefix
    store.url                              # normalised root URL, no trailing slash (local: absolute path)
    store.child_url(rel) -> str            # URL of a member, e.g. s3://b/p/train/shard-000000.tar
    store.exists(rel) -> bool
    store.read_bytes(rel) -> bytes         # FileNotFoundError when missing
    store.write_bytes(rel, data) -> None   # atomic: readers see the old object or the whole new one
    store.put_file(rel, local_path) -> None  # atomic publish of a local file (S3: multipart when large)
    store.list(prefix="") -> list[str]     # relative paths under prefix (string prefix), sorted, recursive
    store.delete(rel) -> None              # missing is fine
    store.open_read(rel) -> BinaryIO       # streaming read; FileNotFoundError when missing
    store.check() -> None                  # fail fast: S3 bucket reachable and present

``rel`` is a ``/``-separated path relative to the root. Empty and ``.`` components are dropped;
``..``, absolute paths, backslashes and NUL characters raise :class:`ValueError`, so no member
can address anything outside the root.

Atomicity. Local writes go to a temporary file in the destination folder named
``.<name>.<random>.tmp`` (see :func:`is_temp_name`), are fsync'ed and published with
:func:`os.replace`; :meth:`Storage.list` never reports such names. On S3 ``write_bytes`` is a
single ``PutObject`` and ``put_file`` uses boto3's managed transfer (``upload_file``): objects of at
least ``multipart_threshold`` bytes go up as a multipart upload, which becomes visible only when
completed. The threshold defaults to ``$RESDISTILL_MULTIPART_THRESHOLD`` (bytes) or 64 MiB and can be
passed to :func:`open_storage`; s3transfer never uses parts smaller than 5 MiB.

S3 endpoint and credentials come only from the standard AWS chain (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the
config files, instance roles, ...). Nothing here stores or prints a secret. boto3 clients are not
fork-safe, so :func:`s3_client` builds one lazily per process (keyed by ``os.getpid()`` and the
endpoint-related environment). Storage objects pickle as their URL and options only, so Ray and
multiprocessing can ship them to workers.

Errors are one line: :class:`BucketNotFoundError` names the bucket and says to create it or to
check ``AWS_ENDPOINT_URL``; :class:`StorageError` covers unreachable endpoints and missing
credentials; ``PermissionError`` access denied.

webdataset 1.0.2 has no ``s3://`` scheme: :func:`register_webdataset_s3` adds one to
``webdataset.gopen.gopen_schemes`` that streams ``GetObject`` bodies through the per-process
client, so ``webdataset.WebDataset("s3://bucket/prefix/train/shard-000000.tar")`` works in the main
process and in forked DataLoader workers.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse
from urllib.request import url2pathname

__all__ = [
    "BucketNotFoundError",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "clean_rel",
    "is_remote",
    "is_temp_name",
    "local_path",
    "open_storage",
    "register_webdataset_s3",
    "s3_client",
    "split_s3_url",
]

MIB = 1024 * 1024
#: Default multipart threshold / part size of ``put_file`` on S3 (bytes).
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MIB
MULTIPART_THRESHOLD_ENV = "RESDISTILL_MULTIPART_THRESHOLD"
#: Read buffer of streams returned by ``open_read`` and the webdataset ``s3`` handler.
READ_BUFFER = 1 * MIB
TEMP_SUFFIX = ".tmp"


class StorageError(RuntimeError):
    """A storage backend failed in a way the user must fix (endpoint, credentials, bucket)."""


class BucketNotFoundError(StorageError):
    """The S3 bucket of a storage URL does not exist at the configured endpoint."""


# --------------------------------------------------------------------------------------------------
# URLs and relative paths
# --------------------------------------------------------------------------------------------------


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URLs, False for local paths and ``file://`` URLs."""
    return str(url).lower().startswith("s3://")


def local_path(url: str | os.PathLike[str]) -> Path:
    """Absolute local path of a local path or ``file://`` URL; ValueError for remote URLs."""
    text = os.fspath(url)
    if is_remote(text):
        raise ValueError(f"{text} is not a local path")
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: file:// URLs must name a local path (file:///abs/path)")
        text = url2pathname(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ValueError(
            f"{text}: unsupported storage URL scheme {parsed.scheme!r} (use a path or s3://)"
        )
    return Path(text).expanduser().absolute()


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (prefix without leading/trailing slashes)."""
    parsed = urlparse(url)
    if parsed.scheme.lower() != "s3" or not parsed.netloc:
        raise ValueError(f"{url}: not an s3://bucket[/prefix] URL")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url}: s3 URLs take no query or fragment")
    prefix = "/".join(p for p in parsed.path.split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"{url}: '.' and '..' are not allowed in an s3 prefix")
    return parsed.netloc, prefix


def clean_rel(rel: str, *, allow_empty: bool = False) -> str:
    """Normalise a member path relative to a storage root; ValueError if it could escape the root.

    ``a//b/./c`` -> ``a/b/c``; absolute paths, ``..`` components, backslashes and NUL characters
    are refused. An empty result is refused unless ``allow_empty`` (used for list prefixes).
    """
    if not isinstance(rel, str):
        raise TypeError(f"storage path must be str, not {type(rel).__name__}")
    if rel.startswith("/") or "\\" in rel or "\x00" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"{rel!r}: storage paths must be relative '/'-separated paths")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{rel!r}: '..' would leave the storage root")
    out = "/".join(parts)
    if not out and not allow_empty:
        raise ValueError("empty storage path")
    return out


def _clean_prefix(prefix: str) -> str:
    """A list prefix: like :func:`clean_rel` but keeps a trailing ``/`` (``"a/"`` != ``"a"``)."""
    cleaned = clean_rel(prefix, allow_empty=True)
    if cleaned and prefix.endswith("/"):
        cleaned += "/"
    return cleaned


def is_temp_name(name: str) -> bool:
    """True for the temporary names of in-flight local writes: ``.<anything>.tmp`` (basename)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(TEMP_SUFFIX)


def _default_threshold() -> int:
    value = os.environ.get(MULTIPART_THRESHOLD_ENV)
    if not value:
        return DEFAULT_MULTIPART_THRESHOLD
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{MULTIPART_THRESHOLD_ENV}={value!r} is not a number of bytes") from None
    if out < 1:
        raise ValueError(f"{MULTIPART_THRESHOLD_ENV} must be positive, got {out}")
    return out


# --------------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Storage(Protocol):
    """A flat namespace of byte objects under one root (see the module docstring)."""

    @property
    def url(self) -> str: ...

    def child_url(self, rel: str) -> str: ...

    def exists(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, rel: str) -> None: ...

    def open_read(self, rel: str) -> BinaryIO: ...

    def check(self) -> None: ...


def open_storage(
    url: str | os.PathLike[str] | Storage,
    *,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
    max_concurrency: int = 4,
) -> Storage:
    """Open a storage root; no I/O happens until a method is called.

    ``url``: ``s3://bucket[/prefix]`` -> :class:`S3Storage`; a local path (relative paths resolve
    against the current directory now, so the object means the same folder in every worker) or
    ``file://`` URL -> :class:`LocalStorage` (the folder is created on first write). A Storage is
    returned unchanged. The multipart options only matter for S3 ``put_file``.
    """
    if isinstance(url, (LocalStorage, S3Storage)):
        return url
    text = os.fspath(url)  # type: ignore[arg-type]
    if is_remote(text):
        return S3Storage(
            text,
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
    return LocalStorage(local_path(text))


# --------------------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class LocalStorage:
    """A local folder; members are files below it (see the module docstring for atomicity)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStorage) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("local", self.root))

    def __reduce__(self) -> tuple[Callable[..., Storage], tuple[Any, ...]]:
        return (LocalStorage, (str(self.root),))

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        """Local path of member ``rel`` (validated)."""
        return self.root.joinpath(*clean_rel(rel).split("/"))

    def child_url(self, rel: str) -> str:
        return str(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def open_read(self, rel: str) -> BinaryIO:
        return open(self.path(rel), "rb")

    def _publish(self, dest: Path, fill: Callable[[IO[bytes]], None]) -> None:
        """Write through ``fill`` into a hidden temp file beside ``dest``, fsync, os.replace."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
        try:
            with open(tmp, "xb") as fh:
                fill(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

    def write_bytes(self, rel: str, data: bytes) -> None:
        view = memoryview(data)
        self._publish(self.path(rel), lambda fh: fh.write(view))

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file to publish")

        def fill(fh: IO[bytes]) -> None:
            with open(src, "rb") as sfh:
                shutil.copyfileobj(sfh, fh, 4 * MIB)

        self._publish(self.path(rel), fill)

    def list(self, prefix: str = "") -> list[str]:
        prefix = _clean_prefix(prefix)
        # Walk only the deepest folder the prefix names fully, then filter by string prefix.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*head.split("/")) if head else self.root
        if not base.is_dir():
            return []
        out: list[str] = []
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if is_temp_name(name):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def check(self) -> None:
        """Fail if the root exists but is not a folder (a missing folder is created on write)."""
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: storage root is not a folder")


# --------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------

#: Environment variables that change which endpoint/account a new client talks to.
_CLIENT_ENV = (
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
                    retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=16
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


def _endpoint_text() -> str:
    """Where requests go, without any user-info part of the URL (never a secret)."""
    try:
        url = urlparse(s3_client().meta.endpoint_url)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "the configured endpoint"
    host = url.hostname or ""
    return f"{url.scheme}://{host}{':' + str(url.port) if url.port else ''}"


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code", ""))
        if code:
            return code
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status or "")
    return ""


def _bucket_missing(bucket: str) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"S3 bucket '{bucket}' does not exist at {_endpoint_text()}: create it "
        f"(aws s3 mb s3://{bucket}) or check AWS_ENDPOINT_URL / AWS_PROFILE"
    )


def _translate(exc: BaseException, bucket: str, key: str | None) -> BaseException:
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
            f"{where}: cannot reach S3 endpoint {_endpoint_text()}; check AWS_ENDPOINT_URL"
        )
    if isinstance(cause, bex.NoRegionError):
        return StorageError(f"{where}: no AWS region configured; set AWS_DEFAULT_REGION")
    code = _error_code(cause)
    if code == "NoSuchBucket":
        return _bucket_missing(bucket)
    if code in ("NoSuchKey", "404", "NotFound"):
        return FileNotFoundError(f"{where}: no such object")
    if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return PermissionError(f"{where}: access denied ({code}); check the AWS credentials in use")
    return exc


class _S3BodyReader(io.RawIOBase):
    """Raw read stream over a ``GetObject`` body; close() releases the HTTP connection.

    IOBase closes on garbage collection too, so a stream dropped half-read (webdataset does not
    close its shard streams) still gives its connection back.
    """

    def __init__(self, body: Any, name: str) -> None:
        super().__init__()
        self._body = body
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._body.read(len(buffer))
        n = len(chunk)
        buffer[:n] = chunk
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()

    def __repr__(self) -> str:
        return f"<s3 stream {self.name}>"


def _s3_open(bucket: str, key: str, buffer_size: int = READ_BUFFER) -> io.BufferedReader:
    """A buffered binary stream of ``s3://bucket/key`` via the per-process client."""
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        raise _translate(exc, bucket, key) from exc
    return io.BufferedReader(_S3BodyReader(body, f"s3://{bucket}/{key}"), buffer_size=buffer_size)


class S3Storage:
    """``s3://bucket/prefix`` through boto3 (see the module docstring for atomicity and config)."""

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
        return _translate(exc, self.bucket, key)

    def check(self) -> None:
        """HeadBucket: BucketNotFoundError / StorageError / PermissionError when unusable."""
        try:
            s3_client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._fail(exc, None)
            if isinstance(err, FileNotFoundError):  # HEAD has no body: 404 means no bucket
                err = _bucket_missing(self.bucket)
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
        return _s3_open(self.bucket, self.key(rel))  # type: ignore[return-value]

    def write_bytes(self, rel: str, data: bytes) -> None:
        key = self.key(rel)
        try:
            s3_client().put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        except Exception as exc:
            raise self._fail(exc, key) from exc

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
        prefix = _clean_prefix(prefix)
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
    return _s3_open(bucket, key, buffer_size=max(int(bufsize), READ_BUFFER))


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
