"""The fast paths of sharding give the pixels, numbers and bytes of the slower code they replace:
RGBA -> RGB of a region, per-tile statistics from histograms, the JPEG/PNG encoder, the
channel-wise HSV of tissue detection, and the shard writer's hand-written tar."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding.codec import channel_stats, encode
from sharding.extract import Sample
from sharding.ink import hsv
from sharding.options import ShardOptions
from sharding.shardwriter import ShardWriter, member_header
from sharding.slide import rgb_image, to_rgb
from sharding.storage import open_storage


def _rgba(seed: int, transparent: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    arr[..., 3] = 255
    if transparent:
        arr[:10, :, 3] = 0  # an unscanned strip
        arr[10:20, :, 3] = 128  # and a half-transparent one
    return Image.fromarray(arr, "RGBA")


@pytest.mark.parametrize("transparent", [False, True])
def test_rgb_image_is_to_rgb(transparent: bool) -> None:
    region = _rgba(0, transparent)
    out = rgb_image(region)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), to_rgb(region))
    if transparent:
        assert (np.asarray(out)[:10] == 255).all()  # unscanned glass is white
    else:
        assert np.array_equal(np.asarray(out), np.asarray(region)[..., :3])


def test_channel_stats_are_exact_means() -> None:
    top = rgb_image(_rgba(1, False))
    images = [top, top.reduce(2), top.convert("L").convert("RGB")]
    means, sqmeans = channel_stats(images)
    assert means.shape == sqmeans.shape == (3, 3)
    for img, mean, sqmean in zip(images, means, sqmeans, strict=True):
        x = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        assert np.allclose(mean, x.mean(0), rtol=0, atol=1e-12)
        assert np.allclose(sqmean, (x * x).mean(0), rtol=0, atol=1e-12)


def _sampling(data: bytes) -> tuple[int, int]:
    """(horizontal, vertical) sampling factor of the first (luma) component of a JPEG."""
    img = Image.open(io.BytesIO(data))
    return img.layer[0][1], img.layer[0][2]


@pytest.mark.parametrize(("quality", "luma_sampling"), [(90, (1, 1)), (80, (2, 2))])
def test_jpeg_encode_is_close_and_keeps_chroma_rule(quality: int, luma_sampling) -> None:
    # A smooth image, as tissue at tile scale is; JPEG of noise would say nothing.
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    opts = ShardOptions.make("10", 64, quality=quality)
    data = encode(Image.fromarray(arr), opts)
    assert data == encode(arr, opts)  # a PIL image or an array: the same bytes
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - arr).mean() < 2.0
    # 4:4:4 from quality 90 (luma not subsampled relative to chroma), else 4:2:0
    assert _sampling(data) == luma_sampling


def test_png_encode_is_lossless() -> None:
    arr = np.asarray(rgb_image(_rgba(2, False)))
    data = encode(Image.fromarray(arr), ShardOptions.make("10", 48, fmt="png"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)


def _hsv_reference(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV as the tissue detector first computed it: interleaved pixels, max/min over axis 2."""
    arr = rgb.astype(np.float32) / 255.0
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    cmax = arr.max(axis=2)
    chroma = cmax - arr.min(axis=2)
    sat = np.divide(chroma, cmax, out=np.zeros_like(cmax), where=cmax > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        cmax == r, ((g - b) / safe) % 6, np.where(cmax == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return (hue * 60.0) % 360.0, sat, cmax


def test_hsv_is_bit_identical_to_the_reference() -> None:
    """The tissue masks (and so the regions of every dataset) cannot move: same bits."""
    levels = np.arange(0, 256, 3, dtype=np.uint8)  # every colour on a grid of step 3: 636,056
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 86, 3)
    for got, want in zip(hsv(rgb), _hsv_reference(rgb), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)


def test_shard_writer_writes_tarfiles_bytes(tmp_path: Path) -> None:
    """Two shards of samples with odd member sizes (empty ones too) equal, byte for byte, what
    ``tarfile`` writes for the same members in the same order."""
    rnd = random.Random(0)
    samples = [
        Sample(
            key=f"slide_{i}_{2 * i}",
            members={"10x.jpg": rnd.randbytes(rnd.randrange(0, 3000)), "json": b"{}"},
            row={
                "key": f"slide_{i}_{2 * i}",
                "slide": "slide",
                "x": i,
                "y": 2 * i,
                "split": "train",
                "shard": "",
            },  # fmt: skip
        )
        for i in range(9)
    ]
    store = open_storage(str(tmp_path / "out"))
    writer = ShardWriter(store, "train", 0, 12_000, ["10x"], scratch=tmp_path, buffer_bytes=0)
    for sample in samples:
        writer.add(sample)
    writer.close()
    assert len(writer.published) >= 2
    order = []
    for rel in writer.published:
        data = (tmp_path / "out" / rel).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
        keys = list(dict.fromkeys(n.split(".")[0] for n in names))
        order.append(keys)
        want = io.BytesIO()
        with tarfile.open(fileobj=want, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key in keys:
                sample = next(s for s in samples if s.key == key)
                for ext, member in sample.members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(member), 0o444, 0
                    tar.addfile(info, io.BytesIO(member))
        assert data == want.getvalue()
    assert [k for keys in order for k in keys] == [s.key for s in samples]


@pytest.mark.parametrize(
    ("name", "size"),
    [("k.json", 0), ("é_1_2.10x.jpg", 511), ("n" * 100, 8**11 - 1), ("d" * 60 + "/" + "n" * 60, 5)],
)
def test_member_header_is_tarfiles(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING)


def test_member_header_refuses_what_tarfile_refuses() -> None:
    with pytest.raises(ValueError, match="too long"):
        member_header("s" * 120 + ".json", 1)  # no "/" to split a prefix at
