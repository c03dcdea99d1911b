"""``predict --geojson``: QuPath objects that re-import as the regions they predict.

QuPath is not installed here (and paquo needs it), so :func:`check_qupath_geojson` checks the
object format QuPath 0.4+ reads with *File > Import objects* (and writes itself): a
FeatureCollection of Features with a string ``id``, a Polygon / MultiPolygon ``geometry`` of
closed rings of finite numbers, and ``properties`` with ``objectType`` ``detection`` or
``annotation``, ``classification`` ``{"name": str, "color": [r, g, b]}`` and ``measurements``
``{name: finite number}``. The round trip goes through the project's own readers: the class
regions re-read by :func:`sharding.annotations.parse_geojson` label each predicted region with
its predicted class, and ``resdistill shard --annotations`` on those files cuts the same regions
with the same labels.

Coordinates: QuPath crops a slide to OpenSlide's bounds (``openslide.bounds-x/-y``) when it
opens it, so the files are in level-0 pixels less that origin. OpenSlide sets the bounds for
MIRAX and other sparse formats: :func:`write_mirax` writes a small MIRAX slide (Slidedat.ini,
Index.dat, one data file of JPEG camera images, as OpenSlide's MIRAX reader reads them) whose
images cover only the middle of its plane, so OpenSlide reports bounds; the round trip runs on
it beside an Aperio slide (origin 0, 0).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from resdistill.commands import predict as predict_cmd
from resdistill.predict.geojson import GeoJSONOptions, slide_collection
from sharding.annotation_set import AnnotationRef
from sharding.annotations import parse_geojson
from sharding.options import AnnotationOptions
from sharding.region_labels import label_regions, slide_region_labels
from sharding.slide import bounds_origin
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import _cli, save_checkpoint
from tests.test_predict_scale import chain, model

CLASSES = ("benign", "tumor")
OBJECT_TYPES = ("detection", "annotation")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rings(geometry: dict) -> list[list]:
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    assert kind in ("Polygon", "MultiPolygon"), kind
    polygons = [coords] if kind == "Polygon" else coords
    return [ring for polygon in polygons for ring in polygon]


def check_qupath_geojson(doc: Any, classes: tuple[str, ...]) -> dict[str, list[dict]]:
    """Assert ``doc`` is a FeatureCollection QuPath imports (module docstring); returns its
    features by ``objectType``."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    ids = [f["id"] for f in doc["features"]]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)
    out: dict[str, list[dict]] = {t: [] for t in OBJECT_TYPES}
    for f in doc["features"]:
        assert f["type"] == "Feature" and set(f) == {"type", "id", "geometry", "properties"}
        for ring in _rings(f["geometry"]):
            assert len(ring) >= 4 and ring[0] == ring[-1], ring
            assert all(len(p) == 2 and all(_finite(v) for v in p) for p in ring)
        props = f["properties"]
        assert props["objectType"] in OBJECT_TYPES
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and cls["name"] in classes
        assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                               for v in cls["color"])  # fmt: skip
        assert all(isinstance(k, str) and _finite(v) for k, v in props["measurements"].items())
        out[props["objectType"]].append(f)
    colours = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]
               ["color"]) for f in doc["features"]}  # fmt: skip
    assert len(set(colours.values())) == len(colours), "one colour per class"
    return out


