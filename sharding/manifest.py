"""manifest.parquet and dataset.json: built from the index fragments of published shards.

Normalisation in dataset.json is computed per magnification over the samples of the training
data only, the splits of :data:`STATS_SPLITS` (``train`` and ``unlabeled``; recorded as
``stats_splits``)::

    mean_c = average over those samples of mean(image_c)
    std_c  = sqrt(average over those samples of mean(image_c ** 2) - mean_c ** 2)

which is the exact pixel mean/std because every image of one magnification has the same number of
pixels. RGB is scaled to [0, 1], as torchvision's ``Normalize`` expects after ``ToDtype``. ``val``
and ``test`` pixels never enter them: a preprocessing statistic fitted on held-out data leaks it
into every model (Kaufman et al. 2012, "Leakage in data mining"). A dataset without training
samples gets no statistics, and readers fall back to their defaults.
"""

from __future__ import annotations

import io
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import ANN_PREFIX, FORMAT_VERSION, SPLITS
from .tissue_mask import DETECTOR

#: The splits dataset.json's normalisation statistics are computed from: the training data.
STATS_SPLITS = ("train", "unlabeled")

#: Column of the index fragments holding each region's class fractions as a map (class -> float);
#: :func:`combine` spreads it into one ``ann_<class>`` column per class of the dataset.
FRACTIONS = "ann"


def manifest_schema(mag_names: list[str], ann_classes: list[str] = ()) -> pa.Schema:
    """Columns of manifest.parquet (see sharding.layout.MANIFEST_COLUMNS) for these mags and
    annotation classes."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("slide", pa.string(), nullable=False),
        pa.field("x", pa.int64(), nullable=False),
        pa.field("y", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_source", pa.string()),
        pa.field("patient", pa.string()),
        pa.field("tissue", pa.float32()),
        pa.field("ink", pa.float32()),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("slide_uri", pa.string()),
        pa.field("slide_size", pa.int64()),
        pa.field("slide_sha256", pa.string()),
    ]
    for name in mag_names:
        fields.append(pa.field(f"mean_{name}", pa.list_(pa.float32(), 3)))
        fields.append(pa.field(f"sqmean_{name}", pa.list_(pa.float32(), 3)))
    fields.extend(pa.field(f"{ANN_PREFIX}{c}", pa.float32()) for c in ann_classes)
    return pa.schema(fields)


def fragment_schema(mag_names: list[str]) -> pa.Schema:
    """Columns of a shard's index fragment: the manifest's, with the fractions as one map."""
    return manifest_schema(mag_names).append(
        pa.field(FRACTIONS, pa.map_(pa.string(), pa.float32()))
    )


def rows_to_parquet(rows: list[dict], mag_names: list[str]) -> bytes:
    """An index fragment from manifest rows (``ann``: a class -> fraction dict, or absent)."""
    return manifest_bytes(pa.Table.from_pylist(rows, schema=fragment_schema(mag_names)))


def manifest_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def combine(fragments: list[pa.Table], mag_names: list[str]) -> pa.Table:
    """One manifest table from fragments, sorted by split, shard and key (stable, diff-friendly).

    Columns a fragment lacks (one written before they existed) are null. The fractions map becomes
    one ``ann_<class>`` column per class found, sorted: a region of an annotated slide gets 0 for
    a class its slide does not have; a region of a slide without annotations gets null.
    """
    schema = fragment_schema(mag_names)
    if not fragments:
        return manifest_schema(mag_names).empty_table()
    table = pa.concat_tables([_conform(f, schema) for f in fragments])
    table = table.sort_by([("split", "ascending"), ("shard", "ascending"), ("key", "ascending")])
    maps = [None if m is None else dict(m) for m in table.column(FRACTIONS).to_pylist()]
    classes = sorted({c for m in maps if m for c in m})
    out = table.drop_columns([FRACTIONS])
    for c in classes:
        values = [None if m is None else m.get(c, 0.0) for m in maps]
        out = out.append_column(f"{ANN_PREFIX}{c}", pa.array(values, pa.float32()))
    return out.cast(manifest_schema(mag_names, classes))


def _conform(fragment: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [
        fragment.column(f.name).cast(f.type)
        if f.name in fragment.column_names
        else pa.nulls(fragment.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def dataset_description(
    table: pa.Table,
    *,
    mags: list[tuple[str, float]],
    tile_px: dict[str, int],
    image_format: str,
    quality: int | None = None,
    low_mags_from: str = "top",
    classes: list[str],
    splits: dict[str, float],
    seed: int,
    min_tissue: float,
    tool: str,
    annotations: dict | None = None,
) -> dict:
    """The content of dataset.json for a manifest table (see the module docstring); ``tissue``
    names the tissue detector and its version; ``quality`` is the JPEG quality the images were
    encoded with and ``low_mags_from`` how lower magnifications were cut (see
    :data:`sharding.options.LOW_MAGS_FROM`; all three part of the read chain a model records;
    a dataset.json without it was cut ``top``); with region annotations, their
    source, settings and digest under ``annotations``."""
    rows = table.select(["split", "label", "slide", "shard"]).to_pylist()
    counts: dict[str, dict] = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        per_class: dict[str, int] = {}
        for r in part:
            if r["label"] is not None:
                per_class[r["label"]] = per_class.get(r["label"], 0) + 1
        counts[split] = {
            "samples": len(part),
            "slides": len({r["slide"] for r in part}),
            "shards": len({r["shard"] for r in part}),
            "per_class": dict(sorted(per_class.items())),
        }
    normalization = {}
    n = table.num_rows
    fit = table.filter(pc.is_in(table.column("split"), pa.array(STATS_SPLITS)))
    for name, _ in mags:
        if fit.num_rows == 0:
            continue
        means = fit.column(f"mean_{name}").combine_chunks().flatten().to_numpy().reshape(-1, 3)
        sq = fit.column(f"sqmean_{name}").combine_chunks().flatten().to_numpy().reshape(-1, 3)
        mean = means.astype("float64").mean(0)
        var = sq.astype("float64").mean(0) - mean**2
        normalization[name] = {
            "mean": [round(float(v), 6) for v in mean],
            "std": [round(math.sqrt(max(float(v), 1e-12)), 6) for v in var],
        }
    desc = {
        "format_version": FORMAT_VERSION,
        "magnifications": [name for name, _ in mags],
        "mpp": {name: mpp for name, mpp in mags},
        "tile_px": tile_px,
        "image_format": image_format,
        "quality": quality,
        "low_mags_from": low_mags_from,
        "classes": classes,
        "counts": counts,
        "samples": n,
        "normalization": normalization,
        "stats_splits": list(STATS_SPLITS),
        "splits": splits,
        "seed": seed,
        "min_tissue": min_tissue,
        "tissue": dict(DETECTOR),
        "tool": tool,
    }
    if annotations is not None:
        desc["annotations"] = annotations
    return desc
