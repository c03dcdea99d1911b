"""Storage URLs: a local folder or ``s3://bucket/prefix``, behind one small interface.

Contract (both backends)::

    store = open_storage(url)              # local path (absolute/relative), file:// URL, or s3://bucket/prefix
    store.url                              # normalised root URL, no trailing slash (local: absolute path)
    store.child_url(rel) -> str            # URL of a member, e.g. s3://b/p/train/shard-000000.tar
    store.exists(rel) -> bool
    store.read_bytes(rel) -> bytes         # FileNotFoundError when missing
    store.write_bytes(rel, data) -> None   # atomic: readers see the old object or the whole new one
    store.create_exclusive(rel, data) -> bool  # create only if absent: True if this call created it
    store.read_versioned(rel) -> (bytes, version)  # version: S3 ETag, local SHA-256 of the bytes
    store.replace_if(rel, data, version) -> str | None  # compare-and-swap: new version, or None
    store.delete_if(rel, version) -> bool  # delete only that version
    store.put_file(rel, local_path) -> None  # atomic publish of a local file (S3: multipart when large)
    store.list(prefix="") -> list[str]     # relative paths under prefix (string prefix), sorted, recursive
    store.delete(rel) -> None              # missing is fine
    store.open_read(rel) -> BinaryIO       # streaming read; FileNotFoundError when missing
    store.check() -> None                  # fail fast: S3 bucket reachable and present

``rel`` is a ``/``-separated path relative to the root. Empty and ``.`` components are dropped;
``..``, absolute paths, backslashes and NUL characters raise :class:`ValueError`, so no member
can address anything outside the root. Storage objects pickle as their URL and options only, so
Ray and multiprocessing can ship them to workers.

``replace_if`` and ``delete_if`` change a member only while its version is still the one given
(S3: ``If-Match`` on the ETag; local: read, compare and rename under a kernel lock, see
:mod:`~sharding.storage.local`); of concurrent swaps from one version exactly one wins.
``create_exclusive`` creates only: of any number of concurrent calls on one member (from any
process or host) exactly one returns True, and readers see no member or the whole ``data``; it
never replaces an existing member. Local: a hard link of a complete temp file (fails
when the name exists). S3: ``PutObject`` with ``If-None-Match: *``; an endpoint that refuses or
ignores the condition (checked by repeating the put, which must then fail) raises
:class:`StorageError`, never a silent overwrite.

Errors are one line: :class:`BucketNotFoundError` names the bucket and says to create it or to
check ``AWS_ENDPOINT_URL``; :class:`StorageError` covers unreachable endpoints and missing
credentials; ``PermissionError`` access denied.

Modules: :mod:`~sharding.storage.base` (the protocol, errors, URL and member-path rules),
:mod:`~sharding.storage.local` (local folder; atomic temp-file + ``os.replace`` writes),
:mod:`~sharding.storage.aws` (the per-process boto3 client and pyarrow filesystem from the
standard AWS chain; error translation), :mod:`~sharding.storage.s3` (S3 backend with multipart
uploads; webdataset's ``s3://`` scheme).
"""

from __future__ import annotations

import os

from sharding.storage.aws import arrow_filesystem, s3_client
from sharding.storage.base import (
    MIB,
    TEMP_SUFFIX,
    BucketNotFoundError,
    Storage,
    StorageError,
    clean_rel,
    is_remote,
    is_temp_name,
    local_path,
    split_s3_url,
)
from sharding.storage.local import LocalStorage
from sharding.storage.s3 import (
    DEFAULT_MULTIPART_CHUNKSIZE,
    DEFAULT_MULTIPART_THRESHOLD,
    MULTIPART_THRESHOLD_ENV,
    READ_BUFFER,
    S3Storage,
    gopen_s3,
    register_webdataset_s3,
)

__all__ = [
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "MIB",
    "MULTIPART_THRESHOLD_ENV",
    "READ_BUFFER",
    "TEMP_SUFFIX",
    "BucketNotFoundError",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "arrow_filesystem",
    "clean_rel",
    "gopen_s3",
    "is_remote",
    "is_temp_name",
    "local_path",
    "open_storage",
    "register_webdataset_s3",
    "s3_client",
    "split_s3_url",
]


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
