"""Slides on S3 read by byte ranges: OpenSlide reads a sparse local file holding only its bytes.

A whole-slide copy (:func:`sharding.remote_slides.pin_copy`) fetches every byte of a 1-3 GB file
to read a few percent of it: a student at 2.5x reads one pyramid level of 1/256 of the pixels of
level 0, the tissue detector another small one. :func:`open_ranged` instead gives OpenSlide a
*sparse* file of the object's size in the node's slide cache, into which exactly the bytes it
reads are fetched by ranged GETs, before it reads them:

* at creation, the TIFF header, every directory (IFD) and every tag's value (tile offsets and
  byte counts, JPEG tables, descriptions, colour profile), and every tile of the smallest level
  (OpenSlide hashes them when it opens a slide), parsed with tifffile over ranged reads;
* before each ``read_region`` (:class:`RangedSlide`), the tiles of that level the region touches
  (one tile more on each side: OpenSlide may sample between pixels); :meth:`RangedSlide.prefetch`
  fetches many regions' tiles at once (neighbouring byte ranges merged, fetched in parallel).

So OpenSlide reads the same bytes as from a whole copy: the same pixels, by construction
(``tests/test_remote_ranges.py``). Only tiled TIFF-family files (``.svs``, ``.tif``, ``.tiff``)
whose levels are JPEG or JPEG 2000 compressed are read this way (:func:`rangeable`), where a byte
never fetched cannot pass for pixels: its tile fails to decode. Other slides are copied whole.

**The cache.** An entry is ``<cache>/<version>-ranges/`` (``version`` as for whole copies: the
URL, size and ETag), holding the sparse file, ``source.json``, ``.layout.json`` (each level's tile
byte ranges, parsed once per node) and ``.present`` (the byte ranges fetched). It is created in a staging folder and published by one rename, pinned by a shared
``flock`` on the slide file while open (so never evicted in use) and evicted least recently used
first like whole copies, its size the blocks it really holds. Fetched bytes are written with
``pwrite`` and made durable before ``.present`` records them (under an exclusive ``flock`` of
``.present``); two processes fetching the same range write the same bytes, so racing is harmless.
Every GET asks for the object's ETag (``If-Match``) and checks the answer's ETag and total size:
an object replaced meanwhile is an error, never mixed bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .remote_slides import SOURCE, Pin, _head, _make_room, _pin, cache_dir
from .slide_files import SlideError
from .storage import s3_client, split_s3_url

__all__ = ["RANGE_SUFFIXES", "RangedSlide", "fetched_bytes", "open_ranged", "rangeable"]

RANGE_SUFFIXES = (".svs", ".tif", ".tiff")
#: TIFF compressions whose missing bytes fail to decode (JPEG, Aperio's JPEG 2000 variants).
SAFE_COMPRESSIONS = {7, 33003, 33005}
PRESENT = ".present"
#: The entry's levels (size, tile size, tile byte ranges), parsed once per node.
LAYOUT = ".layout.json"
#: Byte ranges closer than this are fetched as one GET.
MERGE_GAP = 64 * 1024
#: GETs in flight at once per prefetch.
FETCH_THREADS = 8

_counter = threading.Lock()
_fetched = [0]


def fetched_bytes() -> int:
    """Bytes this process has fetched by ranged GETs so far."""
    return _fetched[0]


def rangeable(url: str) -> bool:
    """Whether the slide at ``url`` may be read by ranges: by its suffix (the directories are
    checked when its entry is made)."""
    return Path(split_s3_url(url)[1]).suffix.lower() in RANGE_SUFFIXES


def _merge(ranges: Iterable[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _missing(want: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of the sorted, merged ``want`` not covered by the sorted, merged ``have``."""
    out, j = [], 0
    for a, b in want:
        while j < len(have) and have[j][1] <= a:
            j += 1
        k, pos = j, a
        while pos < b:
            if k < len(have) and have[k][0] <= pos:
                pos = max(pos, have[k][1])
                k += 1
            else:
                stop = min(b, have[k][0]) if k < len(have) else b
                out.append((pos, stop))
                pos = stop
    return out


