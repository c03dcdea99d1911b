"""Synthetic slides open in OpenSlide as real pyramids, are deterministic, and carry their class
cues at the intended scales; the real Aperio test slide and its pyramid open as expected."""

from __future__ import annotations

import csv
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import openslide
import pytest

from sharding.synthetic import (
    CLASSES,
    LABELS_CSV,
    TRUTH_CSV,
    box_downsample,
    make_scene,
    slide_plan,
    write_pyramid,
    write_slide,
    write_synthetic_slides,
)


def _rgb(slide: openslide.OpenSlide, xy: tuple[int, int], level: int, size: tuple[int, int]):
    return np.asarray(slide.read_region(xy, level, size).convert("RGB")).astype(np.float32)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# Files: OpenSlide reads both formats as pyramids with the right metadata


def test_set_covers_both_formats_at_both_magnifications(synthetic_slides):
    combos = {(s.format, s.base_mag) for s in synthetic_slides.slides}
    assert combos == {("svs", 40.0), ("tiff", 40.0), ("svs", 20.0), ("tiff", 20.0)}
    assert [s.label for s in synthetic_slides.slides] == list(CLASSES)


def test_openslide_reads_metadata_and_levels(synthetic_slides):
    for s in synthetic_slides.slides:
        with openslide.OpenSlide(str(s.path)) as slide:
            props = slide.properties
            assert slide.dimensions == (s.width, s.height)
            # 20x and 40x cover the same physical area
            assert s.width * s.mpp == pytest.approx(synthetic_slides.size_um[0], abs=1)
            assert slide.level_count > 1
            for k, ds in enumerate(slide.level_downsamples):
                assert ds == pytest.approx(4.0**k, rel=0.01)
            assert max(slide.level_dimensions[-1]) <= 1000
            assert float(props["openslide.mpp-x"]) == pytest.approx(s.mpp)
            assert float(props["openslide.mpp-y"]) == pytest.approx(s.mpp)
            assert props["openslide.level[0].tile-width"] == "256"
            if s.format == "svs":
                assert props["openslide.vendor"] == "aperio"
                assert float(props["openslide.objective-power"]) == s.base_mag
                assert props["openslide.comment"].startswith("Aperio Image Library v12.0.0")
            else:
                # generic TIFF: OpenSlide derives mpp from XResolution (pixels/cm), no objective
                assert props["openslide.vendor"] == "generic-tiff"
                assert props["tiff.ResolutionUnit"] == "centimeter"
                assert "openslide.objective-power" not in props


def test_tissue_is_stained_and_glass_is_white(synthetic_slides):
    for s in synthetic_slides.slides:
        island = s.scene().islands[0]
        cx, cy = int(island.cx / s.mpp), int(island.cy / s.mpp)
        with openslide.OpenSlide(str(s.path)) as slide:
            tissue = _rgb(slide, (cx - 128, cy - 128), 0, (256, 256)).reshape(-1, 3).mean(0)
            glass = _rgb(slide, (8, 8), 0, (128, 128))
            low = _rgb(slide, (0, 0), slide.level_count - 1, slide.level_dimensions[-1])
        r, g, b = tissue
        assert g < 200 and r > g + 20 and b > g + 15, f"{s.slide}: tissue colour {tissue}"
        assert glass.min() > 220 and glass.mean() > 235, f"{s.slide}: glass {glass.mean()}"
        # JPEG in YCbCr is decoded back to the same hue (a YCbCr/RGB mix-up would make it green)
        assert glass.mean(axis=(0, 1))[1] == pytest.approx(240, abs=6)
        # tissue fills a good share of the slide
        tissue_share = (low.mean(-1) < 225).mean()
        assert 0.25 < tissue_share < 0.85, f"{s.slide}: tissue share {tissue_share:.2f}"


