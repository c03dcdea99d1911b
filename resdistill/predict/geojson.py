"""A predicted slide as QuPath objects: ``<slide>.geojson`` for QuPath's *File > Import objects*.

``predict --geojson`` writes, per slide, one GeoJSON FeatureCollection in the format QuPath
(0.4 and later) reads and writes itself:

* ``tiles``: one **detection** per scored region, its square outline as a Polygon, with
  ``properties`` ``{"objectType": "detection", "classification": {"name": <argmax class>,
  "color": [r, g, b]}, "measurements": {"p_<class>": probability, ..., "tissue": fraction}}``
  (plus ``"escalated": 0 or 1`` with a cascade). QuPath's *Measure > Show measurement maps*
  colours the tiles by any ``p_<class>``; the classes take the heatmaps' colours
  (:func:`resdistill.predict.outlines.outline_colour`).
* ``regions``: one **annotation** per predicted class, the union of its tiles' squares (shapely
  ``union_all``; MultiPolygon where they are apart), with ``{"tiles": count}``: the regions
  ``resdistill shard --annotations`` reads back as that class.
* ``both``: the two together.

Coordinates are QuPath's pixels: level-0 pixels of the slide, less the slide's
:attr:`sharding.slide.SlideInfo.origin` (``openslide.bounds-x/-y``: QuPath crops MIRAX and other
sparse slides to those bounds when it opens them, so its origin is there); with
``crop=False`` (``--no-geojson-crop``, for an image added to QuPath with ``--no-crop``) plain
level-0 pixels. Each feature's ``id`` is a UUID derived from the slide, the kind and the region,
so a rerun writes the same file.

The file is made from a slide's tiles table (``parts/<slide>.tiles.parquet``'s columns) and its
region size, so the slides a rerun skips get theirs too (:func:`rewrite_geojson`).
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sharding.storage.base import Storage

__all__ = ["GEOJSON_MODES", "GeoJSONOptions", "columns", "rewrite_geojson", "slide_collection",
           "write_geojson"]  # fmt: skip

#: ``--geojson`` values ("" is off; the flag alone is ``tiles``)
GEOJSON_MODES = ("", "tiles", "regions", "both")
_NAMESPACE = uuid.UUID("6b1f4a52-2d9c-4c51-9d1e-0f3b8f7e2a10")  # of resdistill's feature ids


@dataclass(frozen=True)
class GeoJSONOptions:
    """What ``<slide>.geojson`` holds: tile detections, class-region annotations, and whether
    coordinates are relative to the slide's bounds (QuPath's default) or to level 0."""

    tiles: bool = True
    regions: bool = False
    crop: bool = True

    @classmethod
    def of(cls, mode: str, crop: bool = True) -> GeoJSONOptions | None:
        """The options of ``--geojson MODE`` (None when off)."""
        if not mode:
            return None
        if mode not in GEOJSON_MODES:
            raise ValueError(f"--geojson: {mode!r} is not one of tiles, regions, both")
        return cls(tiles=mode in ("tiles", "both"), regions=mode in ("regions", "both"), crop=crop)


def file_name(sid: str) -> str:
    """``<slide>.geojson``: the name ``shard --annotations`` matches to the slide again."""
    return f"{sid}.geojson"


def _feature(sid: str, kind: str, key: str, geometry: Mapping[str, Any], object_type: str,
             classification: dict, measurements: dict, **extra: Any) -> dict:  # fmt: skip
    """One QuPath feature: its id is fixed by slide, ``kind`` and ``key`` (a rerun writes the same
    ids); ``extra`` properties stand between the classification and the measurements."""
    fid = str(uuid.uuid5(_NAMESPACE, f"{sid}/{kind}/{key}"))
    props = {"objectType": object_type, "classification": classification, **extra,
             "measurements": measurements}  # fmt: skip
    return {"type": "Feature", "id": fid, "geometry": geometry, "properties": props}


def _classification(name: str, classes: Sequence[str]) -> dict[str, Any]:
    from resdistill.predict.outlines import outline_colour

    return {"name": name, "color": [int(v) for v in outline_colour(name, "class", classes)]}


def slide_collection(
    sid: str,
    tiles: Mapping[str, Any],
    classes: Sequence[str],
    size0: int,
    origin: tuple[int, int],
    opts: GeoJSONOptions,
) -> dict[str, Any]:
    """The FeatureCollection of one slide (module docstring) from its tiles table ``tiles``
    (columns ``x``, ``y`` level-0 top-left of each region, ``p_<class>``, ``tissue``, optional
    ``escalated``) and its regions' level-0 side ``size0``."""
    xs = np.asarray(tiles["x"], dtype=np.int64)
    ys = np.asarray(tiles["y"], dtype=np.int64)
    probs = np.column_stack([np.asarray(tiles[f"p_{c}"], dtype=np.float64) for c in classes])
    ox, oy = origin if opts.crop else (0, 0)
    qx, qy = xs - ox, ys - oy
    owner = probs.argmax(axis=1) if len(xs) else np.zeros(0, np.int64)
    kinds = [_classification(c, classes) for c in classes]
    features: list[dict] = []
    if opts.tiles:
        tissue = np.asarray(tiles.get("tissue", np.ones(len(xs))), dtype=np.float64)
        escalated = tiles.get("escalated")
        for i in range(len(xs)):
            x0, y0, x1, y1 = int(qx[i]), int(qy[i]), int(qx[i]) + size0, int(qy[i]) + size0
            measurements = {f"p_{c}": round(float(probs[i, k]), 6) for k, c in enumerate(classes)}
            measurements["tissue"] = round(float(tissue[i]), 4)
            if escalated is not None:
                measurements["escalated"] = int(bool(escalated[i]))
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            geometry = {"type": "Polygon", "coordinates": [ring]}
            features.append(_feature(sid, "tile", f"{xs[i]},{ys[i]}", geometry, "detection",
                                     kinds[int(owner[i])], measurements))  # fmt: skip
    if opts.regions:
        features += _regions(sid, qx, qy, size0, owner, classes, kinds)
    return {"type": "FeatureCollection", "features": features}