class _Remote:
    """Ranged GETs of one object version (``If-Match`` its ETag)."""

    def __init__(self, url: str, size: int, etag: str) -> None:
        self.url, self.size, self.etag = url, size, etag
        self.bucket, self.key = split_s3_url(url)

    def get(self, start: int, stop: int) -> bytes:
        try:
            resp = s3_client().get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{stop - 1}",
                IfMatch=self.etag,
            )  # fmt: skip
            data = resp["Body"].read()
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise SlideError(
                f"{self.url}: reading bytes of the slide failed ({exc}): retry"
            ) from None
        total = str(resp.get("ContentRange", "")).rsplit("/", 1)[-1]
        if str(resp.get("ETag", self.etag)) != self.etag or (
            total.isdigit() and int(total) != self.size
        ):
            raise SlideError(f"{self.url}: the object changed while it was read: retry")
        if len(data) != stop - start:
            raise SlideError(f"{self.url}: short read ({len(data)} of {stop - start} bytes): retry")
        with _counter:
            _fetched[0] += len(data)
        return data

    def get_many(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        if len(ranges) == 1:
            yield ranges[0][0], self.get(*ranges[0])
            return
        with ThreadPoolExecutor(min(FETCH_THREADS, len(ranges))) as pool:
            yield from zip(
                (a for a, _ in ranges), pool.map(lambda r: self.get(*r), ranges), strict=True
            )


class _RemoteFile:
    """A read-only file over :class:`_Remote` with 64 KB blocks, for tifffile's parser."""

    BLOCK = 64 * 1024

    def __init__(self, remote: _Remote) -> None:
        self.remote, self.pos, self.blocks = remote, 0, {}
        self.read_ranges: list[tuple[int, int]] = []

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.remote.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        stop = self.remote.size if n < 0 else min(self.remote.size, self.pos + n)
        out = bytearray()
        while self.pos < stop:
            b = self.pos // self.BLOCK
            if b not in self.blocks:
                a = b * self.BLOCK
                self.blocks[b] = self.remote.get(a, min(self.remote.size, a + self.BLOCK))
                self.read_ranges.append((a, a + len(self.blocks[b])))
            block = self.blocks[b]
            part = block[self.pos - b * self.BLOCK : stop - b * self.BLOCK]
            out += part
            self.pos += len(part)
        return bytes(out)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.blocks.clear()


def _layout(remote: _Remote) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """``(ranges, levels)``: the byte ranges of the header, directories and tag values, and per
    tiled page (largest first) its size, tile size and tile byte ranges. :class:`SlideError`
    when the file is not a tiled TIFF whose tiles are all of :data:`SAFE_COMPRESSIONS`."""
    import tifffile

    handle = _RemoteFile(remote)
    ranges: list[tuple[int, int]] = [(0, 16)]
    levels = []
    try:
        with tifffile.TiffFile(handle) as tif:  # type: ignore[arg-type]
            entry = 20 if tif.is_bigtiff else 12
            head, tail = (8, 8) if tif.is_bigtiff else (2, 4)
            for page in tif.pages:
                tags = list(page.tags.values())
                ranges.append((page.offset, page.offset + head + entry * len(tags) + tail))
                ranges += [(t.valueoffset, t.valueoffset + t.valuebytecount) for t in tags]
                if page.is_tiled:
                    if int(page.compression) not in SAFE_COMPRESSIONS:
                        raise SlideError(f"{remote.url}: tiles compressed as {page.compression}")
                    levels.append({
                        "size": (int(page.imagewidth), int(page.imagelength)),
                        "tile": (int(page.tilewidth), int(page.tilelength)),
                        "ranges": [(int(o), int(o) + int(n))
                                   for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)],
                    })  # fmt: skip
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001 - not a TIFF tifffile can parse
        raise SlideError(f"{remote.url}: not a tiled TIFF ({exc})") from None
    if not levels:
        raise SlideError(f"{remote.url}: no tiled level")
    levels.sort(key=lambda lv: -lv["size"][0])
    return _merge(ranges + handle.read_ranges), levels


