"""The hand-written tar reader gives webdataset's samples on real shards and odd tars, reads
seekable and non-seekable streams alike, and raises TarFormatError for every damage."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from resdistill.data.tar_members import TarFormatError, iter_samples, split_name
from sharding.layout import shard_name
from tests.fixtures_data import write_dataset

WANTED = {"2p5x.jpg", "json"}
MAGS = ("10x", "5x", "2p5x", "1p25x")
URL = "file:///shard.tar"


class _Pipe(io.RawIOBase):
    """A non-seekable stream over bytes that returns at most ``step`` bytes per read, as a
    socket would."""

    def __init__(self, data: bytes, step: int = 7000) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        n = len(self._data) - self._pos if n < 0 else min(n, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


def _ours(data: bytes, wanted: set[str], *, seekable: bool) -> list[dict[str, Any]]:
    stream = io.BytesIO(data) if seekable else _Pipe(data)
    return list(iter_samples(stream, wanted, URL))


def _webdataset(data: bytes, wanted: set[str], *, select: bool) -> list[dict[str, Any]]:
    """webdataset's samples: members selected before grouping (as the training stream does), or
    all members grouped and only ``wanted`` suffixes kept (``group_by_keys(suffixes=...)``)."""
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

    def pick(name: str) -> bool:
        return (base_plus_ext(name)[1] or "").lower() in wanted

    files = tar_file_expander(
        [{"url": URL, "stream": io.BytesIO(data)}],
        select_files=pick if select else None,
        eof_value=None,
    )
    return list(group_by_keys(files, suffixes=None if select else wanted))


def _assert_like_webdataset(data: bytes, wanted: set[str]) -> list[dict[str, Any]]:
    ours = _ours(data, wanted, seekable=True)
    assert ours == _ours(data, wanted, seekable=False)
    assert ours == _webdataset(data, wanted, select=False)
    # selecting before grouping drops samples without a wanted member; the rest are the same
    assert [s for s in ours if len(s) > 2] == _webdataset(data, wanted, select=True)
    return ours


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    write_dataset(root, mags=MAGS, tile_px=64, shard_sizes={"train": [12, 12]})
    return root


def as_ustar(data: bytes) -> bytes:
    """A shard rewritten as sharding/shardwriter.py writes one: USTAR, mode 0o444, mtime 0 (no pax
    headers; webdataset's TarWriter adds one per member for its float mtime)."""
    out = io.BytesIO()
    src = tarfile.open(fileobj=io.BytesIO(data))  # noqa: SIM115
    with src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            info = tarfile.TarInfo(member.name)
            info.size, info.mode, info.mtime = member.size, 0o444, 0
            dst.addfile(info, src.extractfile(member))
    return out.getvalue()


@pytest.fixture(scope="module", params=["webdataset", "shardwriter"])
def shard(request: pytest.FixtureRequest, dataset: Path) -> bytes:
    data = (dataset / shard_name("train", 0)).read_bytes()
    return data if request.param == "webdataset" else as_ustar(data)


def _tar(members: list[tuple[str, bytes | None]], fmt: int) -> bytes:
    """A tar of ``(name, data)`` members in ``fmt``; data None is a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _odd_members() -> list[tuple[str, bytes | None]]:
    """Long (> 100 and > 255 characters) and non-ASCII names, dotted folders, directories,
    members without an extension, webdataset metadata names, upper-case extensions."""
    deep = "/".join(["folder.v2"] * 12)
    members: list[tuple[str, bytes | None]] = [("__meta__", b"skipped"), (deep, None)]
    for i, stem in enumerate(["short", "x" * 120, "tile_ä_éß_漢字", "y" * 300]):
        members += [
            (f"{deep}/{stem}_{i}.10x.jpg", bytes([i]) * 1500),
            (f"{deep}/{stem}_{i}.2p5x.JPG", bytes([i + 1]) * (511 + i)),
            (f"{deep}/{stem}_{i}.json", b'{"i": %d}' % i),
        ]
    members += [("README", b"no extension"), ("only.10x.jpg", b"\xff" * 513), ("d/", None)]
    return members


def test_real_shards_match_webdataset(shard: bytes) -> None:
    data = shard
    ours = _assert_like_webdataset(data, WANTED)
    assert len(ours) == 12 and all(set(s) == {"__key__", "__url__", *WANTED} for s in ours)


def test_a_sample_without_a_wanted_member_is_kept_with_its_key(shard: bytes) -> None:
    ours = _assert_like_webdataset(shard, {"20x.jpg"})
    assert len(ours) == 12 and all(set(s) == {"__key__", "__url__"} for s in ours)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_non_ascii_names_and_directories(fmt: int) -> None:
    ours = _assert_like_webdataset(_tar(_odd_members(), fmt), {"2p5x.jpg", "json"})
    assert [s["__key__"].rsplit("/", 1)[-1][:8] for s in ours] == [
        "short_0", "x" * 8, "tile_ä_é", "y" * 8, "only"
    ]  # fmt: skip


def test_ustar_prefix_field() -> None:
    """USTAR (what sharding/shardwriter.py writes) splits paths over 100 characters into the
    prefix and name fields."""
    members = [(f"{'p' * 90}/{'q' * 60}/k{i}.{ext}", b"%d" % i) for i in range(3) for ext in ("json", "5x.jpg")]  # fmt: skip
    data = _tar(members, tarfile.USTAR_FORMAT)
    assert data[345:350] == b"p" * 5  # the prefix field is in use
    ours = _assert_like_webdataset(data, {"json"})
    assert [s["json"] for s in ours] == [b"0", b"1", b"2"]


def test_empty_tar_and_signed_checksum() -> None:
    assert _assert_like_webdataset(_tar([], tarfile.PAX_FORMAT), WANTED) == []
    data = bytearray(_tar([("é.json", b"{}")], tarfile.USTAR_FORMAT))  # UTF-8 bytes >= 128
    signed = 256 + sum(b - 256 if b >= 128 else b for b in data[:148] + data[156:512])
    data[148:156] = b"%06o\0 " % signed
    assert _assert_like_webdataset(bytes(data), {"json"}) == [
        {"__key__": "é", "__url__": URL, "json": b"{}"}
    ]


def test_pax_size_overrides_the_header_size() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("k.json")
        info.size, info.pax_headers = 700, {"size": "700"}
        tf.addfile(info, io.BytesIO(b"a" * 700))
        tf.addfile(tarfile.TarInfo("k.5x.jpg"), io.BytesIO(b""))
    data = bytearray(out.getvalue())
    at = _offsets(bytes(data))[0] + 1024  # the member's own header, after the pax header
    data[at + 124 : at + 136] = b"%011o\0" % 0
    data[at + 148 : at + 156] = b"%06o\0 " % (
        sum(data[at : at + 148]) + sum(data[at + 156 : at + 512]) + 256
    )
    ours = _assert_like_webdataset(bytes(data), {"json", "5x.jpg"})
    assert ours == [{"__key__": "k", "__url__": URL, "json": b"a" * 700, "5x.jpg": b""}]


def test_base256_size() -> None:
    data = bytearray(_tar([("k.json", b"12345")], tarfile.USTAR_FORMAT))
    data[124:136] = b"\x80" + (5).to_bytes(11, "big")
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + sum(data[156:512]) + 256)
    assert _ours(bytes(data), {"json"}, seekable=True)[0]["json"] == b"12345"


def test_split_name_matches_webdataset() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in ["a.b.c", "d.x/k.json", "d/.hidden", ".x", "nodot", "a/b", "x.y/z", "k.", "a/.b.c"]:
        assert split_name(name) == base_plus_ext(name), name


# -- damage: each raises TarFormatError, seekable or not -------------------------------------


def _offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf.getmembers()]


def _cut_in_a_member(data: bytes) -> bytes:
    """Cut inside the data of the middle member (the 10x image of a sample)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    member = members[len(members) // 2]
    assert member.name.endswith(".10x.jpg")
    return data[: member.offset_data + member.size // 2]


def _cut_in_a_header(data: bytes) -> bytes:
    return data[: _offsets(data)[len(_offsets(data)) // 2] + 100]


def _cut_in_padding(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = tf.getmembers()[-1]
    return data[: member.offset_data + member.size + 1]


def _garble_a_header(data: bytes) -> bytes:
    at = _offsets(data)[len(_offsets(data)) // 2]
    return data[:at] + b"\x7f" * 512 + data[at + 512 :]


def _bad_size_field(data: bytes) -> bytes:
    """A size that is not octal, under a valid checksum."""
    at = _offsets(data)[3]
    header = bytearray(data[at : at + 512])
    header[124:136] = b"9" * 11 + b"\0"
    header[148:156] = b"%06o\0 " % (sum(header[:148]) + sum(header[156:]) + 256)
    return data[:at] + bytes(header) + data[at + 512 :]


def _empty(data: bytes) -> bytes:
    return b""


def _first_300_bytes(data: bytes) -> bytes:
    return data[:300]


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


DAMAGE: list[Callable[[bytes], bytes]] = [
    _cut_in_a_member, _cut_in_a_header, _cut_in_padding, _garble_a_header, _bad_size_field, _gzip,
    _empty, _first_300_bytes,
]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("seekable", [True, False], ids=["seek", "pipe"])
@pytest.mark.parametrize("wanted", [WANTED, {"10x.jpg", "5x.jpg"}], ids=["low", "high"])
def test_damage_raises(shard: bytes, damage, seekable: bool, wanted: set[str]) -> None:
    data = damage(shard)
    with pytest.raises(TarFormatError) as err:
        _ours(data, wanted, seekable=seekable)
    assert "\n" not in str(err.value)


def test_a_cut_at_a_header_ends_the_archive_like_webdataset(shard: bytes) -> None:
    """A cut exactly at a header is a clean end: the samples before it come out, and the caller,
    which knows how many samples the shard holds, reports the shortfall."""
    data = shard
    cut = data[: _offsets(data)[25]]  # 5 samples of 5 members (4 images, json)
    assert len(_assert_like_webdataset(cut, WANTED)) == 5


def test_a_bad_image_is_read_as_bytes(shard: bytes) -> None:
    data = shard
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        first = next(m for m in tf.getmembers() if m.name.endswith(".2p5x.jpg"))
    at = first.offset_data
    bad = data[:at] + b"\0" * 40 + data[at + 40 :]
    assert _assert_like_webdataset(bad, WANTED)[0]["2p5x.jpg"][:40] == b"\0" * 40


def test_duplicate_wanted_member_raises() -> None:
    data = _tar([("k.json", b"1"), ("k.json", b"2")], tarfile.PAX_FORMAT)
    with pytest.raises(TarFormatError, match="duplicate"):
        _ours(data, {"json"}, seekable=True)


def test_reading_stops_where_the_consumer_stops(shard: bytes) -> None:
    """A generator: the stream is read only as far as the samples taken."""
    stream = io.BytesIO(shard)
    samples: Iterator[dict[str, Any]] = iter_samples(stream, WANTED, URL)
    next(samples)
    assert stream.tell() < len(stream.getvalue()) // 4
