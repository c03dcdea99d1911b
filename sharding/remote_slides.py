"""Slides on S3: list them, and give OpenSlide (which needs a local file) a cached local copy.

The node's slide cache (:func:`cache_dir`) is ``$RESDISTILL_SLIDE_CACHE``, default
``<tmp>/resdistill-slides-<uid>``: a folder of this user's only (mode 0700; a symlink, a
non-folder or another user's folder is refused), so no other account can plant or swap a slide.

* **Entries.** A slide version (its URL, size and ETag) is ``<cache>/<version>/``: the slide
  under its own file name (OpenSlide detects formats by suffix) and ``source.json`` recording
  ``url``, ``size`` and ``etag``. Both are written into a staging folder and published by one
  rename, so no task ever sees half an entry. A copy is used only while its ``source.json`` and
  its size agree with what S3 says now (a HEAD per use): a file that merely has the right size
  is never trusted, and one that does not agree is moved aside (pinned or not) and fetched again.
* **Pins.** A task using a copy holds a shared ``flock`` on it (:func:`pinned_copy`) from before it
  checks the copy until it is done with it; the kernel drops the locks of a process that dies,
  so a killed task leaves no pin behind.
* **Eviction** (least recently used first, before a download, until the blocks the entries
  hold fit under ``$RESDISTILL_SLIDE_CACHE_GB``, default 50) never blocks and never fails a reader: it takes
  an exclusive ``flock`` on an entry without waiting (refused while any task holds a pin: the
  entry is skipped), renames the entry to a unique ``.trash-*`` name (only one evictor's rename
  can succeed) and deletes it. A reader that opened the file just before finds, once it holds
  its pin, that the path no longer names its file, and looks again. Slides in use are never
  evicted: while more than the cap is in use, the cache holds more than the cap.
* **One download per slide and node**: concurrent first uses wait on an exclusive ``flock`` of
  ``.locks/<version>`` (dropped by the kernel if the downloader dies) and find the copy when it
  is theirs. The download is checked against the object's size and, by a second HEAD, its ETag
  (an object replaced meanwhile is fetched again). The small lock files stay.

Only single-file formats can be read this way (SVS, TIFF, NDPI, ...); multi-file formats such as
MRXS need a shared file system path. :mod:`sharding.slide_ranges` reads tiled TIFF slides
without a whole copy: sparse entries in the same cache, pinned and evicted the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .slide_files import SLIDE_SUFFIXES, SlideError
from .storage import is_remote, s3_client, split_s3_url

DEFAULT_CACHE_GB = 50.0
CACHE_ENV = "RESDISTILL_SLIDE_CACHE"
CACHE_GB_ENV = "RESDISTILL_SLIDE_CACHE_GB"
SOURCE = "source.json"
#: Times a use looks for its copy again after finding it evicted or replaced under it.
ATTEMPTS = 5
#: Copies :func:`local_copy` keeps pinned per thread (its callers hold no pin of their own).
KEEP_PINNED = 2
#: A staging folder this old whose file no download locks was left by a dead downloader.
ABANDONED_S = 60.0

#: True for an ``s3://`` slide path (the storage URL rule).
is_s3 = is_remote

__all__ = ["Pin", "cache_dir", "is_s3", "list_s3_slides", "local_copy", "pin_copy", "pinned_copy"]


def list_s3_slides(url: str) -> list[str]:
    """``s3://`` URLs of the slides at ``url``: the object itself, or every slide under a prefix."""
    bucket, prefix = split_s3_url(url)
    if Path(prefix).suffix.lower() in SLIDE_SUFFIXES:
        return [f"s3://{bucket}/{prefix}"]
    client = s3_client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        for obj in page.get("Contents", []):
            if Path(obj["Key"]).suffix.lower() in SLIDE_SUFFIXES:
                out.append(f"s3://{bucket}/{obj['Key']}")
    return sorted(out)