class RangedSlide:
    """An OpenSlide handle on the sparse copy of an ``s3://`` slide (module docstring): its
    attributes are OpenSlide's; ``read_region``, ``get_thumbnail`` and :meth:`prefetch` fetch
    what they need first. :meth:`close` closes it and releases its pin."""

    def __init__(self, url: str, entry: Path, pin: Pin, remote: _Remote, levels: list) -> None:
        import openslide

        self.url, self.entry, self.pin, self.remote = url, entry, pin, remote
        self.path = pin.path
        self._lock = threading.Lock()
        self._have = _read_present(entry)
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as exc:
            pin.release()
            raise SlideError(f"{url}: OpenSlide cannot read its ranges ({exc})") from None
        dims = [tuple(d) for d in self._osr.level_dimensions]
        by_size = {tuple(lv["size"]): lv for lv in levels}
        if any(d not in by_size for d in dims):
            self.close()
            raise SlideError(f"{url}: its levels {dims} are not its tiled pages")
        self._levels = [by_size[d] for d in dims]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._osr, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._osr.close()
        self.pin.release()

    def _tiles(
        self, level: int, loc: tuple[int, int], size: tuple[int, int]
    ) -> list[tuple[int, int]]:
        lv = self._levels[level]
        ds = self._osr.level_downsamples[level]
        (tw, th), (w, h) = lv["tile"], lv["size"]
        x0, y0 = loc[0] / ds - 1, loc[1] / ds - 1
        x1, y1 = x0 + size[0] + 2, y0 + size[1] + 2
        cols = -(-w // tw)
        c0, c1 = max(0, int(x0 // tw)), min(cols - 1, int(x1 // tw))
        r0, r1 = max(0, int(y0 // th)), min(-(-h // th) - 1, int(y1 // th))
        return [lv["ranges"][r * cols + c] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    def prefetch(
        self, level: int, regions: Iterable[tuple[tuple[int, int], tuple[int, int]]]
    ) -> None:
        """Fetch the tiles of ``level`` that ``(location, size)`` regions touch (as
        ``read_region`` takes them), those not fetched yet, in parallel."""
        want = _merge(r for loc, size in regions for r in self._tiles(level, loc, size))
        with self._lock:
            if not _missing(want, self._have):
                return
            self._have = _read_present(self.entry)
            need = _merge(_missing(want, self._have), MERGE_GAP)
            if need:
                _store(self.entry, self.path, self.remote, need)
                self._have = _read_present(self.entry)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        self.prefetch(level, [(location, size)])
        return self._osr.read_region(location, level, size)

    def get_thumbnail(self, size: tuple[int, int]) -> Any:
        down = max(d / s for d, s in zip(self._osr.dimensions, size, strict=True))
        level = self._osr.get_best_level_for_downsample(down)
        self.prefetch(level, [((0, 0), self._osr.level_dimensions[level])])
        return self._osr.get_thumbnail(size)


def _read_present(entry: Path) -> list[tuple[int, int]]:
    try:
        return [tuple(r) for r in json.loads((entry / PRESENT).read_text())]  # type: ignore[misc]
    except (OSError, ValueError):
        return []


def _store(entry: Path, path: str, remote: _Remote, ranges: list[tuple[int, int]]) -> None:
    """Fetch ``ranges`` into the sparse file, make them durable, then record them."""
    _make_room(entry.parent, sum(b - a for a, b in ranges), keep=entry)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for start, data in remote.get_many(ranges):
            os.pwrite(fd, data, start)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    lock = os.open(entry / PRESENT, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = _merge(_read_present(entry) + ranges)
        tmp = entry / f"{PRESENT}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(have))
        os.rename(tmp, entry / PRESENT)
    finally:
        os.close(lock)


def open_ranged(url: str) -> RangedSlide:
    """The slide at ``url`` read by ranges (module docstring), its entry made when missing;
    :class:`SlideError` (one line naming ``url``) when it cannot be (the caller copies it whole
    instead, for a file that is not a tiled JPEG TIFF)."""
    bucket, key = split_s3_url(url)
    size, etag = _head(url, bucket, key)
    want = {"url": url, "size": size, "etag": etag}
    remote = _Remote(url, size, etag)
    cache = cache_dir()
    version = hashlib.sha256(f"{url}|{size}|{etag}".encode()).hexdigest()[:16]
    entry = cache / f"{version}-ranges"
    path = entry / Path(key).name
    for _ in range(2):
        fd = _pin(path, want)
        if isinstance(fd, int):
            try:
                levels = json.loads((entry / LAYOUT).read_text())
            except (OSError, ValueError):
                os.close(fd)
                raise SlideError(
                    f"{url}: its range cache entry {entry} is damaged: remove it"
                ) from None
            return RangedSlide(url, entry, Pin(str(path), fd), remote, levels)
        ranges, levels = _layout(remote)
        _create(cache, entry, path.name, want, remote, ranges + levels[-1]["ranges"], levels)
    raise SlideError(f"{url}: its range cache entry was evicted twice in a row: retry")


def _create(
    cache: Path, entry: Path, name: str, want: dict, remote: _Remote, ranges: list, levels: list
) -> None:
    """Publish a new entry holding ``ranges`` (unless another task just did)."""
    if entry.exists():
        return
    import shutil

    staging = cache / f".tmp-{uuid.uuid4().hex}"
    staging.mkdir(mode=0o700)
    try:
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a live staging folder: never cleared as abandoned
            os.ftruncate(fd, want["size"])  # sparse: no block until written
            (staging / SOURCE).write_text(json.dumps(want))
            (staging / PRESENT).write_text("[]")
            (staging / LAYOUT).write_text(json.dumps(levels))
            _store(staging, str(staging / name), remote, _merge(ranges, MERGE_GAP))
            with contextlib.suppress(OSError):  # another task published it first
                os.rename(staging, entry)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
