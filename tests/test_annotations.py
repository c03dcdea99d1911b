"""Region annotations, piece by piece: QuPath GeoJSON parsing, region fractions and labels against
areas known by arithmetic, extent checks, file matching, manifest columns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from sharding.annotation_set import AnnotationSetError, annotated_slide, read_annotation_set
from sharding.annotations import AnnotationError, annotation_outlines, parse_geojson
from sharding.extract import SlideJob, plan_slide
from sharding.manifest import combine, manifest_bytes, read_parquet_bytes, rows_to_parquet
from sharding.options import IGNORE_CLASSES, AnnotationOptions, ShardOptions
from sharding.region_labels import ExtentError, fit_to_slide, label_regions
from sharding.slide import SlideError
from sharding.tissue import grid
from tests.annotation_factory import (
    STROMA_OUTSIDE,
    H,
    U,
    W,
    at_level,
    collection,
    expected_a,
    expected_b,
    feature,
    ring,
    slide_a,
    slide_b,
)
from tests.slide_factory import blob_image, write_slide

OPTS = AnnotationOptions(source="unused")


def regions_of(data: bytes, opts: AnnotationOptions = OPTS, name: str = "a.geojson"):
    """(col, row) -> (label, fractions) of the regions kept, and the problem lines."""
    ann, problems = parse_geojson(data, name, opts.ignore, opts.classes)
    fitted, more = fit_to_slide(ann, W, H, name)
    xs, ys = grid(W, H, U)
    found = label_regions(fitted, xs, ys, U, opts)
    out = {}
    for i in np.flatnonzero(found.keep):
        fr = {c: float(f[i]) for c, f in found.fractions.items()}
        out[int(xs[i]) // U, int(ys[i]) // U] = (found.labels[i], fr)
    return out, problems + more


def assert_regions(found: dict, expected: dict) -> None:
    assert set(found) == set(expected)
    for cell, (label, fractions) in expected.items():
        assert found[cell][0] == label, cell
        for c, f in fractions.items():
            assert found[cell][1].get(c, 0.0) == pytest.approx(f, abs=1e-5), (cell, c)


def test_labels_and_fractions_match_the_polygons_known_areas():
    found, problems = regions_of(slide_a())
    assert_regions(found, expected_a())
    assert (5, 2) not in found, "the region under the ignore polygon must be removed"
    assert found[1, 1] == (None, {"Stroma": 0.0, "Tumor": 0.0}), "the hole is not Tumor"
    text = "\n".join(problems)
    assert all(line.startswith("a.geojson: ") for line in problems)
    assert "repaired with make_valid" in text and "Self-intersection" in text
    assert "1 Point feature(s) have no area" in text
    assert "1 polygon(s) lie outside the slide" in text
    assert len(problems) == 3, problems


def test_annotated_only_drops_unlabelled_regions_and_roi_restricts_tiling():
    only = AnnotationOptions(source="unused", annotated_only=True)
    found, _ = regions_of(slide_a(), only)
    want = {k: v for k, v in expected_a().items() if v[0] is not None}
    assert_regions(found, want)
    roi, problems = regions_of(slide_b())
    assert_regions(roi, expected_b())
    assert problems == []


def test_min_label_fraction_and_ignore_patterns():
    strict, _ = regions_of(slide_a(), AnnotationOptions(source="unused", min_label_fraction=0.7))
    assert strict[3, 3][0] is None and strict[3, 2][0] is None  # 60% Stroma, 50% Tumor
    loose, _ = regions_of(slide_a(), AnnotationOptions(source="unused", min_label_fraction=0.3))
    assert loose[4, 3][0] == "Stroma"  # 40%
    # Patterns are shell-style and case-insensitive; QuPath's "Ignore*" is matched by "ignore*".
    data = collection(
        feature("Polygon", [ring(0, 0, W, H)], "Tumor"),
        feature("Polygon", [ring(0, 0, 10, 10)], "pen marks"),
        feature("Polygon", [ring(W - 10, H - 10, W, H)], "IGNORE*"),
    )
    found, _ = regions_of(data, AnnotationOptions(source="unused", ignore=("Pen*", "ignore*")))
    assert (0, 0) not in found and (5, 3) not in found and len(found) == 22
    assert "Ignore*" in IGNORE_CLASSES


def test_classes_outside_the_allowed_list_are_left_out_with_one_line():
    opts = AnnotationOptions(source="unused", classes=("Tumor",))
    found, problems = regions_of(slide_a(), opts)
    assert {label for label, _ in found.values()} == {"Tumor", None}
    line = [p for p in problems if "--classes" in p]
    assert len(line) == 1 and "'Stroma' (2 polygons)" in line[0]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b'{"type": "FeatureCollection", "features": [', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"type": "Polygon", "coordinates": []}', "not a GeoJSON FeatureCollection"),
        (collection(feature("Point", [1, 2], "Tumor")), "holds no Polygon"),
    ],
)
def test_unusable_files_raise_one_line_naming_the_file(data, needle):
    with pytest.raises(AnnotationError, match=needle) as err:
        parse_geojson(data, "s3://b/ann/x.geojson", IGNORE_CLASSES)
    assert str(err.value).startswith("s3://b/ann/x.geojson: ") and "\n" not in str(err.value)


def test_unreadable_coordinates_leave_the_feature_out():
    data = collection(
        feature("Polygon", [[[0, 0], [1]]], "Tumor"), feature("Polygon", [ring(0, 0, U, U)], "A")
    )
    ann, problems = parse_geojson(data, "x.geojson", IGNORE_CLASSES)
    assert list(ann.classes) == ["A"]
    assert len(problems) == 1 and "feature(s) 1 have unreadable coordinates" in problems[0]


@pytest.mark.parametrize(
    ("data", "downsample", "needle"),
    [
        (slide_b(), 4, "about 4x smaller"),
        (slide_a(), 16, "downsampled level"),
        (slide_a(), 0.25, "larger image"),
    ],
)
def test_coordinates_at_another_level_are_refused(data, downsample, needle):
    ann, _ = parse_geojson(at_level(data, downsample), "x.geojson", IGNORE_CLASSES)
    with pytest.raises(ExtentError, match=needle):
        fit_to_slide(ann, W, H, "x.geojson")


def test_one_stray_polygon_far_outside_is_not_a_level_mismatch():
    data = collection(
        feature("Polygon", [ring(0, 0, W, H)], "Tumor"),
        feature("Polygon", [ring(4 * W, 4 * H, 4 * W + 10, 4 * H + 10)], "Tumor"),
    )
    ann, _ = parse_geojson(data, "x.geojson", IGNORE_CLASSES)
    fitted, problems = fit_to_slide(ann, W, H, "x.geojson")
    assert fitted.bounds() == (0, 0, W, H)
    assert len(problems) == 1 and "outside the slide" in problems[0]


def test_majority_class_is_the_largest_area():
    ann, _ = parse_geojson(slide_a(), "a.geojson", IGNORE_CLASSES)
    assert ann.majority(W, H) == "Tumor" and ann.labels_regions
    ann_b, _ = parse_geojson(slide_b(), "b.geojson", IGNORE_CLASSES)
    assert ann_b.majority(W, H) == "Stroma" and ann_b.roi is not None
    ignore_only, _ = parse_geojson(
        collection(feature("Polygon", [ring(0, 0, U, U)], "Pen")), "c.geojson", IGNORE_CLASSES
    )
    assert ignore_only.majority(W, H) is None and not ignore_only.labels_regions
    region, _ = parse_geojson(
        collection(feature("Polygon", [ring(0, 0, U, U)], "Region*")), "d.geojson", IGNORE_CLASSES
    )
    assert region.roi is not None and not region.classes and not region.labels_regions


def test_outlines_scale_to_a_thumbnail():
    ann, _ = parse_geojson(slide_a(), "a.geojson", IGNORE_CLASSES)
    outlines = {o.name: o for o in annotation_outlines(ann, downsample=8)}
    assert set(outlines) == {"Stroma", "Tumor", "ignored"}
    assert outlines["ignored"].role == "ignore"
    tumor = outlines["Tumor"].rings
    assert len(tumor) >= 2, "exterior and the hole"
    assert max(r[:, 0].max() for r in tumor) == pytest.approx(4 * U / 8)  # the bowtie
    stroma_x = max(r[:, 0].max() for r in outlines["Stroma"].rings)
    assert stroma_x == pytest.approx(STROMA_OUTSIDE[2] / 8)


def test_files_match_slides_by_name(tmp_path):
    assert annotated_slide("CMU-1.svs.geojson") == "CMU-1"
    assert annotated_slide("sub/TCGA.01.geojson") == "TCGA-01"
    assert annotated_slide("a.GeoJSON") == "a" and annotated_slide("a.json") is None
    (tmp_path / "a.geojson").write_bytes(slide_a())
    (tmp_path / "a.svs.geojson").write_bytes(slide_a())
    (tmp_path / "b.geojson").write_bytes(slide_b())
    (tmp_path / "ghost.geojson").write_bytes(slide_b())
    (tmp_path / "bad.geojson").write_text("{")
    slides = {s: f"/slides/{s}.svs" for s in ("a", "b", "bad", "plain")}
    slides["b"] = str(write_slide(tmp_path / "b.svs", blob_image(W, H), app_mag=40, mpp=0.25))
    got = read_annotation_set(AnnotationOptions(source=str(tmp_path)), slides)
    assert set(got.refs) == {"b"} and got.majority == {"b": "Stroma"}
    assert set(got.skip) == {"a", "bad"}
    assert len(got.problems) == 3  # two files for a, ghost has no slide, bad is not JSON
    only = read_annotation_set(AnnotationOptions(source=str(tmp_path), annotated_only=True), slides)
    assert only.skip["plain"] == "no annotation file (--annotated-only)"
    assert len(got.sha256()) == 64
    with pytest.raises(AnnotationSetError, match="no .geojson files"):
        read_annotation_set(AnnotationOptions(source=str(tmp_path / "missing")), slides)
    with pytest.raises(ValueError, match="min-label-fraction"):
        AnnotationOptions(source="x", min_label_fraction=0)


def test_manifest_spreads_fractions_into_one_column_per_class():
    row = {"key": "k", "slide": "s", "x": 0, "y": 0, "split": "train", "shard": "t.tar"}
    frag = read_parquet_bytes(
        rows_to_parquet(
            [
                {**row, "key": "a", "label": "T", "label_source": "annotation", "ann": {"T": 0.9}},
                {
                    **row,
                    "key": "b",
                    "label": None,
                    "label_source": "annotation",
                    "ann": {"S": 0.25, "T": 0.0},
                },  # fmt: skip
                {**row, "key": "c", "label": "T", "label_source": "slide"},
            ],
            [],
        )
    )
    old = pa.table({k: [v] for k, v in {**row, "key": "d"}.items()})  # before label_source
    table = combine([frag, old], [])
    assert table.column_names[-2:] == ["ann_S", "ann_T"] and "ann" not in table.column_names
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert (by_key["a"]["ann_S"], by_key["a"]["ann_T"]) == (0.0, pytest.approx(0.9))
    assert by_key["b"]["ann_S"] == 0.25 and by_key["c"]["ann_T"] is None
    assert by_key["d"]["label_source"] is None
    assert read_parquet_bytes(manifest_bytes(table)).schema == table.schema
    assert json.loads(json.dumps(table.schema.names))  # plain column names


def test_a_slide_its_annotations_leave_empty_is_refused_with_one_line(tmp_path):
    slide = write_slide(tmp_path / "s.svs", blob_image(W, H), app_mag=40, mpp=0.25)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "s.geojson").write_bytes(collection(feature("Polygon", [ring(0, 0, W, H)], "Pen")))
    opts = AnnotationOptions(source=str(ann))
    ref = read_annotation_set(opts, {"s": str(slide)}).refs["s"]
    job = SlideJob(str(slide), "s", "unlabeled", None, None, annotation=ref)
    shard_opts = ShardOptions.make("20,10", 128, min_tissue=0)
    with pytest.raises(SlideError, match="leave no region with tissue") as err:
        plan_slide(job, shard_opts, opts)
    assert str(err.value).startswith(str(slide))
    (ann / "s.geojson").write_bytes(slide_a())  # changed after the driver read it
    with pytest.raises(SlideError, match="changed while the run was reading it") as err:
        plan_slide(job, shard_opts, opts)
    assert str(err.value).startswith(f"{slide}: {ann / 's.geojson'}: ")
    assert plan_slide(job, shard_opts).xs.size == 24, "without annotation options: every region"
