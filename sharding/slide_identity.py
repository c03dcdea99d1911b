"""What makes a slide the same slide: its source and its bytes, never just its file name.

A result (a shard's samples, a prediction) belongs to the slide it was cut from. Two files with
the same name (``/batch1/case7/S1.svs`` and ``/batch2/case9/S1.svs``), or whose names fold to the
same id (``A.1`` and ``A-1``), are different slides unless their bytes agree. Every record of a
slide (manifest rows, resume state, prediction records) therefore carries a
:class:`SlideIdentity`, taken when the slide is first read:

* ``uri``: where it was read: the absolute local path (symlinks resolved) or the ``s3://`` URL;
* ``size``: its length in bytes;
* ``mtime_or_etag``: local: ``st_mtime_ns``; S3: the object's ETag;
* ``sha256``: hex sha256 of the size (8 bytes, little-endian), the first MiB and the last MiB.

Two identities name the same slide when their size and ``sha256`` agree (:meth:`same_bytes`),
wherever the file now lies: a slide moved to another folder is still the slide, a re-scan or a
different case under the same name is not. The head and tail cover a slide's header, its
metadata and the end of its pyramid; hashing whole 1-3 GB slides on every rerun would cost more
than the run. A slide edited in place in its middle, same size, would go unnoticed: slides are
not edited in place. For multi-file formats (MRXS) the index file given is what is hashed.

A rerun need not hash again: :meth:`quick_match` (same uri, size and mtime/ETag as the record)
lets it reuse the recorded ``sha256``, the way ``make`` and ``rsync`` trust a file's stat.

Used by sharding (``sharding.slide_ids``) and meant for prediction alike.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .slide_files import SlideError
from .storage import is_remote, s3_client, split_s3_url

MIB = 1 << 20
#: Slides stat'ed or hashed at once (I/O bound: local disks, NFS and S3 all gain from overlap).
THREADS = 16

__all__ = [
    "SlideIdentity",
    "fingerprint",
    "fingerprint_all",
    "identify",
    "source_uri",
    "stat_slide",
]


@dataclass(frozen=True)
class SlideIdentity:
    """A slide's source and fingerprint (see the module docstring); ``sha256`` is None until the
    bytes are hashed (:func:`stat_slide`) and in records written before identities existed."""

    uri: str
    size: int
    mtime_or_etag: str
    sha256: str | None = None

    def same_bytes(self, other: SlideIdentity) -> bool:
        """Whether both hold the same slide. A record without a fingerprint (an older output)
        can only be matched by its source: the same ``uri``."""
        if self.sha256 is None or other.sha256 is None:
            return self.uri == other.uri
        return self.size == other.size and self.sha256 == other.sha256

    def quick_match(self, recorded: SlideIdentity) -> bool:
        """Whether the file is unchanged since ``recorded`` was taken: same uri, size and
        mtime/ETag, and the record holds a fingerprint to reuse."""
        return recorded.sha256 is not None and (self.uri, self.size, self.mtime_or_etag) == (
            recorded.uri,
            recorded.size,
            recorded.mtime_or_etag,
        )

    def to_record(self) -> dict[str, Any]:
        """The fields as a record stores them: ``uri, size, mtime_or_etag, sha256``."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> SlideIdentity | None:
        """The identity a record holds; a record written before identities existed gives its
        ``path`` as the uri and no fingerprint; None without a record."""
        if not record:
            return None
        if record.get("uri"):
            return cls(
                uri=str(record["uri"]),
                size=int(record.get("size", -1)),
                mtime_or_etag=str(record.get("mtime_or_etag", "")),
                sha256=record.get("sha256"),
            )
        path = record.get("path")
        return cls(uri=source_uri(path), size=-1, mtime_or_etag="") if path else None


def source_uri(path: str | os.PathLike[str]) -> str:
    """The uri a slide is recorded under: an ``s3://`` URL as given, a local path absolute with
    symlinks resolved (so two spellings of one file agree)."""
    text = str(path)
    return text if is_remote(text) else str(Path(text).expanduser().resolve())


def stat_slide(path: str | os.PathLike[str]) -> SlideIdentity:
    """The identity without the hash (a stat, or an S3 HEAD); :class:`SlideError` (one line
    naming the slide) when it is missing or unreadable."""
    text = str(path)
    if is_remote(text):
        bucket, key = split_s3_url(text)
        head = _s3(text, lambda c: c.head_object(Bucket=bucket, Key=key))
        return SlideIdentity(text, int(head["ContentLength"]), str(head.get("ETag", "")))
    try:
        st = os.stat(text)
    except FileNotFoundError:
        raise SlideError(f"{text}: no such file: check the path") from None
    except OSError as exc:
        raise SlideError(
            f"{text}: cannot read it ({exc.strerror}): check its permissions"
        ) from None
    return SlideIdentity(source_uri(text), st.st_size, str(st.st_mtime_ns))