def test_lower_levels_are_area_averages_of_level0(synthetic_slides):
    s = synthetic_slides.slides[0]
    island = s.scene().islands[0]
    x, y = (int(island.cx / s.mpp) // 16) * 16, (int(island.cy / s.mpp) // 16) * 16
    with openslide.OpenSlide(str(s.path)) as slide:
        base = np.asarray(slide.read_region((x, y), 0, (1024, 1024)).convert("RGB"))
        level1 = _rgb(slide, (x, y), 1, (256, 256))
    expected = box_downsample(base, 4).astype(np.float32)
    diff = np.abs(expected - level1).mean()
    shifted = np.abs(expected[2:, 2:] - level1[:-2, :-2]).mean()  # misaligned by 8 level-0 px
    assert diff < 6.0 and diff < 0.6 * shifted, (diff, shifted)


def test_labels_and_truth_csv(synthetic_slides):
    truth = _read_csv(synthetic_slides.truth_csv)
    labels = _read_csv(synthetic_slides.labels_csv)
    assert list(truth[0]) == ["slide", "label", "patient"]
    assert [r["slide"] for r in truth] == [s.path.stem for s in synthetic_slides.slides]
    assert {r["label"] for r in truth} == set(CLASSES)
    assert labels == truth  # every slide is labelled in this set


def test_labeled_fraction_keeps_every_class_and_whole_patient_classes(tmp_path):
    plan = slide_plan(16, seed=0, labeled_fraction=0.25)
    labelled = [p for p in plan if p["labeled"]]
    assert len(labelled) == 4 and {p["label"] for p in labelled} == set(CLASSES)
    by_patient = defaultdict(list)
    for p in plan:
        by_patient[p["patient"]].append(p["label"])
    assert all(len(v) == 2 and len(set(v)) == 1 for v in by_patient.values())
    assert Counter(p["label"] for p in plan) == dict.fromkeys(CLASSES, 4)
    assert slide_plan(5, labeled_fraction=0.01)[0]["labeled"]  # a non-zero fraction labels one
    assert not any(p["labeled"] for p in slide_plan(5, labeled_fraction=0.0))

    written = write_synthetic_slides(
        tmp_path, 3, seed=1, size_um=(200.0, 160.0), labeled_fraction=0.34, base_mags=(20,)
    )
    assert [s.labeled for s in written] == [True, False, False]
    assert [r["slide"] for r in _read_csv(tmp_path / LABELS_CSV)] == [written[0].slide]
    truth = _read_csv(tmp_path / TRUTH_CSV)
    assert [(r["slide"], r["label"]) for r in truth] == [(s.slide, s.label) for s in written]


# ---------------------------------------------------------------------------------------------
# Determinism and bounded memory


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path):
    def make(folder: str, seed: int) -> tuple[np.ndarray, bytes]:
        s = write_synthetic_slides(tmp_path / folder, 1, seed=seed, size_um=(300.0, 240.0))[0]
        with openslide.OpenSlide(str(s.path)) as slide:
            pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
        return pixels, s.path.read_bytes()

    a, a_bytes = make("a", 5)
    b, b_bytes = make("b", 5)
    c, _ = make("c", 6)
    assert np.array_equal(a, b) and a_bytes == b_bytes
    assert not np.array_equal(a, c)


def test_slides_of_one_set_differ():
    one = make_scene("benign", seed=0, index=0, size_um=(800.0, 600.0))
    two = make_scene("benign", seed=0, index=4, size_um=(800.0, 600.0))
    assert one.islands != two.islands
    region = (1200, 1000, 256, 256, 0.25)
    assert np.abs(one.render(*region).astype(int) - two.render(*region).astype(int)).mean() > 5


@pytest.mark.parametrize("where", ["gland", "tissue-edge"])
def test_tiles_agree_with_one_render(where):
    """Every field is a function of scene coordinates, so tile borders are seamless."""
    scene = make_scene("glandular", seed=0, index=1, size_um=(1500.0, 1200.0))
    mpp = 0.5
    if where == "gland":
        gx, gy = scene.glands(0, 0, 1500, 1200)[0][:2]
        x, y = int((gx - 90) / mpp), int((gy - 90) / mpp)
    else:
        isl = scene.islands[0]
        x, y = int((isl.cx - isl.sx * isl.reach) / mpp), int(isl.cy / mpp) - 256
    whole = scene.render(x, y, 512, 512, mpp, sensor_noise=False).astype(int)
    tiled = np.zeros_like(whole)
    for ty in range(0, 512, 128):
        for tx in range(0, 512, 128):
            tiled[ty : ty + 128, tx : tx + 128] = scene.render(
                x + tx, y + ty, 128, 128, mpp, sensor_noise=False
            )
    assert whole.std() > 10  # the region has structure (tissue and glass, or a gland)
    diff = np.abs(whole - tiled)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_memory_does_not_grow_with_slide_area(tmp_path):
    """Peak traced memory of writing a slide 16x larger in area stays within a tile's worth."""
    small = make_scene("benign", seed=0, index=0, size_um=(225.0, 225.0))
    large = make_scene("benign", seed=0, index=0, size_um=(900.0, 900.0))
    kwargs = dict(fmt="tiff", base_mag=20, min_level_px=100)  # 3 levels for the large slide
    write_slide(tmp_path / "warm.tiff", small, **kwargs)  # caches (noise bank), imports

    def peak(scene, name: str) -> int:
        tracemalloc.start()
        try:
            write_slide(tmp_path / name, scene, **kwargs)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    p_small, p_large = peak(small, "small.tiff"), peak(large, "large.tiff")
    level0_bytes = 1800 * 1800 * 3  # 9.7 MB: holding the large level 0 would fail this
    assert p_large < p_small + 3 * 2**20 < p_small + level0_bytes, (p_small, p_large)


