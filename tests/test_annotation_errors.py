"""A malformed annotation file fails its own slide with one line and never the run: non-finite
coordinates, nesting deeper than GeoJSON needs, oversized files, class names that are not text.
A slide's majority class (which stratifies its split) is measured on the slide, not off it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sharding.annotations as annotations_mod
from resdistill.predict.annotation_overlay import AnnotationOverlays
from sharding.annotation_set import read_annotation_set
from sharding.annotations import AnnotationError, parse_geojson
from sharding.options import IGNORE_CLASSES, AnnotationOptions
from sharding.pipeline import run_shard
from tests.annotation_factory import H, W, collection, feature, ring
from tests.slide_factory import blob_image, write_slide

MAX_DEPTH = getattr(annotations_mod, "MAX_DEPTH", 64)


def good() -> bytes:
    return collection(feature("Polygon", [ring(0, 0, W // 2, H)], "Tumor"))


def with_class(name) -> bytes:
    doc = json.loads(good())
    doc["features"][0]["properties"]["classification"]["name"] = name
    return json.dumps(doc).encode()


def infinity() -> bytes:
    """An ``Infinity`` literal (Python's json writes and reads it; GEOS then throws)."""
    return json.dumps(json.loads(good().replace(b"[0, 0]", b"[Infinity, 0]", 1))).encode()


def deep_inside(depth: int) -> bytes:
    """A valid collection whose properties hold a list nested ``depth`` deep."""
    doc = json.loads(good())
    doc["features"][0]["properties"]["junk"] = 0
    text = json.dumps(doc)
    return text.replace('"junk": 0', '"junk": ' + "[" * depth + "]" * depth).encode()


# Off the slide (W x H) the Stroma box is larger than the Tumor one; on it, smaller. Polygons reach
# under 1.5 x the slide's width, so the extent check takes them for this slide's pixels.
TUMOR_ON = (0, 0, 600, H)
STROMA_PAST = (1000, 0, 2300, H)


def off_slide_majority() -> bytes:
    return collection(
        feature("Polygon", [ring(*TUMOR_ON)], "Tumor"),
        feature("Polygon", [ring(*STROMA_PAST)], "Stroma"),
    )


BAD = {
    "inf": (infinity, "Infinity"),
    "overflow": (lambda: good().replace(b"[0, 0]", b"[1e999, 0]", 1), "not a finite number"),
    "nan": (lambda: good().replace(b"[0, 0]", b"[NaN, 0]", 1), "NaN"),
    "brackets": (lambda: b"[" * 200_000, "nested deeper than"),
    "deep": (lambda: deep_inside(MAX_DEPTH + 1), "nested deeper than"),
    "number-class": (lambda: with_class(5), "class name"),
    "list-class": (lambda: with_class(["Tumor"]), "class name"),
    "dict-class": (lambda: with_class({"name": "Tumor"}), "class name"),
    "bool-class": (lambda: with_class(True), "class name"),
    "control-class": (lambda: with_class("Tu\nmor"), "class name"),
    "number-classification": (
        lambda: good().replace(b'{"name": "Tumor", "color": [200, 0, 0]}', b"7"),
        "classification",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_malformed_file_is_one_annotation_error_naming_it(kind):
    make, needle = BAD[kind]
    with pytest.raises(AnnotationError) as err:
        parse_geojson(make(), f"{kind}.geojson", IGNORE_CLASSES)
    text = str(err.value)
    assert text.startswith(f"{kind}.geojson: ") and needle in text, text
    assert "\n" not in text and len(text) < 400, text


def test_geojson_as_qupath_writes_it_still_parses():
    ann, problems = parse_geojson(deep_inside(MAX_DEPTH - 8), "ok.geojson", IGNORE_CLASSES)
    assert set(ann.classes) == {"Tumor"} and problems == []
    escaped = with_class('Tumor "[[[" \\')  # brackets in a string are no nesting
    assert set(parse_geojson(escaped, "s.geojson", IGNORE_CLASSES)[0].classes) == {'Tumor "[[[" \\'}
    unclassified = json.loads(good())
    unclassified["features"][0]["properties"]["classification"] = None
    roi = parse_geojson(json.dumps(unclassified).encode(), "r.geojson", IGNORE_CLASSES)[0]
    assert roi.classes == {} and roi.roi is not None


def test_each_bad_file_skips_its_own_slide_and_the_rest_are_read(tmp_path, monkeypatch):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "good.geojson").write_bytes(good())
    for kind, (make, _) in BAD.items():
        (ann / f"{kind}.geojson").write_bytes(make())
    big = good() + b" " * 5000  # valid JSON, over the (lowered) size bound
    (ann / "big.geojson").write_bytes(big)
    monkeypatch.setattr(annotations_mod, "MAX_BYTES", 4096, raising=False)
    names = ["good", "big", *BAD]
    slides = {s: str(tmp_path / f"{s}.svs") for s in names}
    write_slide(tmp_path / "good.svs", blob_image(W, H), app_mag=40, mpp=0.25)
    got = read_annotation_set(AnnotationOptions(source=str(ann)), slides)
    assert set(got.refs) == {"good"}
    assert set(got.skip) == set(names) - {"good"}
    for sid in got.skip:
        assert got.skip[sid] == f"unusable annotation file {sid}.geojson"
        lines = [p for p in got.problems if p.startswith(f"{ann / sid}.geojson: ")]
        assert len(lines) == 1, (sid, got.problems)
    assert len(got.problems) == len(got.skip)
    assert "larger than 4096 bytes" in next(p for p in got.problems if "big.geojson" in p)


def test_majority_class_is_measured_on_the_slide(tmp_path):
    slide = write_slide(tmp_path / "s.svs", blob_image(W, H), app_mag=40, mpp=0.25)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "s.geojson").write_bytes(off_slide_majority())
    got = read_annotation_set(AnnotationOptions(source=str(ann)), {"s": str(slide)})
    assert got.majority == {"s": "Tumor"} and not got.skip
    parsed, _ = parse_geojson(off_slide_majority(), "s.geojson", IGNORE_CLASSES)
    assert parsed.areas()["Stroma"] > parsed.areas()["Tumor"], "off the slide Stroma is larger"
    assert parsed.majority(W, H) == "Tumor"
    missing = read_annotation_set(
        AnnotationOptions(source=str(ann)), {"s": str(tmp_path / "gone.svs")}
    )
    assert "s" in missing.skip and missing.majority == {}
    assert any(p.startswith(str(tmp_path / "gone.svs")) for p in missing.problems)
    labelled = read_annotation_set(  # a slide labelled elsewhere is not opened for its majority
        AnnotationOptions(source=str(ann)), {"s": str(tmp_path / "gone.svs")}, majority_for=()
    )
    assert set(labelled.refs) == {"s"} and not labelled.skip and labelled.majority == {}


def test_predict_overlays_pass_over_a_bad_file(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "a.geojson").write_bytes(good())
    (ann / "bad.geojson").write_bytes(b"[" * 200_000)
    lines: list[str] = []
    overlays = AnnotationOverlays(str(ann), {"a": "/x/a.svs", "bad": "/x/bad.svs"}, lines.append)
    assert overlays.problems == 1 and "bad.geojson: " in lines[0] and "nested" in lines[0]
    assert overlays.for_slide("a").outlines
    bad = overlays.for_slide("bad")
    assert bad.outlines == () and bad.note == "unusable annotation file bad.geojson"
    # a file made malformed after the set was read fails that slide's overlay alone
    (ann / "a.geojson").write_bytes(b"[" * 200_000)
    assert overlays.for_slide("a").outlines == () and overlays.problems == 2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("annerr")
    (root / "slides").mkdir()
    (root / "ann").mkdir()
    for i, name in enumerate(["ok", "off", "inf", "brackets", "number-class"]):
        write_slide(root / "slides" / f"{name}.svs", blob_image(W, H, seed=i), app_mag=40, mpp=0.25)
    (root / "ann" / "ok.geojson").write_bytes(good())
    (root / "ann" / "off.geojson").write_bytes(off_slide_majority())
    for kind in ("inf", "brackets", "number-class"):
        (root / "ann" / f"{kind}.geojson").write_bytes(BAD[kind][0]())
    return root


def test_shard_skips_the_slides_of_bad_files_and_shards_the_rest(cohort, tmp_path):
    out = tmp_path / "ds"
    report = run_shard(
        [cohort / "slides"], str(out), mags="20,10", tile_px=128, min_tissue=0,
        annotations=str(cohort / "ann"), workers=0, progress=False,
    )  # fmt: skip
    assert not report.ok  # the command exits 1, as for any skipped slide
    slides = cohort / "slides"
    assert report.skipped == {
        str(slides / f"{k}.svs"): f"unusable annotation file {k}.geojson"
        for k in ("inf", "brackets", "number-class")
    }
    for kind in ("inf", "brackets", "number-class"):
        assert sum(f"{kind}.geojson: " in p for p in report.problems) == 1, report.problems
    assert report.new_samples > 0
    off = json.loads((out / "_state" / "slides" / "off.json").read_text())
    assert off["label"] == "Tumor", "the split is stratified on the class on the slide"
    assert {p.name for p in (out / "_state" / "slides").iterdir()} == {"ok.json", "off.json"}
