"""Hand-written QuPath-style GeoJSON over a region grid whose labels are known by arithmetic.

The slides these files annotate are ``W x H`` level-0 pixels cut into ``U``-pixel regions (40x,
0.25 um/px sharded at 20x with 128 px tiles: 256 level-0 pixels a region), 6 columns by 4 rows.
:func:`slide_a` holds two classes (one with a hole, one a MultiPolygon), an ignore polygon, a
self-intersecting polygon, a point and a polygon wholly outside the slide; :func:`expected_a`
gives each region's fate from rectangle overlaps alone, with no geometry library.
"""

from __future__ import annotations

import json

U = 256
W, H = 6 * U, 4 * U

TUMOR = (0, 0, 3 * U, H)
TUMOR_HOLE = (U, U, 2 * U, 2 * U)  # region (1, 1) exactly
STROMA = [
    (3 * U, 0, W, U),  # row 0 of columns 3-5
    (5 * U, 3 * U, W, H),  # region (5, 3)
    (3 * U, 3 * U, 3 * U + 154, H),  # 60% of region (3, 3): labelled
    (4 * U, 3 * U, 4 * U + 102, H),  # 40% of region (4, 3): not labelled
]
STROMA_OUTSIDE = (W + 400, 0, W + 500, 100)
IGNORE = (5 * U + 20, 2 * U + 88, 5 * U + 120, 2 * U + 188)  # inside region (5, 2)
BOWTIE_REGION = (3, 2)  # a self-intersecting Tumor polygon covering half of it


def ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(kind: str, coordinates, cls: str | None = None, object_type: str = "annotation"):
    props: dict = {"objectType": object_type}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates},
            "properties": props}  # fmt: skip


def collection(*features) -> bytes:
    return json.dumps({"type": "FeatureCollection", "features": list(features)}).encode()


def bowtie(col: int, row: int) -> list[list[float]]:
    x0, y0 = col * U, row * U
    return [[x0, y0], [x0 + U, y0 + U], [x0 + U, y0], [x0, y0 + U], [x0, y0]]


def slide_a() -> bytes:
    return collection(
        feature("Polygon", [ring(*TUMOR), ring(*TUMOR_HOLE)], "Tumor"),
        feature("MultiPolygon", [[ring(*r)] for r in STROMA], "Stroma"),
        feature("Polygon", [ring(*STROMA_OUTSIDE)], "Stroma"),
        feature("Polygon", [ring(*IGNORE)], "Ignore*"),
        feature("Polygon", [bowtie(*BOWTIE_REGION)], "Tumor"),
        feature("Point", [10, 10], "Tumor"),
        feature("Polygon", [ring(0, 0, W, H)], "Tumor", object_type="detection"),
    )


def overlap(rect: tuple, col: int, row: int) -> float:
    """Fraction of region (col, row) that the rectangle covers."""
    x0, y0, x1, y1 = rect
    w = max(0, min(x1, (col + 1) * U) - max(x0, col * U))
    h = max(0, min(y1, (row + 1) * U) - max(y0, row * U))
    return w * h / U**2


def expected_a() -> dict[tuple[int, int], tuple[str | None, dict[str, float]]]:
    """(col, row) -> (label, class fractions) of every region slide_a keeps (ignored ones absent)."""
    out = {}
    for col in range(W // U):
        for row in range(H // U):
            if overlap(IGNORE, col, row) > 0:
                continue
            tumor = overlap(TUMOR, col, row) - overlap(TUMOR_HOLE, col, row)
            tumor += 0.5 if (col, row) == BOWTIE_REGION else 0.0
            stroma = sum(overlap(r, col, row) for r in STROMA)
            fr = {"Stroma": stroma, "Tumor": tumor}
            best = max(sorted(fr), key=lambda c: fr[c])
            out[col, row] = (best if fr[best] >= 0.5 else None, fr)
    return out


def slide_b() -> bytes:
    """An unclassified region of interest (columns 0-2, rows 0-1) and Stroma on column 0."""
    return collection(
        feature("Polygon", [ring(0, 0, 3 * U, 2 * U)]),
        feature("Polygon", [ring(0, 0, U, H)], "Stroma"),
    )


def expected_b() -> dict[tuple[int, int], tuple[str | None, dict[str, float]]]:
    out = {}
    for col in range(W // U):
        for row in range(H // U):
            stroma = 1.0 if col == 0 else 0.0
            if stroma or (col < 3 and row < 2):
                out[col, row] = ("Stroma" if stroma else None, {"Stroma": stroma})
    return out


def at_level(data: bytes, downsample: float) -> bytes:
    """The same annotations in the pixels of a level ``downsample`` times smaller."""
    doc = json.loads(data)

    def scale(c):
        return (
            [v / downsample for v in c] if isinstance(c[0], (int, float)) else [scale(x) for x in c]
        )

    for f in doc["features"]:
        f["geometry"]["coordinates"] = scale(f["geometry"]["coordinates"])
    return json.dumps(doc).encode()