def _tiles(rng: np.random.Generator, n_cols: int = 6, size0: int = 64) -> dict[str, np.ndarray]:
    """A tiles table: a 6 x 4 block of regions at level 0, left half benign, right half tumour."""
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(4))
    xs, ys = 2048 + cols.ravel() * size0, 4096 + rows.ravel() * size0
    tumour = np.where(cols.ravel() >= n_cols // 2, 0.8, 0.2) + rng.uniform(-0.1, 0.1, xs.size)
    return {"x": xs, "y": ys, "p_benign": 1 - tumour, "p_tumor": tumour,
            "tissue": rng.uniform(0.5, 1, xs.size)}  # fmt: skip


def test_bounds_of_a_mirax_slide_are_its_qupath_origin() -> None:
    props = {"openslide.vendor": "mirax", "openslide.bounds-x": "1520",
             "openslide.bounds-y": "43008", "openslide.bounds-width": "9000"}  # fmt: skip
    assert bounds_origin(props) == (1520, 43008)
    assert bounds_origin({"openslide.vendor": "aperio"}) == (0, 0)
    assert bounds_origin({"openslide.bounds-x": "junk"}) == (0, 0)


def test_tiles_and_regions_in_qupath_pixels_round_trip(tmp_path: Path) -> None:
    tiles = _tiles(np.random.default_rng(0))
    origin, size0 = (1520, 3008), 64
    doc = slide_collection("s1", tiles, CLASSES, size0, origin, GeoJSONOptions(regions=True))
    doc = json.loads(json.dumps(doc))  # as a file holds it
    kinds = check_qupath_geojson(doc, CLASSES)
    owner = np.where(tiles["p_tumor"] > tiles["p_benign"], "tumor", "benign")
    assert len(kinds["detection"]) == len(owner) and len(kinds["annotation"]) == 2
    for i, f in enumerate(kinds["detection"]):  # the region's square, less the slide's origin
        (ring,) = f["geometry"]["coordinates"]
        x0, y0 = tiles["x"][i] - origin[0], tiles["y"][i] - origin[1]
        assert ring[0] == [x0, y0] and ring[2] == [x0 + size0, y0 + size0]
        m = f["properties"]["measurements"]
        assert f["properties"]["classification"]["name"] == owner[i]
        assert m["p_tumor"] == pytest.approx(tiles["p_tumor"][i], abs=1e-6)
        assert m["p_benign"] + m["p_tumor"] == pytest.approx(1, abs=1e-5)
    again = slide_collection("s1", tiles, CLASSES, size0, origin, GeoJSONOptions(regions=True))
    assert [f["id"] for f in again["features"]] == [f["id"] for f in doc["features"]]

    # re-read by the shard reader as region annotations, as a slide task reads them: moved
    # from QuPath's pixels to the slide's level 0 by the same origin
    data = json.dumps(doc).encode()
    ann, problems = parse_geojson(data, "s1.geojson", ignore=())
    assert problems == [] and set(ann.classes) == set(CLASSES)
    (tmp_path / "s1.geojson").write_bytes(data)
    ref = AnnotationRef("s1.geojson", hashlib.sha256(data).hexdigest(), labels_regions=True)
    opts = AnnotationOptions(source=str(tmp_path))
    labels, problems = slide_region_labels(opts, ref, 9000, 9000, tiles["x"], tiles["y"], size0,
                                           origin)  # fmt: skip
    assert problems == [] and labels.keep.all() and list(labels.labels) == list(owner)
    unmoved = label_regions(ann, tiles["x"], tiles["y"], size0, opts)  # without the origin
    assert list(unmoved.labels) != list(owner)

    level0 = slide_collection("s1", tiles, CLASSES, size0, origin, GeoJSONOptions(crop=False))
    assert level0["features"][0]["geometry"]["coordinates"][0][0] == [2048, 4096]
    assert all(f["properties"]["objectType"] == "detection" for f in level0["features"])


def write_mirax(path: Path, img: np.ndarray, keep: set[tuple[int, int]], image_px: int = 512,
                mpp: float = 0.5) -> Path:  # fmt: skip
    """A two-level MIRAX slide ``path`` (``.mrxs`` and its folder) of RGB ``img``, holding only
    the camera images ``(col, row)`` of ``keep`` (``image_px`` square), so OpenSlide's bounds
    are theirs. No position buffer and no overlap: images lie edge to edge."""
    h, w = img.shape[:2]
    nx, ny = w // image_px, h // image_px
    folder = path.with_suffix("")
    folder.mkdir(parents=True)
    path.write_bytes(b"")
    data, levels = bytearray(), []
    for concat in (1, 2):  # level 1 concatenates 2 x 2 images into one, downsampled
        entries, span = [], image_px * concat
        for row in range(0, ny, concat):
            for col in range(0, nx, concat):
                if not {(c, r) for c in range(col, col + concat)
                        for r in range(row, row + concat)} & keep:  # fmt: skip
                    continue
                y0, x0 = row * image_px, col * image_px
                tile = Image.fromarray(img[y0 : y0 + span, x0 : x0 + span])
                buf = io.BytesIO()
                tile.resize((image_px, image_px), Image.Resampling.LANCZOS).save(buf, "JPEG")
                entries.append((row * nx + col, len(data), buf.tell(), 0))
                data += buf.getvalue()
        levels.append(entries)
    (folder / "Data0000.dat").write_bytes(bytes(data))
    slide_id = "resdistill-test"
    index = bytearray(b"01.02" + slide_id.encode())
    index += struct.pack("<ii", len(index) + 8, 0)  # hierarchical root, no non-hierarchical
    table = len(index)
    index += bytes(4 * len(levels))
    for i, entries in enumerate(levels):  # per level: 0, first page; page: count, next, entries
        struct.pack_into("<i", index, table + 4 * i, len(index))
        index += struct.pack("<iiii", 0, len(index) + 8, len(entries), 0)
        index += b"".join(struct.pack("<iiii", *e) for e in entries)
    (folder / "Index.dat").write_bytes(bytes(index))
    ini = [f"[GENERAL]\nSLIDE_VERSION=01.02\nSLIDE_ID={slide_id}\nIMAGENUMBER_X={nx}\n"
           f"IMAGENUMBER_Y={ny}\nOBJECTIVE_MAGNIFICATION={round(10 / mpp)}\n"
           f"[HIERARCHICAL]\nHIER_COUNT=1\nNONHIER_COUNT=0\nINDEXFILE=Index.dat\n"
           f"HIER_0_NAME=Slide zoom level\nHIER_0_COUNT={len(levels)}\n"]  # fmt: skip
    ini += [f"HIER_0_VAL_{i}=ZoomLevel_{i}\nHIER_0_VAL_{i}_SECTION=LEVEL_{i}\n"
            for i in range(len(levels))]  # fmt: skip
    ini.append("[DATAFILE]\nFILE_COUNT=1\nFILE_0=Data0000.dat\n")
    ini += [f"[LEVEL_{i}]\nIMAGE_CONCAT_FACTOR={min(i, 1)}\nOVERLAP_X=0\nOVERLAP_Y=0\n"
            f"MICROMETER_PER_PIXEL_X={mpp * 2**i}\nMICROMETER_PER_PIXEL_Y={mpp * 2**i}\n"
            f"IMAGE_FILL_COLOR_BGR=16777215\nDIGITIZER_WIDTH={image_px}\n"
            f"DIGITIZER_HEIGHT={image_px}\nIMAGE_FORMAT=JPEG\n" for i in range(len(levels))]  # fmt: skip
    (folder / "Slidedat.ini").write_text("".join(ini))
    return path


def test_a_mirax_slide_reports_its_bounds(tmp_path: Path) -> None:
    """The written MIRAX slide is what the round trip needs: OpenSlide reads it, with bounds."""
    from sharding.slide import open_slide, slide_info

    img = blob_image(2048, 2048, seed=1)
    path = write_mirax(tmp_path / "m.mrxs", img, {(1, 1), (2, 1), (1, 2), (2, 2)})
    slide = open_slide(str(path))
    info = slide_info(slide, str(path))
    assert (info.width, info.height, info.base_mpp, info.origin) == (2048, 2048, 0.5, (512, 512))
    assert slide.properties["openslide.bounds-width"] == "1024"
    pixels = np.asarray(slide.read_region((600, 600), 0, (64, 64)).convert("RGB"), np.float64)
    assert np.abs(pixels.mean((0, 1)) - img[600:664, 600:664].mean((0, 1))).max() < 3


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1024 x 768 Aperio slide at 5x (2 um/px), a 2048 x 2048 MIRAX slide at 20x whose
    middle 1024 x 1024 is scanned (bounds at 512, 512), and a model on a 2.5x (32 px) chain."""
    root = tmp_path_factory.mktemp("geojson")
    (root / "slides").mkdir()
    write_slide(root / "slides" / "s1.svs", blob_image(1024, 768, seed=3), app_mag=5, mpp=2.0)
    write_mirax(root / "slides" / "m1.mrxs", blob_image(2048, 2048, seed=4),
                {(1, 1), (2, 1), (1, 2), (2, 2)})  # fmt: skip
    ckpt = save_checkpoint(root / "model", model(0, 0.2), stage="student", mag="2p5x",
                           tile_px=32, read_chain=chain())  # fmt: skip
    return root / "slides", ckpt


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_predict_geojson_reimports_through_shard(
    slide_and_model: tuple[Path, Path], ray_cluster: str, tmp_path: Path
) -> None:
    """``predict --geojson both`` on an Aperio and a MIRAX slide: every region a detection with
    its probabilities, in QuPath's pixels (less the MIRAX slide's bounds); the class regions,
    given to ``shard --annotations``, label the same regions with the predicted classes. A rerun
    asking for other GeoJSON rewrites the skipped slides' files."""
    from sharding.pipeline import run_shard

    slides, ckpt = slide_and_model
    out = tmp_path / "out"
    argv = [str(ckpt), str(slides), "--out", str(out), "--address", ray_cluster,
            "--heatmap", "none", "--batch-size", "32"]  # fmt: skip
    assert _cli(predict_cmd, [*argv, "--geojson", "both"]) == 0
    tiles = pq.read_table(out / "tiles.parquet").to_pandas()
    probs = tiles[["p_benign", "p_tumor"]].to_numpy()
    predicted = {(sid, x, y): c for sid, x, y, c in zip(tiles["slide"], tiles["x"], tiles["y"],
                 np.array(CLASSES)[probs.argmax(1)], strict=True)}  # fmt: skip
    notes = tmp_path / "qupath"  # the folder a QuPath user exports to, one file per slide
    notes.mkdir()
    for sid, origin in (("s1", (0, 0)), ("m1", (512, 512))):
        record = _read(out / f"{sid}.json")
        assert record["files"]["geojson"] == str(out / f"{sid}.geojson")
        assert record["slide_info"]["origin"] == list(origin)
        kinds = check_qupath_geojson(_read(out / f"{sid}.geojson"), CLASSES)
        mine = {(x, y): c for (s, x, y), c in predicted.items() if s == sid}
        assert len(kinds["detection"]) == len(mine) > 10
        names = {f["properties"]["classification"]["name"] for f in kinds["annotation"]}
        assert names == set(mine.values())
        for f in kinds["detection"]:  # QuPath's pixel (0, 0) is the slide's origin
            x, y = f["geometry"]["coordinates"][0][0]
            assert f["properties"]["classification"]["name"] == mine[(x + origin[0], y + origin[1])]
        (notes / f"{sid}.geojson").write_bytes((out / f"{sid}.geojson").read_bytes())

    run_shard([slides], str(tmp_path / "ds"), mags="2.5,1.25", tile_px=32,
              annotations=str(notes), annotated_only=True, workers=0, progress=False)  # fmt: skip
    manifest = pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pandas()
    relabelled = dict(zip(zip(manifest["slide"], manifest["x"], manifest["y"], strict=True),
                          manifest["label"], strict=True))  # fmt: skip
    assert relabelled == predicted

    assert _cli(predict_cmd, [*argv, "--geojson", "tiles", "--no-geojson-crop"]) == 0
    kinds = check_qupath_geojson(_read(out / "m1.geojson"), CLASSES)
    assert kinds["annotation"] == [] and len(kinds["detection"]) == sum(
        1 for s, _, _ in predicted if s == "m1"
    )
    x, y = kinds["detection"][0]["geometry"]["coordinates"][0][0]
    assert ("m1", x, y) in predicted  # level 0 now: no origin taken off
