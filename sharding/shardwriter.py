"""Write samples of one split into WebDataset tar shards, publishing each one atomically.

A shard is first written to a local scratch file, then published with
:meth:`Storage.put_file` (an atomic rename locally, a completed (multipart) upload on S3), and only
then is its index fragment (``_state/index/<split>/shard-NNNNNN.parquet``, the manifest rows of the
samples inside) written. A shard without a fragment is therefore an interrupted publish, which the
next run deletes; the manifest is rebuilt from fragments, so it lists exactly the published samples.

Samples pass through a shuffle buffer (reservoir of ``buffer_bytes``) so that each shard mixes the
regions of every slide being processed at the time, not one slide after another.

The tar is written as ``tarfile`` writes it, byte for byte (USTAR headers, members padded to
512-byte blocks, two zero blocks and padding to a 10240-byte record at the end), but cheaper: a
sample's members go out in one buffered write instead of ``TarFile.addfile``'s per-member copies,
and a header is ``tarfile``'s own header of an empty member with the name, size and checksum
fields filled in (:func:`member_header`) instead of being built field by field for every member.
"""

from __future__ import annotations

import os
import random
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .extract import Sample
from .layout import STATE_DIR, shard_name
from .manifest import rows_to_parquet
from .storage import Storage

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile.RECORDSIZE: an archive's length is a multiple of it


def _empty_header() -> tuple[bytes, int]:
    """The header ``tarfile`` writes for a member as the writer makes them (mode 0444, mtime 0),
    with the name and size fields zeroed and the checksum field blank, and its byte sum."""
    info = tarfile.TarInfo("")
    info.mode, info.mtime = 0o444, 0
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
    block[0:100] = bytes(100)  # name
    block[124:136] = bytes(12)  # size
    block[148:156] = b" " * 8  # checksum, counted as spaces
    return bytes(block), sum(block)


_EMPTY_HEADER, _EMPTY_SUM = _empty_header()


def member_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a member ``name`` of ``size`` bytes (mode 0444,
    mtime 0). A name over 100 bytes (split into prefix and name) or a size beyond 11 octal digits
    is left to ``tarfile`` itself."""
    raw = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(raw) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    block = bytearray(_EMPTY_HEADER)
    block[0 : len(raw)] = raw
    block[124:136] = size_field
    block[148:156] = b"%06o\0 " % (_EMPTY_SUM + sum(raw) + sum(size_field))
    return bytes(block)


def fragment_name(shard_rel: str) -> str:
    """Index fragment of a shard: ``_state/index/train/shard-000001.parquet``."""
    return f"{STATE_DIR}/index/{shard_rel[: -len('.tar')]}.parquet"


def member_bytes(size: int) -> int:
    """Bytes a member takes in a tar: one header block plus its data padded to blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class ShardWriter:
    """Stream samples of one split into shards of about ``shard_size`` bytes."""

    def __init__(
        self,
        store: Storage,
        split: str,
        first_index: int,
        shard_size: int,
        mag_names: list[str],
        scratch: str | Path | None = None,
        buffer_bytes: int | None = None,
        seed: int = 0,
        on_publish: Callable[[str, list[dict]], None] | None = None,
        before_publish: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.split = split
        self.index = first_index
        self.shard_size = shard_size
        self.mag_names = mag_names
        self.scratch = Path(scratch or tempfile.gettempdir())
        self.buffer_bytes = buffer_bytes if buffer_bytes is not None else min(shard_size, 64 << 20)
        self.rng = random.Random(f"{seed}:{split}")
        self.on_publish = on_publish
        self.before_publish = before_publish  # raises to refuse the publish (a lost lease)
        self._buffer: list[Sample] = []
        self._buffered = 0
        self._tar: BinaryIO | None = None  # the shard being written (scratch file)
        self._offset = 0  # bytes written to it
        self._tmp: Path | None = None
        self._rows: list[dict] = []
        self._size = 0
        self.published: list[str] = []

    def add(self, sample: Sample) -> None:
        self._buffer.append(sample)
        self._buffered += sample.nbytes
        while self._buffered > self.buffer_bytes and self._buffer:
            self._write(self._pop())

    def close(self) -> None:
        """Write what is buffered (in random order) and publish the last, partial shard."""
        while self._buffer:
            self._write(self._pop())
        self._publish()

    def abort(self) -> None:
        """Drop the unpublished shard (its samples are redone by the next run)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _pop(self) -> Sample:
        i = self.rng.randrange(len(self._buffer))
        self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
        sample = self._buffer.pop()
        self._buffered -= sample.nbytes
        return sample

    def _write(self, sample: Sample) -> None:
        if self._tar is None:
            fd, tmp = tempfile.mkstemp(
                prefix=f"{self.split}-", suffix=".tar.part", dir=self.scratch
            )
            self._tmp = Path(tmp)
            self._tar = os.fdopen(fd, "wb", buffering=1 << 20)
            self._offset = 0
            self._size = TAR_RECORD  # end-of-archive blocks and padding, a record counted up front
        parts: list[bytes] = []
        for ext, data in sample.members.items():
            parts += (member_header(f"{sample.key}.{ext}", len(data)), data)
            parts.append(bytes(-len(data) % TAR_BLOCK))
            self._size += member_bytes(len(data))
        chunk = b"".join(parts)
        self._tar.write(chunk)
        self._offset += len(chunk)
        self._rows.append(sample.row)
        if self._size >= self.shard_size:
            self._publish()

    def _finish_tar(self) -> None:
        """End the archive as ``TarFile.close`` does, and close the file."""
        end = 2 * TAR_BLOCK
        end += -(self._offset + end) % TAR_RECORD
        self._tar.write(bytes(end))
        self._tar.close()
        self._tar = None

    def _publish(self) -> None:
        if self._tar is None:
            return
        self._finish_tar()
        rel = shard_name(self.split, self.index)
        rows = [{**row, "shard": rel} for row in self._rows]
        if self.before_publish:
            self.before_publish()
        self.store.put_file(rel, self._tmp)
        self.store.write_bytes(fragment_name(rel), rows_to_parquet(rows, self.mag_names))
        self._tmp.unlink(missing_ok=True)
        self._tmp = None
        self._rows = []
        self.index += 1
        self.published.append(rel)
        if self.on_publish:
            self.on_publish(rel, rows)
