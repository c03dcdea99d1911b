"""Prediction's fast path reads exactly the read chain's pixels (predictions unchanged).

:func:`resdistill.predict.tile_reads.read_regions` reads runs of neighbouring regions with one
``read_region`` and reduces them together; :func:`resdistill.read_chain.read_tiles` (the
reference) reads region by region. On a 40x slide whose grid starts half a pixel into its 16x
level (so OpenSlide samples between pixels) and on the real slide's pyramid (an inexact level
downsample, read region by region), every read mode, reduction (box, Lanczos, as-trained from the
top magnification) and encoding gives the same array, bit for bit. The heatmap background made
from the planner's read is OpenSlide's thumbnail, and a worker keeps a slide open between chunks
but never reads a file that changed under its plan.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openslide
import pytest

from resdistill.predict import slide_handles
from resdistill.predict.slide_plan import _background, plan_slide
from resdistill.predict.tile_reads import read_regions, runs
from resdistill.read_chain import ReadChain, plan_tiles, read_tiles
from sharding.options import ShardOptions
from sharding.slide import SlideError
from tests.slide_factory import blob_image, write_slide

W, H = 2064, 1552  # grid offset 8 level-0 px: half a pixel of the 16x level


@pytest.fixture(scope="module")
def slide40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast")
    return write_slide(root / "s.svs", blob_image(W, H, seed=3), app_mag=40, mpp=0.25)


def chain(
    mags: str, px: int, mag: str, read: str, low: str = "top", fmt: str = "jpeg"
) -> ReadChain:
    opts = ShardOptions.make(mags, px, fmt, 80, 0.3, None, low)
    return ReadChain(opts, mag, "checkpoint", (), read)


CHAINS = {
    "teacher 10x": chain("10,5,2.5", 64, "10x", "as-trained"),
    "2.5x native (16x level, half-pixel phase)": chain("10,5,2.5", 64, "2p5x", "native"),
    "2.5x as-trained (10x read, box-reduced)": chain("10,5,2.5", 64, "2p5x", "as-trained"),
    "5x native (4x level, box-reduced)": chain("10,5,2.5", 64, "5x", "native"),
    "4x native (Lanczos)": chain("10,4", 60, "4x", "native"),
    "4x as-trained (Lanczos from 10x)": chain("10,4", 60, "4x", "as-trained"),
    "2.5x native, png": chain("10,2.5", 64, "2p5x", "native", fmt="png"),
    "pyramid read, not encoded": ReadChain(
        ShardOptions.make("10,2.5", 64, "jpeg", 80, 0.3), "2p5x", "pyramid", (), "native"
    ),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_fast_reads_are_the_read_chain_pixels(slide40: Path, name: str) -> None:
    c = CHAINS[name]
    with openslide.OpenSlide(str(slide40)) as slide:
        plan = plan_tiles(slide, str(slide40), c)
        cells = np.flatnonzero(plan.keep)
        assert cells.size > 10
        want = read_tiles(slide, plan, c, cells)
        got = read_regions(slide, plan, c, cells)
        some = read_regions(slide, plan, c, cells[1::3])  # runs broken up by gaps
    assert got.shape == want.shape == (cells.size, c.tile_px, c.tile_px, 3)
    assert np.array_equal(got, want)
    assert np.array_equal(some, want[1::3])


def test_grid_offset_is_between_pixels_of_the_coarse_level(slide40: Path) -> None:
    c = CHAINS["2.5x native (16x level, half-pixel phase)"]
    with openslide.OpenSlide(str(slide40)) as slide:
        plan = plan_tiles(slide, str(slide40), c)
        assert slide.level_downsamples[2] == 16.0
    assert plan.xs[0] % 16 == 8  # the runs are read from a fractional level coordinate


def test_inexact_level_downsample_reads_region_by_region(real_pyramid: Path) -> None:
    c = chain("5,1.25", 32, "1p25x", "native")
    with openslide.OpenSlide(str(real_pyramid)) as slide:
        assert not float(slide.level_downsamples[2]).is_integer()
        plan = plan_tiles(slide, str(real_pyramid), c)
        cells = np.flatnonzero(plan.keep)[:40]
        assert np.array_equal(
            read_regions(slide, plan, c, cells), read_tiles(slide, plan, c, cells)
        )


def test_runs_are_horizontal_neighbours_capped() -> None:
    xs = np.array([0, 10, 20, 40, 50, 0, 10])
    ys = np.array([0, 0, 0, 0, 0, 10, 10])
    assert runs(xs, ys, 10, max_len=8) == [(0, 3), (3, 5), (5, 7)]
    assert runs(xs, ys, 10, max_len=2) == [(0, 2), (2, 3), (3, 5), (5, 7)]


def test_background_is_openslides_thumbnail_from_one_pass(
    slide40: Path, real_slide: Path, real_pyramid: Path
) -> None:
    c = CHAINS["2.5x native (16x level, half-pixel phase)"]
    for path, px in ((slide40, 1600), (slide40, 200), (real_slide, 1600), (real_pyramid, 700)):
        plan = plan_slide("s", str(path), c if path == slide40 else chain("5,1.25", 32,
                          "1p25x", "native"), px)  # fmt: skip
        with openslide.OpenSlide(str(path)) as slide:
            assert np.array_equal(plan.background, _background(slide, px)), (path, px)
    assert plan_slide("s", str(slide40), c, 0).background.shape == (0, 0, 3)


def test_a_worker_opens_a_slide_once_and_never_reads_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sharding.slide

    path = write_slide(tmp_path / "h.svs", blob_image(512, 384, seed=4), app_mag=20, mpp=0.5)
    opens = []
    real_open = sharding.slide.open_slide
    monkeypatch.setattr(sharding.slide, "open_slide", lambda p: opens.append(p) or real_open(p))
    version = slide_handles.slide_version(str(path), str(path))
    try:
        for _ in range(3):
            with slide_handles.held_slide(str(path), version) as slide:
                assert slide.dimensions == (512, 384)
        assert len(opens) == 1
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with (
            pytest.raises(SlideError, match="changed while it was predicted"),
            slide_handles.held_slide(str(path), version),
        ):
            pass
        assert len(opens) == 2
    finally:
        slide_handles.release_all()


def test_read_plans_are_light_and_described_in_one_line(slide40: Path) -> None:
    """The read stages' plans carry no background, look up by slide id, and are what Ray Data's
    description of a stage's arguments prints in one line, not every region's numbers."""
    from collections.abc import Mapping

    from ray.data._internal.metadata_exporter import sanitize_for_struct

    from resdistill.predict.slide_plan import ReadPlans

    plan = plan_slide("s", str(slide40), CHAINS["2.5x native (16x level, half-pixel phase)"], 400)
    plans = ReadPlans({"s": plan, "t": plan})
    assert len(plans) == 2 and plans["s"].background.size == 0 and plan.background.size > 0
    assert np.array_equal(plans["t"].xs, plan.xs) and plans["s"].n_tiles == plan.n_tiles
    assert not isinstance(plans, Mapping)
    assert sanitize_for_struct({"plans": plans}) == {"plans": "ReadPlans(2 slides)"}
    # what a mapping of the plans was described as: every array printed
    assert len(str(sanitize_for_struct({"s": plan.light()}))) > 20 * plan.n_tiles
