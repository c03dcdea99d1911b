"""How a wave of slides is cut into chunks (``engine.chunk_size``, ``engine._blocks``): few large
chunks where the slides are many, several per reading process where they are few, every region
once, each block one slide's."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from resdistill.predict.engine import (
    CHUNK_TILES,
    CHUNKS_PER_READER,
    _blocks,
    chunk_limit,
    chunk_size,
)


def _cut(tiles: list[int], px: int, readers: int, batch: int) -> list[pa.Table]:
    plans = {f"s{i}": SimpleNamespace(n_tiles=n) for i, n in enumerate(tiles)}
    cfg = SimpleNamespace(chunk_tiles=chunk_limit(px, batch), readers=readers, batch_size=batch)
    return _blocks(plans, cfg)


def _chunks(blocks: list[pa.Table]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for b in blocks:
        assert len(set(b["slide"].to_pylist())) == 1  # a block is one slide's
        for sid, start, stop in zip(
            *(b[c].to_pylist() for c in ("slide", "start", "stop")), strict=True
        ):
            out.setdefault(sid, []).append((start, stop))
    return out


def test_the_chunk_limit_holds_as_many_pixels_as_256_tiles_of_224_px() -> None:
    assert chunk_limit(224, 4) == CHUNK_TILES
    assert chunk_limit(56, 64) == 16 * CHUNK_TILES
    assert chunk_limit(28, 256) == 64 * CHUNK_TILES
    assert chunk_limit(448, 64) == 64  # never under a model call's batch


@pytest.mark.parametrize(
    ("total", "most", "readers", "least", "want"),
    [
        (12544, 4096, 2, 64, 12544 // (2 * CHUNKS_PER_READER)),  # many slides: large chunks
        (12544, 256, 2, 4, 256),  # ... up to the limit
        (392, 4096, 16, 64, 64),  # one slide, many readers: a model batch each, at least
        (0, 256, 2, 4, 4),
    ],
)
def test_chunk_size(total: int, most: int, readers: int, least: int, want: int) -> None:
    assert chunk_size(total, most, readers, least) == want


@pytest.mark.parametrize(
    ("tiles", "px", "readers", "batch"),
    [
        ([392] * 32, 56, 2, 64),
        ([392] * 32, 224, 2, 4),
        ([392], 56, 2, 64),
        ([5, 0, 1000], 28, 8, 256),
    ],
)
def test_every_region_once_in_even_chunks(
    tiles: list[int], px: int, readers: int, batch: int
) -> None:
    chunks = _chunks(_cut(tiles, px, readers, batch))
    for i, n in enumerate(tiles):
        got = chunks.get(f"s{i}", [])
        assert [r for a, b in got for r in range(a, b)] == list(range(n))
        sizes = [b - a for a, b in got]
        assert not sizes or max(sizes) - min(sizes) <= 1
        assert all(s <= chunk_limit(px, batch) for s in sizes)


def test_many_slides_one_chunk_each_few_slides_spread_over_the_readers() -> None:
    # 32 slides of 392 regions at 56 px on 2 actors: one call per slide (two before)
    assert all(len(c) == 1 for c in _chunks(_cut([392] * 32, 56, 2, 64)).values())
    # the teacher's 224 px tiles stay within the limit: two calls per slide
    assert all(len(c) == 2 for c in _chunks(_cut([392] * 32, 224, 2, 4)).values())
    # one slide on 2 actors: several chunks each
    (one,) = _chunks(_cut([392], 56, 2, 64)).values()
    assert len(one) >= 2 * 2