# ---------------------------------------------------------------------------------------------
# Class cues live at the intended scales (rendered at 40x = 0.25 um/px, then area-averaged)

MPP = 0.25


def _region(label: str, index: int, size_px: int, mpp: float = MPP) -> np.ndarray:
    """``size_px`` square around the centre of the scene's largest island (inside tissue)."""
    return _region_and_tissue(label, index, size_px, mpp)[0]


def _region_and_tissue(
    label: str, index: int, size_px: int, mpp: float = MPP, size_um=(1500.0, 1200.0)
) -> tuple[np.ndarray, np.ndarray]:
    """The region and the scene's tissue coverage on the same pixels."""
    scene = make_scene(label, seed=11, index=index, size_um=size_um)
    island = max(scene.islands, key=lambda i: i.sx * i.sy)
    x = int(island.cx / mpp) - size_px // 2
    y = int(island.cy / mpp) - size_px // 2
    xs = ((x + np.arange(size_px) + 0.5) * mpp).astype(np.float32)
    ys = ((y + np.arange(size_px) + 0.5) * mpp).astype(np.float32)
    return scene.render(x, y, size_px, size_px, mpp), scene.tissue(xs, ys, grid=True)


def _laplacian(gray: np.ndarray) -> np.ndarray:
    g = gray.astype(np.float32)
    return np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])


def _nuclear_texture(img: np.ndarray) -> float:
    """Mean |Laplacian| of grey over dark (nuclear) pixels: chromatin and contour detail."""
    gray = img.astype(np.float32).mean(-1)
    lap = _laplacian(gray)
    dark = gray[1:-1, 1:-1] < 150
    return float(lap[dark].mean())


def _texture(img: np.ndarray) -> float:
    return float(_laplacian(img.astype(np.float32).mean(-1)).mean())


@pytest.fixture(scope="module")
def cue_regions() -> dict[str, np.ndarray]:
    """A 1024x1024 region (256 um) of every class at 40x, same geometry (same scene index)."""
    return {label: _region(label, index=2, size_px=1024) for label in CLASSES}


def test_atypia_is_strong_at_high_magnification_and_subtle_at_low(cue_regions):
    benign, atypia = cue_regions["benign"], cue_regions["atypia"]
    inflamed = cue_regions["inflamed"]
    base_ratio = _nuclear_texture(atypia) / _nuclear_texture(benign)
    assert base_ratio > 1.5, base_ratio
    # after an 8x downsample (40x -> 5x) the chromatin texture is gone ...
    low_b, low_a = box_downsample(benign, 8), box_downsample(atypia, 8)
    low_ratio = _texture(low_a) / _texture(low_b)
    assert abs(low_ratio - 1.0) < 0.1, low_ratio
    # ... and what is left is a darkening from enlarged, hyperchromatic nuclei: some grey levels,
    # well below the inflamed class's (a cue a low-magnification student must learn to see)
    shift = low_b.mean() - low_a.mean()
    assert 3.0 < shift < 16.0, shift
    assert shift < 0.5 * (benign.mean() - inflamed.mean())


def test_inflamed_is_darker_at_every_scale(cue_regions):
    benign, inflamed = cue_regions["benign"], cue_regions["inflamed"]
    for factor in (1, 8):
        b = box_downsample(benign, factor) if factor > 1 else benign
        i = box_downsample(inflamed, factor) if factor > 1 else inflamed
        assert b.mean() - i.mean() > 4.0, factor
        # bluer: hematoxylin raises blue relative to green
        assert (i[..., 2].mean() - i[..., 1].mean()) > (b[..., 2].mean() - b[..., 1].mean()) + 2


def test_glands_are_large_structures_seen_after_downsampling():
    from scipy import ndimage

    # a 1 mm field at 20x inside a 4 x 3 mm slide, viewed 8x lower (2.5x, 4 um/px): the glands'
    # lumens are white discs ~100 um (25 px) across; benign tissue has only small vacuoles
    white_share, biggest = {}, {}
    for label in ("benign", "glandular"):
        img, tissue = _region_and_tissue(label, 2, 2048, mpp=0.5, size_um=(4000.0, 3000.0))
        low = box_downsample(img, 8)
        inside = box_downsample(np.repeat((tissue > 0.99)[..., None], 3, -1).astype(np.uint8), 8)
        inside = ndimage.binary_erosion(inside[..., 0] > 0, iterations=2)
        white = (low.min(-1) > 215) & inside
        labels, n = ndimage.label(white)
        white_share[label] = white.sum() / inside.sum()
        biggest[label] = np.bincount(labels.ravel())[1:].max() if n else 0
    assert white_share["glandular"] > white_share["benign"] + 0.03, white_share
    # a lumen (radius >= 0.6 * 47 um) covers > 100 px at 4 um/px; a vacuole (r <= 14 um) < 40
    assert biggest["benign"] < 60 and biggest["glandular"] > 100, biggest


