"""Sharding on inputs real cohorts are full of: unlabelled slides of labelled patients,
anisotropic pixels, level downsamples a hair below a whole number, a rerun with another --mpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from sharding.pipeline import ShardError, run_shard
from sharding.slide import open_slide, read_level, read_region_at, slide_info, to_rgb
from tests.dataset_checks import verify_dataset
from tests.slide_factory import blob_image, write_slide

MAGS = {"mags": "20,10,5", "tile_px": 128}


def test_unlabelled_slides_of_a_patient_join_the_patients_split(tmp_path: Path) -> None:
    """``slide,,patient`` rows: the slide follows its patient into train/val/test (label null),
    so no image of a val/test patient reaches distillation through ``unlabeled``."""
    slides = tmp_path / "slides"
    slides.mkdir()
    rows = ["slide,label,patient"]
    for i in range(4):
        write_slide(slides / f"a{i}.svs", blob_image(768, 768, seed=i), app_mag=40, mpp=0.25)
        write_slide(slides / f"u{i}.svs", blob_image(768, 768, seed=20 + i), app_mag=40, mpp=0.25)
        rows += [f"a{i},{'tumor' if i % 2 else 'benign'},P{i}", f"u{i},,P{i}"]
    for name in ("lonely", "free"):
        write_slide(slides / f"{name}.svs", blob_image(768, 768, seed=9), app_mag=40, mpp=0.25)
    rows.append("lonely,,P9")  # a patient with no labelled slide: nothing to leak
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")

    out = tmp_path / "ds"
    report = run_shard(
        [slides], str(out), labels=labels, splits=(0.5, 0.25, 0.25), workers=0, progress=False,
        **MAGS,
    )  # fmt: skip
    assert report.ok, report.problems
    data = verify_dataset(str(out))
    split = {s: next(iter(v)) for s, v in data["slides"].items()}
    for i in range(4):
        assert split[f"u{i}"] == split[f"a{i}"], f"u{i} left its patient P{i}"
    assert {split[f"a{i}"] for i in range(4)} >= {"val", "test"}
    assert split["lonely"] == split["free"] == "unlabeled"
    for r in data["rows"]:
        if r["slide"].startswith("u"):
            assert r["label"] is None and r["patient"] == f"P{r['slide'][1:]}"

    # A rerun keeps every slide where it is.
    again = run_shard(
        [slides], str(out), labels=labels, splits=(0.5, 0.25, 0.25), workers=0, progress=False,
        **MAGS,
    )  # fmt: skip
    assert again.ok and again.done_before == 10 and again.new_samples == 0


def _generic_tiff(path: Path, img: np.ndarray, mpp_x: float, mpp_y: float) -> Path:
    """A tiled generic TIFF whose resolution tags give OpenSlide ``mpp-x`` and ``mpp-y``."""
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            img,
            tile=(256, 256),
            photometric="rgb",
            resolution=(1e4 / mpp_x, 1e4 / mpp_y),
            resolutionunit="CENTIMETER",
            metadata=None,
        )
    return path


def test_anisotropic_slide_is_refused_with_one_line(tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    img = blob_image(1024, 1024, seed=3)
    _generic_tiff(slides / "stretched.tif", img, 0.25, 0.30)
    _generic_tiff(slides / "square.tif", img, 0.25, 0.2505)  # 0.2%: scanner rounding, accepted
    report = run_shard([slides], str(tmp_path / "ds"), workers=0, progress=False, **MAGS)
    assert set(report.skipped) == {str(slides / "stretched.tif")}
    (line,) = [p for p in report.problems if "stretched" in p]
    assert "anisotropic" in line and "mpp-x 0.25" in line and "mpp-y 0.3" in line
    assert "\n" not in line
    assert set(verify_dataset(str(tmp_path / "ds"))["slides"]) == {"square"}


def test_level_downsample_a_hair_below_a_whole_number_reads_exact(tmp_path: Path) -> None:
    """A level 3999 -> 1000 px wide has downsample 3.9995: it is the 4x level, read 1:1."""
    path = write_slide(
        tmp_path / "odd.svs", blob_image(3999, 1000, seed=5), app_mag=40, mpp=0.25, factors=(4,)
    )
    slide = open_slide(path)
    info = slide_info(slide, str(path))
    assert info.level_downsamples[1] == pytest.approx(3.9995)
    assert read_level(info, 512, 128) == (1, 128)
    x, y = 1536, 256
    tile = np.asarray(read_region_at(slide, info, x, y, 512, 128))
    direct = to_rgb(slide.read_region((x, y), 1, (128, 128)))
    np.testing.assert_array_equal(tile, direct)


def test_rerun_with_another_mpp_is_refused(tmp_path: Path) -> None:
    path = write_slide(tmp_path / "nompp.tif", blob_image(1024, 1024, seed=4), app_mag=None)
    out = str(tmp_path / "ds")
    assert run_shard([path], out, mpp=0.25, workers=0, progress=False, **MAGS).ok
    with pytest.raises(ShardError, match=r"other settings \(mpp\)"):
        run_shard([path], out, mpp=0.5, workers=0, progress=False, **MAGS)
    assert run_shard([path], out, mpp=0.25, workers=0, progress=False, **MAGS).done_before == 1
