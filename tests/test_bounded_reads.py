"""Crafted shards fail fast with one line: a tar member whose size field is negative or absurd
never makes the reader seek backwards (a hang) or allocate what it claims.

Shard rewriting helpers (:func:`rewrite_shard`, :func:`first_member`) are shared with
``tests/test_image_bounds.py``."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from resdistill.data import DatasetInfo, ShardError, make_loader
from resdistill.data.tar_members import TarFormatError, iter_samples
from sharding.layout import shard_name
from tests.fixtures_data import write_dataset

# the old reader looped forever on a negative size: a hang must fail the test, not the session
pytestmark = pytest.mark.timeout(60)

BAD = shard_name("train", 1)


class _Pipe(io.RawIOBase):
    """A non-seekable stream over bytes (as an S3 body is), at most 7000 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        chunk = self._data[self._pos : self._pos + min(len(buffer), 7000)]
        buffer[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def rewrite_shard(path: Path, change: Callable[[str, bytes], tuple[bytes, dict[str, str]]]) -> None:
    """Rewrite the shard at ``path`` as a pax tar; ``change(name, data)`` gives each member's
    data and extra pax headers."""
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:  # fmt: skip
        for member in src.getmembers():
            data, pax = change(member.name, src.extractfile(member).read())  # type: ignore[union-attr]
            info = tarfile.TarInfo(member.name)
            info.size, info.pax_headers = len(data), pax
            dst.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def first_member(suffix: str, fn: Callable[[bytes], tuple[bytes, dict[str, str]]]):  # type: ignore[no-untyped-def]
    """A ``change`` applying ``fn`` to the first member named ``*suffix`` only; that member's
    name is kept in ``change.state["name"]``."""
    state: dict[str, str] = {}

    def change(name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
        if "name" not in state and name.endswith(suffix):
            state["name"] = name
            return fn(data)
        return data, {}

    change.state = state  # type: ignore[attr-defined]
    return change


# -- tar sizes ---------------------------------------------------------------------------------

# -1536: back to the member's own pax header, which the old reader then read again, forever
SIZES = ["-1536", "-1024", "-1", str(1 << 62), str(10**30)]


def _pax_size_tar(size: str) -> bytes:
    """Two samples of json + 10x.jpg; the second sample's image member carries pax ``size``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key in ("a", "b"):
            for ext, data in (("json", b"{}"), ("10x.jpg", b"\xff" * 1500)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if key == "b" and ext == "10x.jpg":
                    info.pax_headers = {"size": size}
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seekable", [True, False], ids=["seek", "pipe"])
@pytest.mark.parametrize("wanted", [{"json"}, {"json", "10x.jpg"}], ids=["skipped", "read"])
def test_a_negative_or_absurd_member_size_is_refused(size: str, seekable: bool, wanted) -> None:
    data = _pax_size_tar(size)
    stream = io.BytesIO(data) if seekable else io.BufferedReader(_Pipe(data), 1 << 20)
    with pytest.raises(TarFormatError) as err:
        list(iter_samples(stream, wanted, "file:///x.tar"))
    message = str(err.value)
    assert "\n" not in message and "'b.10x.jpg'" in message and size in message, message


@pytest.mark.parametrize("seekable", [True, False], ids=["seek", "pipe"])
def test_a_member_over_the_read_chunk_is_read_whole(seekable: bool) -> None:
    """Members bigger than one read chunk are read in chunks, byte for byte."""
    big = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a multiple of the chunk
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("k.10x.jpg")
        info.size = len(big)
        tf.addfile(info, io.BytesIO(big))
    data = out.getvalue()
    stream = io.BytesIO(data) if seekable else io.BufferedReader(_Pipe(data), 1 << 20)
    assert list(iter_samples(stream, {"10x.jpg"}, "x")) == [
        {"__key__": "k", "__url__": "x", "10x.jpg": big}
    ]
    cut = data[: 512 + len(big) // 2]
    stream = io.BytesIO(cut) if seekable else io.BufferedReader(_Pipe(cut), 1 << 20)
    with pytest.raises(TarFormatError, match="truncated member data"):
        list(iter_samples(stream, {"10x.jpg"}, "x"))


def test_a_negative_pax_size_in_a_shard_stops_training_with_the_shard_error(tmp_path: Path) -> None:
    """The student reads 5x only, so the 10x member with the crafted size is skipped: the old
    reader seeked back to the pax header and read it again, forever."""
    root = tmp_path / "ds"
    write_dataset(root, shard_sizes={"train": [6, 6, 6], "val": [4], "test": [4]})
    change = first_member(".10x.jpg", lambda data: (data, {"size": "-1536"}))
    rewrite_shard(root / BAD, change)
    loader = make_loader(DatasetInfo.load(str(root)), ["train"], ["5x"], batch_size=4,
                         train=False, num_workers=0, shuffle_buffer=0)  # fmt: skip
    with pytest.raises(ShardError) as err:
        for _batch in loader.epoch():
            pass
    message = str(err.value)
    assert "\n" not in message and BAD in message and change.state["name"] in message, message
