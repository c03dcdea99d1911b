"""What every storage backend shares: the :class:`Storage` protocol, its errors, and the rules
for URLs and member paths (see :mod:`sharding.storage` for the contract)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse
from urllib.request import url2pathname

MIB = 1024 * 1024
#: Suffix of the temporary names of in-flight local writes (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"


class StorageError(RuntimeError):
    """A storage backend failed in a way the user must fix (endpoint, credentials, bucket)."""


class BucketNotFoundError(StorageError):
    """The S3 bucket of a storage URL does not exist at the configured endpoint."""


@runtime_checkable
class Storage(Protocol):
    """A flat namespace of byte objects under one root (the contract: :mod:`sharding.storage`)."""

    @property
    def url(self) -> str: ...

    def child_url(self, rel: str) -> str: ...

    def exists(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...

    def create_exclusive(self, rel: str, data: bytes) -> bool: ...

    def read_versioned(self, rel: str) -> tuple[bytes, str]: ...

    def replace_if(self, rel: str, data: bytes, version: str) -> str | None: ...

    def delete_if(self, rel: str, version: str) -> bool: ...

    def put_file(self, rel: str, local_path: str | os.PathLike[str]) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, rel: str) -> None: ...

    def open_read(self, rel: str) -> BinaryIO: ...

    def check(self) -> None: ...


def positive_env(name: str, default: float, cast: type, unit: str) -> float:
    """``$name`` read with ``cast`` (a tuning knob of the storage layer), else ``default``;
    ValueError naming the variable when it is not a positive number of ``unit``."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        out = cast(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of {unit}") from None
    if not out > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return out


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


def clean_prefix(prefix: str) -> str:
    """A list prefix: like :func:`clean_rel` but keeps a trailing ``/`` (``"a/"`` != ``"a"``)."""
    cleaned = clean_rel(prefix, allow_empty=True)
    if cleaned and prefix.endswith("/"):
        cleaned += "/"
    return cleaned


def is_temp_name(name: str) -> bool:
    """True for the temporary names of in-flight local writes: ``.<anything>.tmp`` (basename)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(TEMP_SUFFIX)
