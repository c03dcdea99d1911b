"""What prediction writes to ``--out``, and how a rerun knows which slides are done.

Per slide, as soon as its last region is scored (so a crash loses at most the slides in flight):

* ``<slide>.heatmap.npy``: ``(rows, cols, K)`` float32 tile probabilities, NaN off tissue;
* ``<slide>.heatmap-<class>.png`` and ``<slide>.heatmap-classes.png``
  (:func:`resdistill.predict.heatmaps.heatmap_pngs`);
* ``parts/<slide>.tiles.parquet``: the slide's rows of ``tiles.parquet``;
* ``<slide>.json`` last: the slide's record (class, probabilities, grid, read chain, seconds,
  status ``ok``, the run's settings, and ``source``: the slide's uri, size and fingerprint,
  :class:`sharding.slide_identity.SlideIdentity`). Its presence with status ``ok`` is what "done"
  means: a rerun with the same settings skips the slide when its bytes are the recorded ones
  (:func:`done_slides`); ``parts/<slide>.tiles.parquet`` carries the same ``source`` in its
  schema metadata (key ``resdistill.source``).

At the end of a run, from the records and parts of every slide given (done before or now) and the
failures of this run (:func:`merge`):

* ``slides.parquet``: one row per slide: ``slide, path, slide_uri, slide_size, slide_sha256``
  (its source and fingerprint), ``class, p_<class>..., tiles, seconds, status`` (``ok`` or the
  one line saying why), ``read``, ``flops`` (counted), and with the cascade ``escalated`` (share
  of tiles sent to the teacher);
* ``tiles.parquet``: ``slide, x, y, row, col, tissue, p_<class>...`` (+ ``escalated``).

A failed slide writes nothing of its own, so a rerun tries it again.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from resdistill.errors import UsageError
from sharding.slide_identity import SlideIdentity

if TYPE_CHECKING:
    from resdistill.predict.annotation_overlay import SlideOverlay
    from resdistill.predict.engine import SlideResult
    from resdistill.predict.geojson import GeoJSONOptions
    from sharding.storage.base import Storage

__all__ = [
    "SLIDES", "TILES", "done_slides", "heatmap_classes", "merge", "read_record",
    "record_identity", "write_slide",
]  # fmt: skip

SLIDES = "slides.parquet"
TILES = "tiles.parquet"
PARTS = "parts"
#: Parquet schema metadata key of a slide's part: its ``source`` as JSON.
SOURCE_KEY = b"resdistill.source"


def heatmap_classes(which: str | Sequence[str] | None, classes: Sequence[str]) -> list[str] | None:
    """The classes ``--heatmap`` names among ``classes``: ``None`` for ``None``/``"predicted"``
    (each slide's own class) and for ``"none"`` (no pictures: see ``write_slide``'s ``pictures``),
    every class for ``"all"``, else the names of a list or of a comma list; :class:`UsageError`
    naming an unknown one."""
    if which is None or which in ("predicted", "none"):
        return None
    if which == "all":
        return list(classes)
    names = [which] if isinstance(which, str) else list(which)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UsageError(
            f"--heatmap: unknown class(es) {unknown}: the model's classes are {list(classes)}"
        )
    return names


def read_record(store: Storage, sid: str) -> dict[str, Any] | None:
    """Slide ``sid``'s record in ``store`` (``<sid>.json``), None when there is none."""
    rel = f"{sid}.json"
    if not store.exists(rel):
        return None
    return json.loads(store.read_bytes(rel))


def record_identity(doc: Mapping[str, Any] | None) -> SlideIdentity | None:
    """The slide a record was made from: its ``source``; for a record written before sources
    were recorded, its path only (it matches only the same path)."""
    if not doc:
        return None
    return SlideIdentity.from_record(doc.get("source") or {"path": doc.get("slide")})


