"""Tissue detection on slides read through OpenSlide whose true tissue is known: marker ink of
every colour, dark borders and dots, pale tissue, all tissue, blank glass; the real CC0 Aperio
sample; and what sharding writes from it (manifest ``ink`` column, QC picture, dataset.json)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sharding.pipeline import run_shard
from sharding.slide import open_slide, slide_info
from sharding.tissue import DETECTOR, detect_tissue, grid
from tests.ink_factory import CASES, um, write_case

#: Scoring regions: 128 um squares (16 thumbnail pixels); a region is tissue at >= half cover.
REGION = um(128)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ink")
    return {name: write_case(folder, name) for name in CASES}


def detect(path):
    slide = open_slide(path)
    try:
        info = slide_info(slide, str(path))
        return info, detect_tissue(slide, info)
    finally:
        slide.close()


def true_fractions(truth: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.array(
        [truth[y : y + REGION, x : x + REGION].mean() for x, y in zip(xs, ys, strict=True)]
    )


def score(path, truth) -> tuple[float, float, int, int]:
    """(precision, recall, found, true) of tissue regions found against the true mask."""
    info, mask = detect(path)
    xs, ys = grid(info.width, info.height, REGION)
    found = mask.fractions(xs, ys, REGION) >= 0.5
    true = true_fractions(truth, xs, ys) >= 0.5
    hit = int((found & true).sum())
    precision = hit / found.sum() if found.any() else 1.0
    recall = hit / true.sum() if true.any() else 1.0
    return precision, recall, int(found.sum()), int(true.sum())


@pytest.mark.parametrize("name", ["blue", "green", "black", "red", "border", "pale", "all_tissue"])
def test_tissue_regions_found_despite_ink_borders_and_pale_stain(cases, name):
    precision, recall, found, true = score(*cases[name])
    assert precision >= 0.95 and recall >= 0.9, (
        f"{name}: precision {precision:.3f}, recall {recall:.3f} ({found} found, {true} true)"
    )


def test_blank_glass_has_no_tissue(cases):
    _, _, found, true = score(*cases["blank"])
    assert true == 0 and found == 0


@pytest.mark.parametrize("name", ["blue", "green", "black", "red"])
def test_ink_is_measured_per_region(cases, name):
    path, truth = cases[name]
    info, mask = detect(path)
    xs, ys = grid(info.width, info.height, REGION)
    ink = mask.ink_fractions(xs, ys, REGION)
    tissue = mask.fractions(xs, ys, REGION)
    assert (ink > 0.5).sum() >= 30, f"{name}: the marker covers many regions"
    assert not ((ink > 0.5) & (tissue >= 0.5)).any(), "ink is never counted as tissue"


def test_real_aperio_sample_keeps_its_tissue(real_slide):
    """CMU-1-Small-Region: H&E, no ink. About 40% of the field is tissue, pale edges included."""
    info, mask = detect(real_slide)
    assert 0.35 < mask.mask.mean() < 0.6
    xs, ys = grid(info.width, info.height, 256)
    frac = mask.fractions(xs, ys, 256)
    assert (frac >= 0.5).sum() >= 36
    corner = np.argmin(xs**2 + ys**2)  # glass at the top left
    assert frac[corner] < 0.05
    assert mask.ink.mean() < 0.01, "H&E stain is not marker ink"


def test_shard_writes_ink_column_qc_picture_and_detector(cases, tmp_path):
    path, _ = cases["blue"]
    out = tmp_path / "ds"
    run_shard([path], str(out), mags="5,2.5", tile_px=64, workers=0, progress=False)
    desc = json.loads((out / "dataset.json").read_text())
    assert desc["tissue"] == DETECTOR
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert rows and all(0.0 <= r["ink"] <= 1.0 for r in rows)
    assert max(r["ink"] for r in rows) < 0.5, "tiles of ink are not written"
    assert sum(r["ink"] > 0 for r in rows) >= 1, "tiles at the marker's edge carry its fraction"
    qc = Image.open(io.BytesIO((out / "_state" / "qc" / "blue.png").read_bytes()))
    assert qc.format == "PNG" and max(qc.size) <= 2048 and min(qc.size) >= 64
