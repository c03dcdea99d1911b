"""Write samples of one split into WebDataset tar shards, publishing each one atomically.

A shard is first written to a local scratch file, then published with
:meth:`Storage.put_file` (an atomic rename locally, a completed (multipart) upload on S3), and only
then is its index fragment (``_state/index/<split>/shard-NNNNNN.parquet``, the manifest rows of the
samples inside) written. A shard without a fragment is therefore an interrupted publish, which the
next run deletes; the manifest is rebuilt from fragments, so it lists exactly the published samples.

Samples pass through a shuffle buffer (reservoir of ``buffer_bytes``) so that each shard mixes the
regions of every slide being processed at the time, not one slide after another.
"""

from __future__ import annotations

import os
import random
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .extract import Sample
from .layout import STATE_DIR, shard_name
from .manifest import rows_to_parquet
from .storage import Storage

TAR_BLOCK = 512


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
        self._buffer: list[Sample] = []
        self._buffered = 0
        self._tar: tarfile.TarFile | None = None
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
            os.close(fd)
            self._tmp = Path(tmp)
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            self._size = 2 * TAR_BLOCK * 10  # end-of-archive padding, counted up front
        for ext, data in sample.members.items():
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, _Reader(data))
            self._size += member_bytes(len(data))
        self._rows.append(sample.row)
        if self._size >= self.shard_size:
            self._publish()

    def _publish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        rel = shard_name(self.split, self.index)
        rows = [{**row, "shard": rel} for row in self._rows]
        self.store.put_file(rel, self._tmp)
        self.store.write_bytes(fragment_name(rel), rows_to_parquet(rows, self.mag_names))
        self._tmp.unlink(missing_ok=True)
        self._tmp = None
        self._rows = []
        self.index += 1
        self.published.append(rel)
        if self.on_publish:
            self.on_publish(rel, rows)


class _Reader:
    """Minimal file object over bytes for ``TarFile.addfile`` (avoids a BytesIO copy)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        chunk = self._view[self._pos : end]
        self._pos = end
        return bytes(chunk)