def fingerprint(path: str | os.PathLike[str]) -> SlideIdentity:
    """The full identity of the slide at ``path`` (a local path or ``s3://`` URL), its first and
    last MiB read and hashed; :class:`SlideError` when it cannot be read or changes meanwhile
    (a copy still being written)."""
    before = stat_slide(path)
    text, size = str(path), before.size
    tail_at = max(0, size - MIB)
    if is_remote(text):
        bucket, key = split_s3_url(text)

        def read(start: int, end: int) -> bytes:
            if end <= start:
                return b""
            rng = f"bytes={start}-{end - 1}"
            match = {"IfMatch": before.mtime_or_etag} if before.mtime_or_etag else {}
            return _retried(
                text,
                lambda: (
                    s3_client()
                    .get_object(Bucket=bucket, Key=key, Range=rng, **match)["Body"]
                    .read()
                ),
            )

        head, tail = read(0, min(size, MIB)), read(tail_at, size)
    else:
        try:
            with open(text, "rb") as fh:
                head = fh.read(MIB)
                fh.seek(tail_at)
                tail = fh.read(MIB)
        except OSError as exc:
            raise SlideError(f"{text}: cannot read it ({exc.strerror}): check the file") from None
        if stat_slide(text) != before:
            raise SlideError(f"{text}: the file changed while being read: wait for its copy to end")
    digest = hashlib.sha256(size.to_bytes(8, "little") + head + tail).hexdigest()
    return replace(before, sha256=digest)


def _retried(url: str, read: Callable[[], bytes]) -> bytes:
    """``read()`` again after a reset, stall or cut-short body, at most
    :data:`~sharding.storage.s3_read.READ_RETRIES` times with doubling backoff (the bound of
    every S3 read); then one :class:`SlideError` line naming the slide."""
    import time

    from .storage.s3_read import READ_BACKOFF, READ_RETRIES, _one_line, _transient

    for attempt in range(READ_RETRIES + 1):
        try:
            return read()
        except Exception as exc:  # noqa: BLE001 - one line for the user, whatever boto3 raised
            if not _transient(exc):
                raise SlideError(
                    f"{url}: cannot read the slide from S3 ({_one_line(exc)}): check the URL "
                    "and access"
                ) from None
            if attempt == READ_RETRIES:
                raise SlideError(
                    f"{url}: reading it failed {READ_RETRIES + 1} times ({_one_line(exc)}): "
                    "check the network and the endpoint"
                ) from None
            time.sleep(READ_BACKOFF * 2**attempt)
    raise AssertionError("unreachable")


def identify(path: str, recorded: SlideIdentity | None = None) -> SlideIdentity:
    """:func:`fingerprint`, or the recorded fingerprint when the file is unchanged since it was
    taken (:meth:`SlideIdentity.quick_match`): a rerun costs a stat, not two MiB per slide."""
    if recorded is not None and recorded.sha256 is not None:
        now = stat_slide(path)
        if now.quick_match(recorded):
            return replace(now, sha256=recorded.sha256)
    return fingerprint(path)


def fingerprint_all(
    paths: Iterable[str],
    recorded: Callable[[str], SlideIdentity | None] = lambda path: None,
    threads: int = THREADS,
    hashed: bool = True,
) -> tuple[dict[str, SlideIdentity], dict[str, str]]:
    """:func:`identify` for each path, ``threads`` at a time: ``(identities, problems)``, both by
    path; a problem is the one line of the slide's :class:`SlideError`. ``recorded(path)`` gives
    what an earlier run recorded for that slide, if anything. ``hashed=False``: only
    :func:`stat_slide` (is each one there and readable?)."""
    todo = list(dict.fromkeys(paths))

    def one(path: str) -> tuple[str, SlideIdentity | str]:
        try:
            return path, identify(path, recorded(path)) if hashed else stat_slide(path)
        except SlideError as exc:
            return path, str(exc)

    found: dict[str, SlideIdentity] = {}
    problems: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        for path, got in pool.map(one, todo):
            if isinstance(got, SlideIdentity):
                found[path] = got
            else:
                problems[path] = got
    return found, problems


def _s3(url: str, call: Callable[[Any], Any]) -> Any:
    try:
        return call(s3_client())
    except Exception as exc:  # noqa: BLE001 - one line for the user, whatever boto3 raised
        raise SlideError(
            f"{url}: cannot read the slide from S3 ({exc}): check the URL and access"
        ) from None