def cache_dir() -> Path:
    """This user's private slide cache (module docstring), created 0700 when missing;
    :class:`SlideError` for a path that is a symlink, not a folder, or another user's."""
    given = os.environ.get(CACHE_ENV)
    root = (
        Path(given) if given else Path(tempfile.gettempdir()) / f"resdistill-slides-{os.geteuid()}"
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    fix = f"remove it, or set {CACHE_ENV} to a folder of your own"
    st = root.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SlideError(f"{root}: the slide cache is a symlink or not a folder: {fix}")
    if st.st_uid != os.geteuid():
        raise SlideError(f"{root}: the slide cache belongs to user id {st.st_uid}: {fix}")
    if st.st_mode & 0o077:
        root.chmod(0o700)
    return root


@dataclass
class Pin:
    """A pinned cached copy: ``path`` is not evicted until :meth:`release`."""

    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the shared flock
            self.fd = -1

    def __del__(self) -> None:
        self.release()


@contextlib.contextmanager
def pinned_copy(url: str) -> Iterator[str]:
    """The local path of the slide at ``url``, pinned for the ``with`` block (module docstring)."""
    pin = pin_copy(url)
    try:
        yield pin.path
    finally:
        pin.release()


_held = threading.local()


def local_copy(url: str) -> str:
    """A local path holding the slide at ``url``, for callers that hold no pin of their own
    (:func:`sharding.slide.open_slide`): each thread keeps its last :data:`KEEP_PINNED` copies
    pinned, so a slide is not evicted while the thread that asked for it reads it."""
    pin = pin_copy(url)
    pins = _held.__dict__.setdefault("pins", [])
    pins.append(pin)
    while len(pins) > KEEP_PINNED:
        pins.pop(0).release()
    return pin.path


def pin_copy(url: str) -> Pin:
    """Pin the cached copy of ``url`` (downloaded first when missing or stale); the caller
    releases it. :class:`SlideError` (one line naming ``url``) when S3 or the cache fails."""
    bucket, key = split_s3_url(url)
    size, etag = _head(url, bucket, key)
    want = {"url": url, "size": size, "etag": etag}
    cache = cache_dir()
    version = hashlib.sha256(f"{url}|{size}|{etag}".encode()).hexdigest()[:16]
    entry = cache / version
    path = entry / Path(key).name
    for _ in range(ATTEMPTS):
        fd = _pin(path, want)
        if isinstance(fd, int):
            return Pin(str(path), fd)
        locks = cache / ".locks"
        locks.mkdir(mode=0o700, exist_ok=True)
        with _exclusive(locks / version):
            fd = _pin(path, want)  # another task may have fetched it while we waited
            if isinstance(fd, int):
                return Pin(str(path), fd)
            if fd == "stale":  # damaged or tampered with: no task may trust it, pinned or not
                _discard(cache, entry)
            _make_room(cache, size, keep=entry)
            _download(url, bucket, key, want, cache, entry, path.name)
    raise SlideError(f"{url}: its cached copy was evicted {ATTEMPTS} times in a row: retry")


def _head(url: str, bucket: str, key: str) -> tuple[int, str]:
    try:
        head = s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001 - one line for the user, whatever boto3 raised
        raise SlideError(
            f"{url}: cannot read the slide from S3 ({exc}): check the URL and access"
        ) from None
    return int(head["ContentLength"]), str(head.get("ETag", ""))


def _pin(path: Path, want: dict) -> int | str:
    """A file descriptor holding a shared flock on the valid copy at ``path``; ``"missing"``
    when there is none (or it was evicted under us), ``"stale"`` when it does not match
    ``want`` (its recorded source or its size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an evictor renames the entry away
        mine = os.fstat(fd)
        try:
            now = path.stat()
        except FileNotFoundError:
            now = None
        if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)
            return "missing"
        try:
            recorded = json.loads((path.parent / SOURCE).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != want or mine.st_size != want["size"]:
            os.close(fd)
            return "stale"
        os.utime(fd)  # last use, for the least-recently-used eviction
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _download(
    url: str, bucket: str, key: str, want: dict, cache: Path, entry: Path, name: str
) -> None:
    """Fetch the object into a staging folder (its file locked while it is written, so a
    cleaner can tell a live download from a dead one's) and publish it as ``entry``."""
    staging = cache / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    try:
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                s3_client().download_file(bucket, key, str(staging / name))
            except Exception as exc:  # noqa: BLE001 - one line for the user
                raise SlideError(f"{url}: downloading the slide failed ({exc}): retry") from None
            got = (staging / name).stat().st_size
            if got != want["size"]:
                raise SlideError(
                    f"{url}: download incomplete ({got} of {want['size']} bytes): retry"
                )
            if _head(url, bucket, key) != (want["size"], want["etag"]):
                raise SlideError(f"{url}: the object changed while it was downloaded: retry")
            (staging / SOURCE).write_text(json.dumps(want))
            os.rename(staging, entry)  # fails if an entry is there: never replace one in use
        finally:
            os.close(fd)
    except OSError as exc:
        raise SlideError(f"{url}: cannot store the slide in the cache {cache} ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _evict(cache: Path, entry: Path) -> bool:
    """Remove ``entry`` unless a task pins it (module docstring); True when it is gone."""
    files = [p for p in _listdir(entry) if p.name != SOURCE and not p.name.startswith(".")]
    if not files:
        return _discard(cache, entry)  # a broken entry (no slide): nothing can pin it
    try:
        fd = os.open(files[0], os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return not entry.exists()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # pinned
        mine = os.fstat(fd)
        try:
            now = files[0].stat()
        except FileNotFoundError:
            return True  # another evictor took it
        if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            return False  # evicted and fetched again meanwhile: a new entry, maybe pinned
        return _discard(cache, entry)
    finally:
        os.close(fd)


def _discard(cache: Path, path: Path) -> bool:
    trash = cache / f".trash-{uuid.uuid4().hex}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return True
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _make_room(cache: Path, need: int, keep: Path) -> None:
    """Evict unpinned entries, least recently used first, until ``need`` more bytes fit under
    the cap; clear what dead tasks left (trash, abandoned downloads)."""
    cap = int(float(os.environ.get(CACHE_GB_ENV, DEFAULT_CACHE_GB)) * 1e9)
    entries: list[tuple[float, int, Path]] = []
    for item in _listdir(cache):
        if item.name.startswith(".trash-"):
            shutil.rmtree(item, ignore_errors=True)
        elif item.name.startswith(".tmp-"):
            _clear_abandoned(item)
        elif not item.name.startswith(".") and item != keep:
            used, last = 0, 0.0
            for f in _listdir(item):
                with contextlib.suppress(FileNotFoundError):
                    st = f.stat()  # the blocks it holds: a ranged entry's file is sparse
                    used, last = used + st.st_blocks * 512, max(last, st.st_mtime)
            entries.append((last, used, item))
    total = sum(used for _, used, _ in entries)
    for _, used, item in sorted(entries):
        if total + need <= cap:
            break
        if _evict(cache, item):
            total -= used


def _clear_abandoned(staging: Path) -> None:
    """Delete a staging folder whose downloader died (old, and its file's lock is free)."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - staging.stat().st_mtime < ABANDONED_S:
            return
    for f in _listdir(staging):
        if f.name == SOURCE:
            continue
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live download
        finally:
            os.close(fd)
    shutil.rmtree(staging, ignore_errors=True)
