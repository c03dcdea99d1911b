"""``s3://`` slides read by byte ranges (:mod:`sharding.slide_ranges`) give the pixels of a whole
copy, fetch a fraction of the file, and keep a bounded, shareable cache.

On the moto S3 endpoint: a 40x JPEG SVS whose grid starts between pixels of its coarse level, and
the real slide's JPEG pyramid (an inexact level downsample). Planned and read through the range
path, the plan, the heatmap background and every tile equal those of the local file, bit for
bit, having fetched under half of it; a slide with zlib tiles (where a missing byte could pass
for pixels) is copied whole instead. Threads sharing one entry get the same pixels, and a cache
over its cap evicts entries no task holds, never one in use. ``predict`` on the endpoint gives
the same predictions with ``--s3-reads ranges`` and ``copy``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from resdistill.predict import slide_handles
from resdistill.predict.slide_plan import plan_slide
from resdistill.predict.tile_reads import read_regions
from resdistill.read_chain import ReadChain, read_tiles
from sharding import slide_ranges
from sharding.options import ShardOptions
from sharding.storage import open_storage
from tests.slide_factory import blob_image, write_slide

pytestmark = pytest.mark.timeout(300)


def chain(mags: str, px: int, mag: str) -> ReadChain:
    return ReadChain(ShardOptions.make(mags, px, "jpeg", 80, 0.3), mag, "checkpoint", (), "native")


C40 = chain("10,2.5", 64, "2p5x")
C20 = chain("5,1.25", 32, "1p25x")


@pytest.fixture(scope="module")
def jpeg40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2064 x 1552 40x SVS, JPEG tiles, levels 4x and 16x (grid offset: half a 16x pixel)."""
    from sharding.synthetic import write_pyramid

    img = blob_image(2064, 1552, seed=5)
    out = tmp_path_factory.mktemp("ranges") / "j.svs"

    def read_tile(x: int, y: int, w: int, h: int) -> np.ndarray:
        return img[y : y + h, x : x + w]

    write_pyramid(out, 2064, 1552, read_tile, mpp=0.25, fmt="svs", factor=4, min_level_px=100)
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RESDISTILL_SLIDE_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    slide_handles.release_all()


def upload(bucket: str, *paths: Path) -> list[str]:
    store = open_storage(f"{bucket}/slides")
    for p in paths:
        store.put_file(p.name, p)
    return [store.child_url(p.name) for p in paths]


def tiles(plan, chain_: ReadChain, slide) -> np.ndarray:  # noqa: ANN001
    return read_regions(slide, plan.grid(np.arange(plan.n_tiles)), chain_, np.arange(plan.n_tiles))


def test_ranges_give_the_local_pixels_from_a_fraction_of_the_file(
    s3_bucket: str, cache: Path, jpeg40: Path, real_pyramid: Path
) -> None:
    import openslide

    for local, c in ((jpeg40, C40), (real_pyramid, C20)):
        (url,) = upload(s3_bucket, local)
        before = slide_ranges.fetched_bytes()
        ranged = plan_slide("s", url, c, 400, "ranges")
        here = plan_slide("s", str(local), c, 400)
        assert ranged.opened == "ranges" and ranged.version.endswith("-ranges")
        for field in ("xs", "ys", "tissue", "cells", "background"):
            assert np.array_equal(getattr(ranged, field), getattr(here, field)), field
        with slide_handles.held_slide(url, ranged.version, "ranges") as slide:
            got = tiles(ranged, c, slide)
        with openslide.OpenSlide(str(local)) as slide:
            want = read_tiles(slide, here.grid(np.arange(here.n_tiles)), c, range(here.n_tiles))
        assert got.shape[0] > 10 and np.array_equal(got, want)
        fetched = slide_ranges.fetched_bytes() - before
        size = local.stat().st_size
        assert 0 < fetched < 0.5 * size, (local.name, fetched, size)
        (entry,) = [p for p in cache.iterdir() if p.name.endswith("-ranges") and local.name in
                    [f.name for f in p.iterdir()]]  # fmt: skip
        held = (entry / local.name).stat()
        assert held.st_size == size and held.st_blocks * 512 < 0.6 * size  # sparse


def test_a_slide_whose_missing_bytes_could_pass_for_pixels_is_copied_whole(
    s3_bucket: str, cache: Path, tmp_path: Path
) -> None:
    z = write_slide(tmp_path / "z.svs", blob_image(1024, 768, seed=1), app_mag=40, mpp=0.25)
    (url,) = upload(s3_bucket, z)
    plan = plan_slide("z", url, C40, 0, "ranges")
    assert plan.opened == "copy" and plan.n_tiles > 0
    with slide_handles.held_slide(url, plan.version, plan.opened) as slide:
        assert tiles(plan, C40, slide).shape[0] == plan.n_tiles


def test_threads_share_one_entry_and_read_the_same_pixels(
    s3_bucket: str, cache: Path, jpeg40: Path
) -> None:
    import openslide

    (url,) = upload(s3_bucket, jpeg40)
    plan = plan_slide("s", url, C40, 0, "ranges")
    with openslide.OpenSlide(str(jpeg40)) as slide:
        want = read_tiles(slide, plan.grid(np.arange(plan.n_tiles)), C40, range(plan.n_tiles))
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work(part: int) -> None:
        try:
            s = slide_ranges.open_ranged(url)
            try:
                cells = np.arange(part, plan.n_tiles, 4)
                results.append(
                    (cells, read_regions(s, plan.grid(cells), C40, np.arange(cells.size)))
                )
            finally:
                s.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for cells, got in results:
        assert np.array_equal(got, want[cells])
    assert len([p for p in cache.iterdir() if p.name.endswith("-ranges")]) == 1


def test_cache_over_its_cap_evicts_only_entries_no_task_holds(
    s3_bucket: str, cache: Path, jpeg40: Path, real_pyramid: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = upload(s3_bucket, jpeg40, real_pyramid)
    monkeypatch.setenv("RESDISTILL_SLIDE_CACHE_GB", "1e-9")  # every entry is over the cap
    held = slide_ranges.open_ranged(a)
    try:
        slide_ranges.open_ranged(b).close()  # makes room: cannot evict the held entry
        assert Path(held.path).exists()
        held.read_region((0, 0), 1, (64, 64))  # still readable, fetching more
    finally:
        held.close()
    other = slide_ranges.open_ranged(b)
    try:
        other.read_region((0, 0), 0, (512, 512))  # fetching more makes room: a's entry goes
    finally:
        other.close()
    assert not Path(held.path).exists()


@pytest.mark.slow
def test_predict_by_ranges_equals_predict_by_copies(
    ray_cluster: str, s3_bucket: str, jpeg40: Path, tmp_path: Path
) -> None:
    from tests.test_evaluate import save_checkpoint
    from tests.test_predict_scale import model, predict, table

    read_chain = {"magnifications": ["10x", "2p5x"], "tile_px": {"10x": 64, "2p5x": 16},
                  "image_format": "jpeg", "quality": 80, "min_tissue": 0.3}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "m", model(0, 0.2), stage="student", mag="2p5x",
                           tile_px=16, read_chain=read_chain)  # fmt: skip
    (url,) = upload(s3_bucket, jpeg40)
    got = {}
    for how in ("ranges", "copy"):
        out = f"{s3_bucket}/pred-{how}"
        assert predict(ray_cluster, ckpt, [url], out, "--s3-reads", how, "--read", "native") == 0
        got[how] = table(out, "tiles.parquet").sort_values(["x", "y"]).reset_index(drop=True)
    assert len(got["ranges"]) > 10
    assert got["ranges"].equals(got["copy"])
