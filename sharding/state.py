"""The resume bookkeeping of a sharding run under ``<out>/_state`` and in local scratch.

``_state/config.json`` holds the settings a resumed run must share, written with the first slide's
plan (an output whose slides were all missing or unreadable holds nothing);
``_state/slides/<id>.json`` a slide's plan (split, label, annotation file, expected sample count)
and identity (uri, size, mtime or ETag, fingerprint: :mod:`sharding.slide_identity`), which a
resumed run matches before it reuses the id; ``_state/index/...`` one
parquet fragment per published shard (see :mod:`sharding.shardwriter`). A slide is finished when
its published samples number its planned regions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .extract import SlidePlan
from .layout import DATASET_JSON, MANIFEST, SHARD_PREFIX, SPLITS, STATE_DIR
from .lease import LEASE_PREFIX
from .manifest import read_parquet_bytes
from .options import AnnotationOptions, ShardOptions
from .shardwriter import fragment_name
from .storage import Storage

CONFIG = f"{STATE_DIR}/config.json"
#: Local scratch folders are named ``<prefix><pid>-<random>`` so a later run can tell which ones a
#: killed run left behind.
SCRATCH_PREFIX = "resdistill-shard-"


def resume_identity(
    opts: ShardOptions,
    splits: tuple[float, float, float],
    seed: int,
    annotations: AnnotationOptions | None,
) -> dict:
    """The settings a resumed run must share with the run that began the output: how regions are
    cut and encoded, ``--mpp`` (the base of every slide that records none), splits, seed and the
    annotation options."""
    config = {**opts.identity(), "mpp": opts.mpp_override, "splits": list(splits), "seed": seed}
    if annotations is not None:
        config["annotations"] = annotations.identity()
    return config


def settings_differ(previous: dict | None, config: dict) -> list[str]:
    """Names of the settings that differ from those recorded; a setting an older output did not
    record counts as unset (None)."""
    if previous is None:
        return []
    return sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))


def read_json(store: Storage, rel: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None


def slide_record(store: Storage, slide: str) -> dict | None:
    """The record an earlier run wrote when it planned ``slide``, if any."""
    return read_json(store, f"{STATE_DIR}/slides/{slide}.json")


def reconcile(store: Storage) -> tuple[dict[str, list], dict[str, int]]:
    """Delete half-published shards / stray fragments; return fragments by split and next index.

    Returns ``(tables, next_index)`` where ``tables[split]`` are the fragment tables of published
    shards and ``next_index[split]`` the first unused shard number.
    """
    names = store.list()
    shards = {n for n in names if n.endswith(".tar") and n.split("/")[0] in SPLITS}
    frags = {n for n in names if n.startswith(f"{STATE_DIR}/index/") and n.endswith(".parquet")}
    tables: dict[str, list] = {s: [] for s in SPLITS}
    next_index = {s: 0 for s in SPLITS}
    for shard in sorted(shards):
        split = shard.split("/")[0]
        try:
            number = int(Path(shard).stem.rsplit("-", 1)[1])
            next_index[split] = max(next_index[split], number + 1)
        except (IndexError, ValueError):
            continue
        if fragment_name(shard) not in frags:
            store.delete(shard)  # interrupted publish: its samples are redone
    for frag in sorted(frags):
        shard = frag[len(f"{STATE_DIR}/index/") : -len(".parquet")] + ".tar"
        if shard not in shards:
            store.delete(frag)
            continue
        tables[shard.split("/")[0]].append(read_parquet_bytes(store.read_bytes(frag)))
    return tables, next_index


def published_keys(tables: dict[str, list]) -> dict[str, set[str]]:
    """Slide id -> keys of its published samples, from :func:`reconcile`'s fragment tables."""
    out: dict[str, set[str]] = {}
    for split_tables in tables.values():
        for t in split_tables:
            for sid, key in zip(
                t.column("slide").to_pylist(), t.column("key").to_pylist(), strict=True
            ):
                out.setdefault(sid, set()).add(key)
    return out


def clear_output(store: Storage) -> None:
    """--overwrite: remove what an earlier run wrote here (and nothing else; the lease stays)."""
    for name in store.list():
        top = name.split("/")[0]
        if name.startswith(LEASE_PREFIX):
            continue
        if (
            name in (DATASET_JSON, MANIFEST)
            or top == STATE_DIR
            or (
                top in SPLITS
                and Path(name).name.startswith(SHARD_PREFIX + "-")
                and name.endswith(".tar")
            )
        ):
            store.delete(name)


def record_plan(store: Storage, plan: SlidePlan) -> None:
    """Write the slide's record: what a resumed run checks and how many samples finish it."""
    job = plan.job
    ref = job.annotation
    record = {
        "slide": job.slide,
        "path": job.path,
        "split": job.split,
        "label": job.label,
        "patient": job.patient,
        "n_samples": int(plan.xs.size),
        "size0": plan.size0,
        "base_mpp": plan.base_mpp,
        "mpp_source": plan.mpp_source,
        "width": plan.width,
        "height": plan.height,
    }
    if ref is not None:
        record.update(annotation=ref.name, annotation_sha256=ref.sha256)
    if job.source is not None:
        record.update(job.source.to_record())
    store.write_bytes(f"{STATE_DIR}/slides/{job.slide}.json", json.dumps(record, indent=1).encode())


def make_scratch() -> Path:
    """A fresh local scratch folder for this run, after removing those of dead runs."""
    remove_stale_scratch()
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))


def remove_stale_scratch() -> None:
    """Delete scratch folders of sharding runs whose process is gone (killed mid-shard)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            pid = int(path.name[len(SCRATCH_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's
