"""Reading regions through OpenSlide: level choice, no upsampling, anti-aliasing, tissue mask."""

import numpy as np
import pytest
from PIL import Image

from sharding.magnification import Magnification
from sharding.slide import (
    SlideError,
    base_mpp_from_properties,
    best_level,
    check_magnification,
    downsample,
    open_slide,
    read_region_at,
    slide_info,
)
from sharding.tissue import detect_tissue, grid, otsu
from tests.slide_factory import blob_image, truncate, write_slide


@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("blob") / "blob.svs", blob_image(2048, 1536))


def test_best_level_never_above_wanted():
    ds = (1.0, 4.000244, 16.001)
    assert best_level(ds, 1.0) == 0
    assert best_level(ds, 3.99) == 0
    assert best_level(ds, 4.0) == 1  # within tolerance of 4.000244
    assert best_level(ds, 15.0) == 1
    assert best_level(ds, 64) == 2


def test_mpp_sources():
    assert base_mpp_from_properties({"openslide.mpp-x": "0.2525"}) == (0.2525, "openslide.mpp-x")
    assert base_mpp_from_properties(
        {"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}
    ) == (0.5, "tiff resolution")
    assert base_mpp_from_properties({"openslide.objective-power": "40"}) == (
        0.25,
        "objective power",
    )
    assert base_mpp_from_properties({}, override=0.5) == (0.5, "--mpp")
    assert (
        base_mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None
    )


def test_downsample_is_antialiased_and_never_upsamples():
    checker = np.indices((64, 64)).sum(0) % 2 * 255
    img = Image.fromarray(np.stack([checker] * 3, -1).astype(np.uint8))
    small = np.asarray(downsample(img, 16))
    assert small.shape == (16, 16, 3)
    assert abs(small.mean() - 127.5) < 2 and small.std() < 2  # averaged, not aliased to 0/255
    with pytest.raises(ValueError):
        downsample(img, 128)


def test_read_region_uses_lower_level_and_matches_level0(blob_slide):
    slide = open_slide(blob_slide)
    info = slide_info(slide, str(blob_slide))
    assert info.base_mpp == pytest.approx(0.5) and info.mpp_source == "openslide.mpp-x"
    x, y, size0 = 768, 512, 512
    # 512 level-0 px into 128 px: downsample 4 -> read from level 1 directly.
    via_level = np.asarray(read_region_at(slide, info, x, y, size0, 128)).astype(float)
    full = slide.read_region((x, y), 0, (size0, size0)).convert("RGB").reduce(4)
    assert via_level.shape == (128, 128, 3)
    # The synthetic pyramid subsamples; compare means per channel, which must agree closely.
    assert np.abs(via_level.mean((0, 1)) - np.asarray(full, float).mean((0, 1))).max() < 6
    slide.close()


def test_upsampling_refused(blob_slide):
    slide = open_slide(blob_slide)
    info = slide_info(slide, str(blob_slide))
    check_magnification(info, Magnification(20))
    with pytest.raises(SlideError, match="never upsamples"):
        check_magnification(info, Magnification(40))
    slide.close()


def test_tissue_mask_finds_island(blob_slide, tmp_path):
    slide = open_slide(blob_slide)
    info = slide_info(slide, str(blob_slide))
    mask = detect_tissue(slide, info)
    xs, ys = grid(info.width, info.height, 256)
    frac = mask.fractions(xs, ys, 256)
    centre = np.argmin((xs + 128 - 1024) ** 2 + (ys + 128 - 768) ** 2)
    corner = np.argmin(xs**2 + ys**2)
    assert frac[centre] > 0.95 and frac[corner] < 0.05
    slide.close()
    blank = write_slide(tmp_path / "blank.svs", blob_image(1024, 1024, blank=True))
    s2 = open_slide(blank)
    assert detect_tissue(s2, slide_info(s2, str(blank))).mask.mean() < 0.01
    s2.close()


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 1000), rng.normal(0.6, 0.05, 1000)]).clip(0, 1)
    assert 0.2 < otsu(values) < 0.5


def test_bad_files(tmp_path, blob_slide):
    txt = tmp_path / "notes.svs"
    txt.write_text("not a slide")
    with pytest.raises(SlideError, match="not a slide OpenSlide can read"):
        open_slide(txt)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    cut = truncate(blob_slide, tmp_path / "cut.svs", keep=0.3)
    with pytest.raises(SlideError, match="truncated|OpenSlide cannot read|not a slide"):
        s = open_slide(cut)
        info = slide_info(s, str(cut))
        read_region_at(s, info, 0, 0, 2048, 512)