def done_slides(
    url: str,
    records: Mapping[str, Mapping[str, Any] | None],
    identity: Mapping[str, SlideIdentity],
    settings: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """``{slide: record}`` of the slides whose record (``records``, by id, as read from the
    output at ``url``) has status ``ok`` and was made from the same bytes as ``identity[slide]``
    (same size and fingerprint, wherever the file now lies). :class:`UsageError`, one line, when a
    record was written with other ``settings`` (its predictions would mix with these) or from
    another slide under the same id (a case's result must never be reported for another)."""
    done: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for sid, doc in records.items():
        if not doc or doc.get("status") != "ok" or sid not in identity:
            continue
        known = record_identity(doc)
        if known is None or not identity[sid].same_bytes(known):
            raise UsageError(
                f"{identity[sid].uri}: {url} holds the prediction of slide {sid!r} made from "
                f"{known.uri if known else 'another file'} (other bytes): rename the file, pass "
                "--on-conflict suffix, or choose another --out"
            )
        if doc.get("settings") != dict(settings):
            other.append(sid)
        else:
            done[sid] = dict(doc)
    if other:
        raise UsageError(
            f"{url} holds predictions made with other settings (checkpoint, --read, "
            f"--min-tissue or cascade) for {len(other)} slide(s), e.g. {other[0]}: choose another "
            "--out"
        )
    return done


def _tiles_table(result: SlideResult, classes: Sequence[str]) -> Any:
    import pyarrow as pa

    p = result.plan
    assert p is not None and result.probs is not None
    cols: dict[str, Any] = {
        "slide": pa.array([p.sid] * p.n_tiles, pa.string()),
        "x": p.xs, "y": p.ys, "row": p.cells // p.cols, "col": p.cells % p.cols,
        "tissue": p.tissue.astype(np.float64),
    }  # fmt: skip
    for k, c in enumerate(classes):
        cols[f"p_{c}"] = result.probs[:, k]
    if result.escalated is not None:
        cols["escalated"] = result.escalated
    return pa.table(cols)


def _parquet(table: Any, source: Mapping[str, Any] | None = None) -> bytes:
    import pyarrow.parquet as pq

    if source is not None:
        meta = {**(table.schema.metadata or {}), SOURCE_KEY: json.dumps(dict(source)).encode()}
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_slide(
    store: Storage,
    result: SlideResult,
    record: dict[str, Any],
    *,
    classes: Sequence[str],
    which: Sequence[str],
    mag: str,
    cmap: str,
    alpha: float,
    flops: tuple[int, int | None],
    overlay: SlideOverlay | None = None,
    pictures: bool = True,
    geojson: GeoJSONOptions | None = None,
) -> dict[str, Any]:
    """Write the files of one predicted slide (module docstring), ``<slide>.json`` last; returns
    the record written (``record``, which holds the slide's ``source``, plus the slide's
    fields). ``flops`` are the counted FLOPs of
    one tile through the student and, with the cascade, the teacher. ``pictures=False``
    (``--heatmap none``) writes no PNG: the tables and the ``.npy`` heatmap only. ``geojson``
    (``--geojson``) adds ``<slide>.geojson`` (:mod:`resdistill.predict.geojson`)."""
    from resdistill.cascade.rules import cascade_flops
    from resdistill.predict.heatmaps import CLASS_MAP, heatmap_pngs

    p = result.plan
    probs = result.probs
    assert p is not None and probs is not None
    sid = p.sid
    heat = np.full((p.rows * p.cols, len(classes)), np.nan, dtype=np.float32)
    heat[p.cells] = probs
    buf = io.BytesIO()
    np.save(buf, heat.reshape(p.rows, p.cols, len(classes)))
    files = {"heatmap_npy": f"{sid}.heatmap.npy"}
    store.write_bytes(files["heatmap_npy"], buf.getvalue())
    mean = probs.mean(axis=0)
    predicted = classes[int(mean.argmax())]
    pngs = {} if not pictures else heatmap_pngs(
        p.background, (p.info.width, p.info.height), p.xs, p.ys, p.size0, probs, classes,
        slide_id=sid, mag=mag, which=[*(list(which) or [predicted]), CLASS_MAP],
        cmap=cmap, alpha=alpha, escalated=result.escalated,
        outlines=overlay.outlines if overlay is not None and overlay.outlines else None,
        mpp=p.info.base_mpp,
    )  # fmt: skip
    for name, data in pngs.items():
        files[f"heatmap:{name}"] = f"{sid}.heatmap-{name}.png"
        store.write_bytes(files[f"heatmap:{name}"], data)
    files["tiles"] = f"{PARTS}/{sid}.tiles.parquet"
    source = record.get("source")
    tiles = _tiles_table(result, classes)
    store.write_bytes(files["tiles"], _parquet(tiles, source))
    if geojson is not None:
        from resdistill.predict.geojson import columns, write_geojson

        files["geojson"] = write_geojson(store, sid, columns(tiles), classes, p.size0,
                                         p.info.origin, geojson)  # fmt: skip
    doc = {
        **record, "slide": p.path, "slide_id": sid, "status": "ok", "class": predicted,
        "probabilities": {c: float(v) for c, v in zip(classes, mean, strict=True)},
        "n_tiles": p.n_tiles, "seconds": round(result.seconds, 3),
        "slide_info": {
            "width": p.info.width, "height": p.info.height, "base_mpp": p.info.base_mpp,
            "mpp_source": p.info.mpp_source, "origin": list(p.info.origin),
        },
        "grid": {
            "rows": p.rows, "cols": p.cols, "size0": p.size0,
            "x0": int(p.xs[0] - (p.cells[0] % p.cols) * p.size0),
            "y0": int(p.ys[0] - (p.cells[0] // p.cols) * p.size0),
        },
        "background": {"width": int(p.background.shape[1]), "height": int(p.background.shape[0])},
        "heatmap": {"colormap": cmap, "alpha": alpha, "shape": [p.rows, p.cols, len(classes)]},
        "files": {k: store.child_url(v) for k, v in files.items()},
    }  # fmt: skip
    n_esc = int(result.escalated.sum()) if result.escalated is not None else 0
    doc["flops"] = cascade_flops(p.n_tiles, n_esc, flops[0], flops[1] or 0)
    if result.escalated is not None:
        doc["escalated"] = n_esc
    if overlay is not None:
        doc["annotations"] = overlay.to_json(classes)
    store.write_bytes(f"{sid}.json", json.dumps(doc, indent=1).encode())
    return doc


def slide_columns(classes: Sequence[str], cascade: bool) -> list[str]:
    """The columns of ``slides.parquet``, in order."""
    cols = ["slide", "path", *SOURCE_COLUMNS, "class", *(f"p_{c}" for c in classes), "tiles"]
    return [*cols, "seconds", "status", "read", "flops", *(["escalated"] if cascade else [])]


#: The columns of ``slides.parquet`` naming a slide's source (as the shard manifest's do).
SOURCE_COLUMNS = ("slide_uri", "slide_size", "slide_sha256")


def source_columns(source: SlideIdentity | None) -> dict[str, Any]:
    """``slide_uri, slide_size, slide_sha256`` of a slide (null when unknown)."""
    if source is None:
        return dict.fromkeys(SOURCE_COLUMNS)
    size = source.size if source.size >= 0 else None
    return dict(zip(SOURCE_COLUMNS, (source.uri, size, source.sha256), strict=True))


def slide_row(doc: Mapping[str, Any], classes: Sequence[str], cascade: bool) -> dict[str, Any]:
    """A ``slides.parquet`` row of a slide's record."""
    row: dict[str, Any] = {
        "slide": doc["slide_id"], "path": doc["slide"], **source_columns(record_identity(doc)),
        "class": doc["class"],
        **{f"p_{c}": doc["probabilities"][c] for c in classes},
        "tiles": doc["n_tiles"], "seconds": doc["seconds"], "status": "ok", "read": doc["read"],
        "flops": doc["flops"],
    }  # fmt: skip
    if cascade:
        row["escalated"] = doc["escalated"] / max(1, doc["n_tiles"])
    return row


def merge(
    store: Storage,
    order: Sequence[str],
    records: Mapping[str, Mapping[str, Any]],
    failures: Mapping[str, tuple[str, str]],
    *,
    classes: Sequence[str],
    read: str,
    cascade: bool,
    sources: Mapping[str, SlideIdentity] | None = None,
) -> None:
    """Write ``slides.parquet`` and ``tiles.parquet`` for the slides ``order`` (module docstring):
    ``records`` of the done ones, ``failures`` ``{slide: (path, message)}`` of the others, whose
    source columns come from ``sources`` (by slide id) where known."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for sid in order:
        if sid in records:
            rows.append(slide_row(records[sid], classes, cascade))
        elif sid in failures:
            path, message = failures[sid]
            row = dict.fromkeys(slide_columns(classes, cascade))
            row.update(slide=sid, path=path, tiles=0, status=message, read=read)
            row.update(source_columns((sources or {}).get(sid)))
            rows.append(row)
    if rows:
        columns = slide_columns(classes, cascade)
        table = pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows])
        store.write_bytes(SLIDES, _parquet(table))
    parts = [
        pq.read_table(io.BytesIO(store.read_bytes(f"{PARTS}/{sid}.tiles.parquet")))
        for sid in order
        if sid in records
    ]
    if parts:
        store.write_bytes(TILES, _parquet(pa.concat_tables(parts, promote_options="default")))
