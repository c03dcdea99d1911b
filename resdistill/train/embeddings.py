"""Cached embeddings of a frozen backbone: computed once per dataset, read by every head fit.

``teacher --arch timm:... --weights FILE --freeze-backbone`` learns only a head on the
backbone's pooled embedding ``e = backbone(x)`` (:class:`resdistill.backbones.timm_net.
TimmClassifier.embed`, the input geometry included). ``e`` of every labelled tile of the splits a
run reads is computed once, un-augmented, and stored; fitting or tuning a head then reads the
stored vectors and never runs the backbone (:mod:`resdistill.train.head`).

Layout, under ``<data>/_embeddings/<first 16 hex of the key>``::

    embeddings.json                    identity (below), dimension, one entry per shard
    <split>/shard-NNNNNN.npz           keys (str), labels (int64), emb (N, D) float16

The **key** is the sha256 of the identity: the backbone (timm name and arguments, the weights
file's sha256, input edge, its normalisation), the dataset (its manifest's sha256, the
magnification, tile size, its normalisation at that magnification, the stain reference). The
same backbone on the same tiles finds the same cache, whatever run, head or split asks; any
change makes another key, another folder. Integrity as for cached teacher targets
(:mod:`resdistill.data.targets`): every ``.npz``'s sha256 is recorded and checked when read
(:class:`~resdistill.data.targets.StaleTargetsError` otherwise); ``embeddings.json`` is written
last, atomically, holding the earlier entries plus the new ones, under the lease of the cache
folder (:mod:`resdistill.train.run_lease`), so a killed run leaves the previous index valid and
a concurrent one is refused in one line. A later run with more splits computes only the shards
the index lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from resdistill.config import TrainConfig
from resdistill.data.targets import StaleTargetsError, npz_name
from resdistill.train.batching import batched

INDEX = "embeddings.json"
KIND = "resdistill-embeddings"
FORMAT_VERSION = 1
EMBEDDINGS_DIR = "_embeddings"


def identity(cfg: TrainConfig, info: Any, manifest_sha: str) -> dict[str, Any]:
    """What the embeddings depend on (module docstring), as plain values."""
    spec = dict(cfg.plan.backbone or {}) if cfg.plan else {}
    mag = cfg.model.mag
    mean, std = info.mean_std(mag)
    return {
        "format_version": FORMAT_VERSION,
        "backbone": {k: spec.get(k) for k in ("arch", "args", "sha256", "input_px", "mean", "std")},
        "dataset": {
            "manifest_sha256": manifest_sha,
            "mag": mag,
            "tile_px": int(info.tile_px.get(mag, 0)),
            "mean": list(mean),
            "std": list(std),
            "stain": cfg.data.stain_reference,
        },  # fmt: skip
    }


def cache_key(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def needed_splits(cfg: TrainConfig) -> list[str]:
    """The splits whose labelled tiles a head fit reads: the training splits and --val-split."""
    return list(dict.fromkeys([*cfg.data.train_splits, cfg.data.val_split]))


def load_index(url: str, key: str) -> dict[str, Any] | None:
    """The index at ``url`` when it is this key's, else None (absent, other key, unreadable)."""
    from sharding.storage import open_storage

    try:
        doc = json.loads(open_storage(url).read_bytes(INDEX))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if doc.get("kind") != KIND or doc.get("key") != key:
        return None
    return doc


def embed_shards(data: str, cfg_doc: Mapping[str, Any], out: str,
                 jobs: Mapping[str, Sequence[str]], device: str, batch_size: int
                 ) -> list[tuple[str, int, str]]:  # fmt: skip
    """Compute and store the embeddings of the labelled ``jobs`` (``{shard rel: keys}``) with
    one backbone load: ``[(shard rel, samples, sha256 of its .npz)]``. A Ray task or a call."""
    import numpy as np

    from resdistill.data import DatasetInfo
    from resdistill.models import build_model
    from sharding.storage import open_storage

    cfg = TrainConfig.from_dict(cfg_doc)
    info = DatasetInfo.load(data)
    mag = cfg.model.mag
    net = build_model(cfg.model.arch, info.num_classes, cfg.plan.backbone, pretrained=True)
    net.set_input_normalization(*info.mean_std(mag))
    net.eval().to(device)
    store = open_storage(out)
    done = []
    for rel, keys in jobs.items():
        arrays = _embed_shard(net, info, rel, keys, mag, cfg.data.stain_reference, device,
                              batch_size)  # fmt: skip
        names = arrays["keys"]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        blob = buf.getvalue()
        store.write_bytes(npz_name(rel), blob)
        done.append((rel, len(names), hashlib.sha256(blob).hexdigest()))
    return done


