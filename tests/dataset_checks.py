"""Read a written dataset back, through webdataset, and check every contract of sharding.layout."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sharding.layout import DATASET_JSON, MANIFEST, SPLITS, image_member, sample_key
from sharding.storage import open_storage, register_webdataset_s3

#: Largest mean absolute difference (0-255) allowed between a stored low-magnification tile and
#: the stored high one reduced by the test: only JPEG error separates them (a neighbouring
#: region differs by tens of levels on these noisy test slides).
MAX_MEAN_ABS_DIFF = 8.0


def read_samples(url: str, shards: list[str]) -> list[dict]:
    import webdataset as wds

    register_webdataset_s3()
    store = open_storage(url)
    urls = [store.child_url(s) for s in shards]
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append(sample)
    return out


def verify_dataset(url: str, check_pixels: bool = True) -> dict:
    """Check the dataset at ``url`` end to end; returns a small report for further assertions."""
    store = open_storage(url)
    desc = json.loads(store.read_bytes(DATASET_JSON))
    table = pq.read_table(io.BytesIO(store.read_bytes(MANIFEST)))
    rows = table.to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate keys in the manifest"
    shards = sorted({r["shard"] for r in rows})
    on_storage = sorted(n for n in store.list() if n.endswith(".tar") and n.split("/")[0] in SPLITS)
    assert on_storage == shards, "shards on storage and in the manifest differ"

    samples = read_samples(url, shards)
    seen = Counter(s["__key__"] for s in samples)
    assert not [k for k, n in seen.items() if n > 1], "a key appears twice in the shards"
    assert set(seen) == set(keys), "shards and manifest hold different samples"
    by_key = {r["key"]: r for r in rows}
    mags, sizes, fmt = desc["magnifications"], desc["tile_px"], desc["image_format"]
    top = mags[0]
    diffs = []
    for s in samples:
        row = by_key[s["__key__"]]
        assert s["__url__"].endswith(row["shard"]), "sample sits in another shard than listed"
        meta = json.loads(s["json"])
        assert s["__key__"] == sample_key(meta["slide"], meta["x"], meta["y"])
        assert (meta["slide"], meta["x"], meta["y"], meta["split"], meta["label"]) == (
            row["slide"],
            row["x"],
            row["y"],
            row["split"],
            row["label"],
        )
        assert meta["label_source"] == row["label_source"]
        if meta["label_source"] == "annotation":
            # annotations may leave regions of a labelled slide unlabelled, never label others
            assert meta["label"] is None or meta["split"] != "unlabeled"
        else:
            # a labelled slide never lands in `unlabeled`; an unlabelled one leaves it only to
            # follow its patient into that patient's split
            assert meta["label"] is None or meta["split"] != "unlabeled"
            assert meta["label"] is not None or meta["split"] == "unlabeled" or row["patient"]
            assert meta["label_source"] == (None if meta["label"] is None else "slide")
        assert set(meta["mpp"]) == set(mags)
        images = {}
        for mag in mags:
            data = s[image_member(mag, fmt)]
            img = Image.open(io.BytesIO(data))
            assert img.size == (sizes[mag], sizes[mag]) and img.mode == "RGB"
            images[mag] = np.asarray(img, dtype=np.float32)
            # Each image covers the same region: mpp * px is the region's extent for every mag.
            assert (
                abs(meta["mpp"][mag] * sizes[mag] - meta["mpp"][top] * sizes[top])
                < 1e-3 * meta["mpp"][top] * sizes[top]
            )
        if check_pixels:
            hi = Image.fromarray(images[top].astype(np.uint8))
            for mag in mags[1:]:
                reduced = np.asarray(hi.reduce(sizes[top] // sizes[mag]), dtype=np.float32)
                diffs.append(float(np.abs(reduced - images[mag]).mean()))
    if diffs:
        assert max(diffs) < MAX_MEAN_ABS_DIFF, (
            f"low-magnification tile is not the reduced high one ({max(diffs):.2f})"
        )
    slides_in = {}
    for r in rows:
        slides_in.setdefault(r["slide"], set()).add(r["split"])
    assert all(len(v) == 1 for v in slides_in.values()), "a slide contributes to two splits"
    patients_in: dict[str, set] = {}
    for r in rows:
        if r["patient"]:
            patients_in.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(v) == 1 for v in patients_in.values()), "a patient contributes to two splits"
    total = sum(c["samples"] for c in desc["counts"].values())
    assert total == len(rows) == desc["samples"]
    return {
        "desc": desc,
        "rows": rows,
        "samples": len(samples),
        "slides": slides_in,
        "max_diff": max(diffs, default=0.0),
    }