# ---------------------------------------------------------------------------------------------
# Writer edge cases


def test_write_pyramid_rejects_bad_arguments(tmp_path):
    def reader(x, y, w, h):
        return np.zeros((h, w, 3), np.uint8)

    with pytest.raises(ValueError, match="format"):
        write_pyramid(tmp_path / "a.x", 64, 64, reader, mpp=0.5, fmt="png")
    with pytest.raises(ValueError, match="multiple of 16"):
        write_pyramid(tmp_path / "a.svs", 64, 64, reader, mpp=0.5, tile=100)
    with pytest.raises(ValueError, match="expected"):
        write_pyramid(tmp_path / "a.svs", 64, 64, lambda x, y, w, h: np.zeros((1, 1, 3)), mpp=0.5)
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    with pytest.raises(ValueError, match="unknown class"):
        make_scene("tumour", seed=0, index=0, size_um=(100.0, 100.0))


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_jpeg_colours_round_trip(tmp_path, fmt):
    """YCbCr JPEG tiles decode to the written RGB (no colour-space mix-up) at every level."""
    colours = np.array([[200, 60, 120], [90, 70, 150], [230, 150, 190], [242, 240, 245]], np.uint8)
    image = np.zeros((1536, 2048, 3), np.uint8)
    for k, colour in enumerate(colours):
        image[:, k * 512 : (k + 1) * 512] = colour
    path = tmp_path / f"flat.{fmt}"
    write_pyramid(
        path, 2048, 1536, lambda x, y, w, h: image[y : y + h, x : x + w], mpp=0.5, fmt=fmt
    )
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 2
        for level, ds in enumerate((1, 4)):
            for k, colour in enumerate(colours):
                x = k * 512 + 192
                got = _rgb(slide, (x, 600), level, (128 // ds, 128 // ds)).reshape(-1, 3).mean(0)
                assert np.abs(got - colour).max() < 3, (fmt, level, colour, got)


def test_odd_sized_slide_has_consistent_levels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1301, 2099, 3), dtype=np.uint8)
    path = tmp_path / "odd.tiff"
    info = write_pyramid(
        path, 2099, 1301, lambda x, y, w, h: image[y : y + h, x : x + w], mpp=0.5, fmt="tiff"
    )
    assert info.levels == ((2099, 1301), (525, 326))
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == info.levels
        whole = np.asarray(slide.read_region((0, 0), 1, (525, 326)).convert("RGB"))
    smooth = box_downsample(image, 4).astype(np.float32)
    assert np.abs(whole.astype(np.float32).mean((0, 1)) - smooth.mean((0, 1))).max() < 2


# ---------------------------------------------------------------------------------------------
# The real Aperio slide and its pyramid


def test_real_slide_is_aperio_20x(real_slide):
    with openslide.OpenSlide(str(real_slide)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.objective-power"]) == 20
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)
        assert slide.dimensions == (2220, 2967)


def test_real_pyramid_has_levels_of_real_tissue(real_slide, real_pyramid):
    with openslide.OpenSlide(str(real_pyramid)) as pyr, openslide.OpenSlide(str(real_slide)) as src:
        assert pyr.properties["openslide.vendor"] == "aperio"
        assert float(pyr.properties["openslide.objective-power"]) == 20
        assert float(pyr.properties["openslide.mpp-x"]) == pytest.approx(0.499)
        assert pyr.level_count == 3
        assert pyr.level_dimensions == ((2220, 2967), (1110, 1484), (555, 742))
        assert [round(d, 2) for d in pyr.level_downsamples] == [1.0, 2.0, 4.0]
        base = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
        copy = _rgb(pyr, (0, 0), 0, pyr.dimensions)
        assert np.abs(copy - base).mean() < 4
        low = _rgb(pyr, (0, 0), 2, pyr.level_dimensions[2])
    expected = box_downsample(base, 4).astype(np.float32)
    assert np.abs(low - expected).mean() < 4
    assert (low.mean(-1) < 200).mean() > 0.2  # real tissue, not glass
