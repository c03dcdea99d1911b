"""``resdistill shard --annotations`` end to end on a real local Ray cluster: region labels match
the polygons' known areas, ignored regions never appear, unannotated regions land where the
options say, splits never cross patients, bad files get one line each; locally and on S3."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sharding.pipeline import run_shard
from sharding.storage import open_storage
from tests.annotation_factory import (
    H,
    U,
    W,
    at_level,
    expected_a,
    expected_b,
    feature,
    ring,
    slide_a,
    slide_b,
)
from tests.dataset_checks import verify_dataset
from tests.slide_factory import blob_image, write_slide
from tests.test_shard_pipeline import shard

pytestmark = pytest.mark.slow

# 40x at 0.25 um/px sharded at 20x with 128 px tiles: regions of U = 256 level-0 pixels, no margin.
ARGS = ["--mags", "20,10", "--tile-px", "128", "--min-tissue", "0"]
CSV = "slide,label,patient\na,Tumor,P1\nd,Stroma,P1\ng,Tumor,P2\nh,Stroma,P3\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Slides a..h (W x H, 40x) with labels.csv and ann/<slide>.geojson for a, b, c and f."""
    root = tmp_path_factory.mktemp("annotated")
    (root / "slides").mkdir()
    for i, name in enumerate("abcdefgh"):
        write_slide(root / "slides" / f"{name}.svs", blob_image(W, H, seed=i), app_mag=40, mpp=0.25)
    (root / "labels.csv").write_text(CSV)
    ann = root / "ann"
    ann.mkdir()
    (ann / "a.geojson").write_bytes(slide_a())
    (ann / "b.svs.geojson").write_bytes(slide_b())  # QuPath scripts often keep the extension
    (ann / "c.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (ann / "f.geojson").write_bytes(at_level(slide_a(), 16))
    return root


def cells(rows: list[dict], slide: str) -> dict[tuple[int, int], dict]:
    return {(r["x"] // U, r["y"] // U): r for r in rows if r["slide"] == slide}


def check_slide(rows: list[dict], slide: str, expected: dict) -> None:
    got = cells(rows, slide)
    assert set(got) == set(expected), slide
    for cell, (label, fractions) in expected.items():
        row = got[cell]
        assert (row["label"], row["label_source"]) == (label, "annotation"), (slide, cell)
        for c in ("Stroma", "Tumor"):
            assert row[f"ann_{c}"] == pytest.approx(fractions.get(c, 0.0), abs=1e-5), (cell, c)


def digest(files: dict[str, bytes]) -> str:
    lines = sorted(f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in files.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_region_labels_local_resume_and_changed_file(cohort, tmp_path, ray_cluster):
    out = tmp_path / "ds"
    cmd = [str(cohort / "slides"), "--out", str(out), *ARGS, "--labels",
           str(cohort / "labels.csv"), "--annotations", str(cohort / "ann"),
           "--address", ray_cluster]  # fmt: skip
    res = shard(*cmd)
    assert res.returncode == 1, res.stderr
    err = " ".join(res.stderr.split())
    for needle in [
        "c.geojson: not valid JSON",
        "f.geojson: every polygon lies within the top-left",
        "a.geojson: invalid polygon(s) repaired with make_valid",
        "a.geojson: 1 Point feature(s) have no area",
        "a.geojson: 1 polygon(s) lie outside the slide",
        "Skipped 2 slide(s)",
    ]:
        assert needle in err, needle
    report = verify_dataset(str(out))
    rows, desc = report["rows"], report["desc"]
    assert set(report["slides"]) == set("abdegh")
    check_slide(rows, "a", expected_a())
    check_slide(rows, "b", expected_b())
    assert (5 * U, 2 * U) not in {(r["x"], r["y"]) for r in rows if r["slide"] == "a"}
    for r in rows:
        if r["slide"] in "dgh":
            assert r["label_source"] == "slide" and r["ann_Tumor"] is None
        elif r["slide"] == "e":
            assert (r["label"], r["label_source"], r["split"]) == (None, None, "unlabeled")
    split = {s: next(iter(v)) for s, v in report["slides"].items()}
    assert split["a"] == split["d"], "one patient, one split"
    assert split["b"] != "unlabeled", "b's annotations (majority Stroma) make it a labelled slide"
    assert desc["classes"] == ["Stroma", "Tumor"]
    files = {"a.geojson": slide_a(), "b.svs.geojson": slide_b(),
             "f.geojson": (cohort / "ann" / "f.geojson").read_bytes()}  # fmt: skip
    assert desc["annotations"]["files"] == 3
    assert desc["annotations"]["sha256"] == digest(files)
    check_readers_see_region_labels(str(out), rows)

    # A rerun skips finished slides; a changed file is refused for its slide, one line.
    before = (out / "manifest.parquet").read_bytes()
    assert "6 slide(s) already done" in shard(*cmd).stderr
    edited = json.loads(slide_b())
    edited["features"].append(feature("Polygon", [ring(U, 0, 2 * U, U)], "Stroma"))
    (cohort / "ann" / "b.svs.geojson").write_text(json.dumps(edited))
    try:
        again = run_shard(
            [cohort / "slides"], str(out), mags="20,10", tile_px=128, min_tissue=0,
            labels=cohort / "labels.csv", annotations=str(cohort / "ann"),
            workers=0, progress=False,
        )  # fmt: skip
    finally:
        (cohort / "ann" / "b.svs.geojson").write_bytes(slide_b())
    b = str(cohort / "slides" / "b.svs")
    assert again.skipped[b] == "annotations changed since the earlier run"
    assert f"{b}: its annotations differ from those an earlier run sharded it with" in "\n".join(
        again.problems
    )
    assert again.new_samples == 0
    assert (out / "manifest.parquet").read_bytes() == before


def check_readers_see_region_labels(url: str, rows: list[dict]) -> None:
    """Training and evaluation read region labels like any other: the labelled tiles of a split,
    each with its own region's class."""
    from resdistill.data import DatasetInfo, make_loader, read_manifest

    split = next(r["split"] for r in rows if r["slide"] == "a")
    want = {r["key"]: r["label"] for r in rows if r["split"] == split and r["label"] is not None}
    info = DatasetInfo.load(url)
    loader = make_loader(info, [split], ["20x"], batch_size=8, train=False, num_workers=0,
                         labelled_only=True, manifest=read_manifest(url))  # fmt: skip
    got = {}
    for batch in loader.epoch():
        for key, label in zip(batch.keys, batch.labels.tolist(), strict=True):
            got[key] = info.classes[label]
    assert got == want


def test_annotated_only_with_annotations_and_output_on_s3(cohort, s3_bucket, ray_cluster, tmp_path):
    ann = open_storage(f"{s3_bucket}/qupath")
    for p in (cohort / "ann").iterdir():
        ann.put_file(p.name, p)
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in "abd":
        shutil.copy(cohort / "slides" / f"{name}.svs", slides)
    url = f"{s3_bucket}/ds"
    res = shard(str(slides), "--out", url, *ARGS, "--annotations", f"{s3_bucket}/qupath",
                "--annotated-only", "--address", ray_cluster)  # fmt: skip
    assert res.returncode == 1, res.stderr
    err = " ".join(res.stderr.split())
    assert "Skipped 1 slide(s)" in err, res.stderr
    assert f"{s3_bucket}/qupath/c.geojson: no input slide is named 'c'" in err
    report = verify_dataset(url)
    assert set(report["slides"]) == {"a", "b"}
    check_slide(report["rows"], "a", {k: v for k, v in expected_a().items() if v[0]})
    check_slide(report["rows"], "b", {k: v for k, v in expected_b().items() if v[0]})
    assert report["desc"]["annotations"]["annotated_only"] is True