def _regions(sid: str, qx: np.ndarray, qy: np.ndarray, size0: int, owner: np.ndarray,
             classes: Sequence[str], kinds: list[dict]) -> list[dict]:  # fmt: skip
    """One annotation per predicted class: the union of its tiles' squares."""
    import shapely

    out = []
    for k, c in enumerate(classes):
        mine = owner == k
        if not mine.any():
            continue
        union = shapely.union_all(
            shapely.box(qx[mine], qy[mine], qx[mine] + size0, qy[mine] + size0)
        )
        geometry = json.loads(shapely.to_geojson(union))
        out.append(_feature(sid, "region", c, geometry, "annotation", kinds[k],
                            {"tiles": int(mine.sum())}, isLocked=False))  # fmt: skip
    return out


def write_geojson(
    store: Storage,
    sid: str,
    tiles: Mapping[str, Any],
    classes: Sequence[str],
    size0: int,
    origin: tuple[int, int],
    opts: GeoJSONOptions,
) -> str:
    """Write ``<slide>.geojson`` (:func:`slide_collection`) to ``store``; returns its name."""
    doc = slide_collection(sid, tiles, classes, size0, origin, opts)
    name = file_name(sid)
    store.write_bytes(name, json.dumps(doc, separators=(",", ":")).encode())
    return name


def columns(table: Any) -> dict[str, np.ndarray]:
    """A pyarrow tiles table as ``{column: array}`` (what :func:`slide_collection` reads)."""
    return {name: table.column(name).to_numpy() for name in table.column_names}


def rewrite_geojson(
    store: Storage,
    records: Mapping[str, Mapping[str, Any]],
    parts: Mapping[str, str],
    classes: Sequence[str],
    opts: GeoJSONOptions,
) -> None:
    """``<slide>.geojson`` for the slides whose ``records`` a run found done, from their tiles
    tables (``parts``: slide -> the table's name in ``store``), so a rerun with ``--geojson``
    gives every slide its file, with this run's options."""
    import pyarrow.parquet as pq

    for sid, doc in records.items():
        table = pq.read_table(io.BytesIO(store.read_bytes(parts[sid])))
        ox, oy = (doc.get("slide_info") or {}).get("origin") or (0, 0)
        size0 = int(doc["grid"]["size0"])
        write_geojson(store, sid, columns(table), classes, size0, (int(ox), int(oy)), opts)
