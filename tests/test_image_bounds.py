"""An image whose header claims more pixels than the dataset's tile is refused with the shard
error before it is decoded: a 60000x60000 px JPEG header would otherwise cost ~10 GB."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from resdistill.data import DatasetInfo, ShardError, TileStream, shard_keys
from sharding.layout import shard_name
from tests.fixtures_data import write_dataset
from tests.test_bounded_reads import first_member, rewrite_shard

pytestmark = pytest.mark.timeout(120)

BAD = shard_name("train", 1)
BIG = 60000  # a header claiming 60000x60000 px: ~10 GB once decoded


def _jpeg_claiming(data: bytes, px: int) -> bytes:
    """The JPEG ``data`` with its frame header (SOF0/SOF2) saying ``px`` x ``px``."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", px, px) + data[at + 9 :]
    raise AssertionError("no frame header")


def _png_claiming(data: bytes, px: int) -> bytes:
    """The PNG ``data`` with its IHDR saying ``px`` x ``px`` (CRC fixed, so it is well formed)."""
    assert data[12:16] == b"IHDR"
    body = struct.pack(">II", px, px) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return data[:16] + body + crc + data[33:]


@pytest.fixture
def no_big_decode(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every JPEG simplejpeg is asked to decode, as ``(h, w)``; asking for a big one fails the
    test instead of allocating gigabytes (the old code decoded before looking at the size)."""
    import simplejpeg

    real = simplejpeg.decode_jpeg
    seen: list[tuple[int, int]] = []

    def guarded(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        h, w = simplejpeg.decode_jpeg_header(data)[:2]
        seen.append((h, w))
        assert h * w <= 1 << 20, f"decoded a {w}x{h} px JPEG before checking its size"
        return real(data, *args, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", guarded)
    return seen


def _stream(root: Path, mags: list[str], *, check_size: bool = True) -> TileStream:
    import pyarrow.parquet as pq

    info = DatasetInfo.load(str(root))
    keys = shard_keys(pq.read_table(root / "manifest.parquet"), ["train"])
    return TileStream(info, keys, mags, repeat=False, check_size=check_size)


@pytest.mark.parametrize(
    ("fmt", "px", "check_size"),
    [("jpeg", BIG, True), ("jpeg", BIG, False), ("jpeg", 640, True), ("jpeg", 640, False),
     ("png", BIG, True), ("png", 640, False)],
)  # fmt: skip
def test_an_image_claiming_more_pixels_than_its_tile_is_refused_before_decoding(
    tmp_path: Path, no_big_decode, fmt: str, px: int, check_size: bool
) -> None:
    root = tmp_path / "ds"
    write_dataset(root, fmt=fmt, shard_sizes={"train": [6, 6, 6], "val": [4], "test": [4]})
    ext = "10x.jpg" if fmt == "jpeg" else "10x.png"
    craft = _jpeg_claiming if fmt == "jpeg" else _png_claiming
    change = first_member(ext, lambda data: (craft(data, px), {}))
    rewrite_shard(root / BAD, change)
    key = change.state["name"].rsplit(".", 2)[0]
    with pytest.raises(ShardError) as err:
        list(_stream(root, ["10x", "5x"], check_size=check_size))
    message = str(err.value)
    assert "\n" not in message and BAD in message and key in message, message
    assert f"{px}x{px}" in message, message
    assert all(h * w <= 32 * 32 for h, w in no_big_decode), no_big_decode


def test_tiles_of_the_right_size_still_decode(tmp_path: Path, no_big_decode) -> None:
    root = tmp_path / "ds"
    write_dataset(root, shard_sizes={"train": [6, 6, 6], "val": [4], "test": [4]})
    samples = list(_stream(root, ["10x", "5x"]))
    assert len(samples) == 18
    assert {tuple(s[0][0].shape) for s in samples} == {(3, 32, 32)}
    assert {tuple(s[0][1].shape) for s in samples} == {(3, 16, 16)}
    assert len(no_big_decode) == 36