def _embed_shard(net: Any, info: Any, rel: str, keys: Sequence[str], mag: str, stain: Any,
                 device: str, batch_size: int) -> dict[str, Any]:  # fmt: skip
    """``{"keys", "labels", "emb"}`` of one shard's labelled ``keys`` at ``mag`` (un-augmented,
    normalised as training normalises them, then :meth:`TimmClassifier.embed`)."""
    import numpy as np
    import torch

    from resdistill.data import BatchPrep, TileStream

    stream = TileStream(info, {rel: sorted(keys)}, [mag], repeat=False)
    prep = BatchPrep(stream.norms(), stain=stain, owns=True)
    names: list[str] = []
    labels: list[int] = []
    embs: list[Any] = []
    for batch in batched(stream, batch_size):
        for _images, label, key in batch:
            names.append(key)
            labels.append(int(label))
        x = prep.images([torch.stack([images[0] for images, _, _ in batch]).to(device)])[0]
        with torch.inference_mode():
            embs.append(net.embed(x).float().cpu().to(torch.float16).numpy())
    return {"keys": np.array(names, dtype=np.str_), "labels": np.array(labels, dtype=np.int64),
            "emb": np.concatenate(embs) if embs else np.zeros((0, 0), np.float16)}  # fmt: skip


def _dispatch(cfg: TrainConfig, out: str, todo: Mapping[str, Sequence[str]], device: str,
              log: Callable[[str], None]) -> list[tuple[str, int, str]]:  # fmt: skip
    """:func:`embed_shards` over ``todo``: one Ray task per training worker's share of shards
    (one backbone load each; a GPU each on a GPU run)."""
    import ray

    workers = max(1, min(cfg.run.workers, len(todo)))
    rels = sorted(todo)
    shares = [{r: todo[r] for r in rels[i::workers]} for i in range(workers)]
    opts = {"num_gpus": 1} if device == "cuda" else {"num_cpus": cfg.run.cpus_per_worker}
    task = ray.remote(**opts)(embed_shards)
    doc, batch = cfg.to_dict(), cfg.data.eval_batch
    pending = [task.remote(cfg.data.url, doc, out, s, device, batch) for s in shares]
    results: list[tuple[str, int, str]] = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        got = ray.get(ready[0])
        results += got
        log(f"embeddings: {sum(n for _, n, _ in got)} tiles of {len(got)} shard(s) "
            f"({len(results)}/{len(todo)} shards)")  # fmt: skip
    return results


def ensure_embeddings(cfg: TrainConfig, device: str, log: Callable[[str], None]) -> TrainConfig:
    """The planned frozen-head ``cfg`` with ``plan.embeddings = {"url", "doc"}`` once every
    shard it reads is in the cache (computing the missing ones; module docstring). Needs Ray
    initialised. Logs whether the cache was reused or how much was computed."""
    from resdistill.data import Dataset, shard_keys
    from resdistill.train.run_lease import check_lease, output_lease
    from sharding.storage import open_storage

    assert cfg.plan is not None and cfg.plan.embeddings is not None
    url, key = cfg.plan.embeddings["url"], cfg.plan.embeddings["key"]
    dataset = Dataset.open(cfg.data.url)
    wanted = shard_keys(dataset.manifest(), needed_splits(cfg), labelled_only=True)
    with output_lease(url, "resdistill embeddings", log) as lease:
        doc = load_index(url, key) or {"kind": KIND, "key": key, "shards": {}, "seconds": 0.0,
                                       "identity": cfg.plan.embeddings["identity"]}  # fmt: skip
        todo = {rel: keys for rel, keys in wanted.items() if rel not in doc["shards"]}
        if not todo:
            log(f"embeddings: reusing {url} ({sum(len(k) for k in wanted.values())} tiles, the "
                "backbone is not run)")  # fmt: skip
        else:
            t0 = time.perf_counter()
            for rel, n, sha in _dispatch(cfg, url, todo, device, log):
                doc["shards"][rel] = {"file": npz_name(rel), "samples": n, "sha256": sha}
            doc["seconds"] = round(float(doc["seconds"]) + time.perf_counter() - t0, 3)
            check_lease(lease)
            open_storage(url).write_bytes(INDEX, json.dumps(doc, indent=1).encode())
    plan = replace(cfg.plan, embeddings={**cfg.plan.embeddings, "doc": doc})
    return replace(cfg, plan=plan)


def read_embeddings(url: str, doc: Mapping[str, Any], rels: Sequence[str]) -> dict[str, Any]:
    """``{"keys", "labels", "emb" (float32)}`` of the shards ``rels``, concatenated, each
    ``.npz`` checked against its recorded sha256 (:class:`StaleTargetsError`, one line)."""
    import numpy as np

    from sharding.storage import open_storage

    store = open_storage(url)
    keys, labels, embs = [], [], []
    for rel in rels:
        entry = doc["shards"].get(rel)
        if entry is None:
            raise StaleTargetsError(f"{url}/{INDEX}: no embeddings for {rel}")
        blob = store.read_bytes(entry["file"])
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise StaleTargetsError(f"{store.child_url(entry['file'])}: its sha256 is not the "
                                    f"one {INDEX} records: rerun to recompute it")  # fmt: skip
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if len(z["keys"]):
                keys += [str(k) for k in z["keys"]]
                labels.append(z["labels"])
                embs.append(z["emb"].astype(np.float32))
    if not embs:
        return {"keys": [], "labels": np.zeros(0, np.int64), "emb": np.zeros((0, 0), np.float32)}
    return {"keys": keys, "labels": np.concatenate(labels), "emb": np.concatenate(embs)}
