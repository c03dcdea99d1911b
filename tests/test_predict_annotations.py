"""``resdistill predict --annotations``: a slide's QuPath outlines over its heatmaps.

Synthetic slides of 1024 x 768 level-0 pixels at 2 um/px have 256 x 192 thumbnails (4 level-0
pixels a thumbnail pixel), so each polygon's edges land on known thumbnail pixels. A model at
1.25x on 32 px tiles (random weights: only the drawing matters) predicts them twice, without and
with annotations: outside a band around the outlines the heatmap pixels must be the same, on each
edge the outline's colour must appear, and slides without a usable file must get the very same
PNGs as without ``--annotations``. ``--heatmap-px 256`` makes the heatmap background the
256 x 192 picture of the slide, found in each PNG at ``(LEFT_PX, TOP_PX)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from resdistill.commands import predict as predict_cmd
from resdistill.models import build_model
from resdistill.predict.heatmaps import LEFT_PX, TOP_PX
from resdistill.predict.outlines import CLASS_COLOURS, IGNORE_COLOUR, ROI_COLOUR
from sharding.storage import open_storage
from tests.annotation_factory import collection, feature, ring
from tests.cli_lines import error_lines
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import _cli, save_checkpoint

pytestmark = pytest.mark.timeout(300)

W, H, SCALE = 1024, 768, 4  # level-0 pixels; level-0 pixels per thumbnail pixel
CLASSES = ("Tumor", "Stroma")
TUMOR, HOLE = (128, 128, 512, 640), (256, 256, 384, 384)
STROMA = [(640, 128, 896, 256), (640, 512, 896, 640)]
ROI = (64, 64, 960, 704)
IGNORE = (700, 320, 800, 420)
MALFORMED = '{"type": "FeatureCollection", "features": ['


def annotation_a() -> bytes:
    return collection(
        feature("Polygon", [ring(*TUMOR), ring(*HOLE)], "Tumor"),
        feature("MultiPolygon", [[ring(*r)] for r in STROMA], "Stroma"),
        feature("Polygon", [ring(*ROI)]),
        feature("Polygon", [ring(*IGNORE)], "Ignore*"),
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """slides/{a,b,c}.svs, a 1.25x checkpoint, and ann/ with a's file, c's malformed one and a
    file for a slide not predicted; b has none."""
    root = tmp_path_factory.mktemp("predann")
    (root / "slides").mkdir()
    for i, name in enumerate("abc"):
        write_slide(root / "slides" / f"{name}.svs", blob_image(W, H, seed=i), app_mag=5, mpp=2.0)
    save_checkpoint(
        root / "ckpt", build_model("resnet18", len(CLASSES)), stage="student", mag="1.25x",
        tile_px=32, classes=CLASSES,
    )  # fmt: skip
    ann = root / "ann"
    ann.mkdir()
    (ann / "a.svs.geojson").write_bytes(annotation_a())
    (ann / "c.geojson").write_text(MALFORMED)
    (ann / "other-slide.geojson").write_bytes(annotation_a())
    return root


def predict(setup: Path, out: Path, *extra: str, slides: str = "abc") -> int:
    paths = [str(setup / "slides" / f"{s}.svs") for s in slides]
    argv = [str(setup / "ckpt"), *paths, "--out", str(out), "--heatmap", "all", "--min-tissue", "0"]
    argv += ["--heatmap-px", str(W // SCALE)]
    return _cli(predict_cmd, [*argv, *extra])


def png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def image(picture: np.ndarray) -> np.ndarray:
    """The slide picture inside a heatmap PNG (at ``LEFT_PX, TOP_PX``, one pixel per pixel)."""
    return picture[TOP_PX : TOP_PX + H // SCALE, LEFT_PX : LEFT_PX + W // SCALE]


def near(img: np.ndarray, x: float, y: float, colour: tuple[int, int, int], r: int = 2) -> bool:
    """Whether ``colour`` is within ``r`` pixels of thumbnail point (x, y)."""
    x, y = int(round(x)), int(round(y))
    return bool((img[y - r : y + r + 1, x - r : x + r + 1] == colour).all(axis=2).any())


def on_edge(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour) -> float:
    """Fraction of the points sampled along the edge (x0, y0)-(x1, y1) with ``colour`` near."""
    pts = [(x0 + t * (x1 - x0), y0 + t * (y1 - y0)) for t in np.linspace(0.1, 0.9, 17)]
    return float(np.mean([near(img, x, y, colour, r=1) for x, y in pts]))


def rect_edges(rect: tuple[int, ...]) -> list[tuple[float, float, float, float]]:
    x0, y0, x1, y1 = (v / SCALE for v in rect)
    return [(x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)]


def test_outlines_over_heatmaps(setup: Path, tmp_path: Path, capsys) -> None:
    assert predict(setup, tmp_path / "plain") == 0
    capsys.readouterr()
    rc = predict(setup, tmp_path / "ann", "--annotations", str(setup / "ann"))
    err = capsys.readouterr().err.splitlines()
    assert rc == 1  # c's file is unusable

    # one line for the malformed file, one for the slide without a file, none for other-slide
    bad = [line for line in err if "c.geojson" in line]
    assert len(bad) == 1 and "not valid JSON" in bad[0], err
    assert len([line for line in err if "b.geojson" in line]) == 1, err
    assert not [line for line in err if "other-slide" in line or "skipped" in line], err

    # a: the file and its sha256, every outline's colour and style
    doc = json.loads((tmp_path / "ann" / "a.json").read_text())["annotations"]
    data = (setup / "ann" / "a.svs.geojson").read_bytes()
    assert doc["file"] == str(setup / "ann" / "a.svs.geojson")
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    hexes = ["#{:02x}{:02x}{:02x}".format(*c) for c in (*CLASS_COLOURS[:2], ROI_COLOUR)]
    styles = {o["name"]: (o["role"], o["colour"], o["rings"]) for o in doc["outlines"]}
    assert styles == {
        "Tumor": ("class", hexes[0], 2), "Stroma": ("class", hexes[1], 2),
        "region of interest": ("roi", hexes[2], 1), "ignored": ("ignore", "#969696", 1),
    }  # fmt: skip
    for sid in "bc":
        doc = json.loads((tmp_path / "ann" / f"{sid}.json").read_text())
        assert doc["annotations"]["file"] is None and doc["annotations"]["outlines"] == []
        assert doc["class"] in CLASSES
    assert "unusable annotation file c.geojson" in doc["annotations"]["note"]

    th, tw = H // SCALE, W // SCALE
    for cls in CLASSES:
        plain_png = png(tmp_path / "plain" / f"a.heatmap-{cls}.png")
        drawn_png = png(tmp_path / "ann" / f"a.heatmap-{cls}.png")
        assert plain_png.shape[0] >= th and plain_png.shape[1] >= tw
        plain, top = image(plain_png), image(drawn_png)  # the slide picture in each PNG

        # on every edge: the outline's colour (dashed outlines: on part of it)
        for rect in (TUMOR, HOLE):
            assert all(on_edge(top, *e, CLASS_COLOURS[0]) > 0.9 for e in rect_edges(rect))
        for rect in STROMA:
            assert all(on_edge(top, *e, CLASS_COLOURS[1]) > 0.9 for e in rect_edges(rect))
        assert all(0.2 < on_edge(top, *e, ROI_COLOUR) < 1 for e in rect_edges(ROI))
        assert all(0.2 < on_edge(top, *e, IGNORE_COLOUR) < 1 for e in rect_edges(IGNORE))
        assert not (plain == ROI_COLOUR).all(axis=2).any()  # white only where drawn

        # away from every outline: the heatmap untouched
        rings = [r for rect in (TUMOR, HOLE, *STROMA, ROI, IGNORE) for r in [ring(*rect)]]
        lines = shapely.multilinestrings(np.array(rings, dtype=float) / SCALE)
        yy, xx = np.mgrid[:th, :tw]
        far = shapely.distance(shapely.points(xx.ravel(), yy.ravel()), lines).reshape(th, tw) > 3
        assert far.mean() > 0.7
        assert np.array_equal(top[far], plain[far])
        assert not np.array_equal(top[~far], plain[~far])

        # the legend (beside or below the slide picture) shows each outline's colour
        legend = drawn_png.copy()
        legend[TOP_PX : TOP_PX + th, LEFT_PX : LEFT_PX + tw] = 0
        for colour in (*CLASS_COLOURS[:2], ROI_COLOUR, IGNORE_COLOUR):
            assert (legend == colour).all(axis=2).any()

        # b (no file) and c (malformed): predicted as without --annotations
        for sid in "bc":
            assert np.array_equal(
                png(tmp_path / "ann" / f"{sid}.heatmap-{cls}.png"),
                png(tmp_path / "plain" / f"{sid}.heatmap-{cls}.png"),
            )


def test_annotations_on_s3(setup: Path, tmp_path: Path, s3_bucket: str, capsys) -> None:
    store = open_storage(f"{s3_bucket}/cohort/ann")
    store.write_bytes("a.geojson", annotation_a())
    rc = predict(setup, tmp_path / "o", "--annotations", store.url, slides="ab")
    err = capsys.readouterr().err
    assert rc == 0, err  # a slide without a file is no error
    doc = json.loads((tmp_path / "o" / "a.json").read_text())["annotations"]
    assert doc["file"] == f"{s3_bucket}/cohort/ann/a.geojson"
    assert doc["sha256"] == hashlib.sha256(annotation_a()).hexdigest()
    top = image(png(tmp_path / "o" / "a.heatmap-Tumor.png"))
    assert all(on_edge(top, *e, CLASS_COLOURS[0]) > 0.9 for e in rect_edges(TUMOR))


def test_annotations_source_unusable(setup: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    rc = predict(setup, tmp_path / "o", "--annotations", str(tmp_path / "empty"), slides="a")
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("predict: error: --annotations:") and "no .geojson files" in err[0]
    assert not (tmp_path / "o" / "a.json").exists()
