"""Cached teacher targets: run the frozen teacher once over the shards, distil from the stored
outputs afterwards at the student's cost alone.

``resdistill teacher-targets --data s3://bucket/ds --teacher s3://bucket/runs/t1/ckpt``
(or ``python -m resdistill.teacher_targets ...``) reads every sample of the chosen splits at the teacher's
magnification, un-augmented, and stores per sample key

* ``logits``: the teacher's logits ``t = teacher(x_t)``, shape ``(K,)``;
* ``feat_<mag>``: for every student magnification ``mag``, the teacher's last feature map pooled
  to the student's feature size at ``mag``: ``adaptive_max_pool2d(f_t, (h_mag, w_mag))``, shape
  ``(C, h_mag, w_mag)`` - exactly what :class:`resdistill.losses.FeatureLoss` computes online
  with ``feature_resize="maxpool"``,

both in float16, one ``.npz`` per shard (arrays ``keys``, ``logits``, ``feat_<mag>``). Layout at the
targets root (default ``<data>/_targets/<first 16 hex of the teacher's sha256>``)::

    targets.json                       teacher identity, dataset identity, sizes, shard list
    <split>/shard-NNNNNN.npz           one per dataset shard, same relative name

``targets.json`` records the teacher checkpoint (URL and sha256 of its ``model.pt``), the
dataset (URL and sha256 of ``manifest.parquet``) and each ``.npz``'s sha256: distillation with
``--targets`` recomputes the first two and refuses targets of another teacher or of a re-sharded
dataset, and checks every ``.npz`` as it reads it (:class:`StaleTargetsError`). A run holds the
lease on its targets root (:mod:`resdistill.train.run_lease`: a second run there is refused),
removes ``targets.json`` before it writes anything and writes it last, so a killed run leaves no
usable target set, never an index over another teacher's arrays.

Distillation with cached targets (``python -m resdistill.distill ... --targets URL``) reads only
the student tile; the cached-target stream yields ``(x_s, t_logits, t_features)`` in the batch's ``images``
slots and :func:`resdistill.train.teacher_net.cached_distill_batch` computes the same :class:`resdistill.losses.DistillLoss` as the online path.

Which augmentations are allowed with cached targets, and why. The teacher saw the un-augmented
tile once. The dihedral group D4 (horizontal/vertical flips, 90-degree rotations) only moves
pixels, and ``adaptive_max_pool2d`` to a square size commutes with it (the pooling windows of row
``i`` and of row ``h - 1 - i`` are mirror images: ``floor((h-1-i) H / h) = H - ceil((i+1) H / h)``),
so ``g(pool(f_t)) == pool(g(f_t))``: flipping/rotating the stored pooled map together with the
student tile (``GeometricAugment``, one draw for both) keeps every
student cell paired with the teacher cells of the same tissue, exactly. Allowed: flips and
rotations (``--no-flips`` to disable). What differs from online distillation with an augmented
teacher input is only that the teacher is not re-run on the flipped tile (a CNN is not exactly
flip-equivariant): the target is ``g(f_t(x))`` rather than ``f_t(g(x))``, and the logits are
those of the upright tile. NOT allowed: colour jitter - the stored outputs belong to the
un-jittered tile, and a jittered student input would be paired with a target the teacher never
produced for it; ``distill --targets`` refuses an explicit non-zero ``--jitter`` and turns the
default jitter off with a note. Also refused: ``--feature-resize bicubic`` (the maps are stored
max-pooled), another ``--teacher-mag`` than the stored one, and ``--supervised``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from resdistill.data.targets import (
    FORMAT_VERSION,
    KIND,
    TARGET_RESIZE,
    TARGETS_JSON,
    TargetsIndex,
    default_targets_url,
    npz_name,
    teacher_sha256,
)
from resdistill.train.batching import batched
from resdistill.train.targets_config import TargetsConfig


def feature_size(arch: str, tile_px: int) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of a student's last feature map on a ``tile_px`` square tile, for
    a student of ``arch`` (the same for every supported ResNet: five stride-2 stages, rounded
    up). A timm teacher's student is a ResNet (its default), so its size is a ResNet's."""
    import torch

    from resdistill.models import DEFAULT_ARCH, build_model

    net = build_model(DEFAULT_ARCH if arch.startswith("timm:") else arch, 2).eval()
    with torch.inference_mode():
        f = net.features(torch.zeros(1, 3, tile_px, tile_px))
    return int(f.shape[-2]), int(f.shape[-1])


def compute_shard(
    teacher: Any,
    info: Any,
    shard_rel: str,
    keys: Sequence[str],
    teacher_mag: str,
    sizes: Mapping[str, tuple[int, int]],
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run ``teacher`` (a :class:`resdistill.train.teacher_net.FrozenTeacher`) over the samples
    ``keys`` of one shard (all the manifest lists for it) at ``teacher_mag`` without
    augmentation; the arrays of its ``.npz`` (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from resdistill.data import BatchPrep, TileStream

    stream = TileStream(info, {shard_rel: sorted(keys)}, [teacher_mag], repeat=False)
    prep = BatchPrep(stream.norms(), owns=True)  # each stacked batch is new: no copy needed
    read: list[str] = []
    logits: list[Any] = []
    feats: dict[str, list[Any]] = {m: [] for m in sizes}

    for batch in batched(stream, batch_size):
        read.extend(key for _, _, key in batch)
        with torch.inference_mode():
            t, f = teacher(prep.images([torch.stack([images[0] for images, _, _ in batch])])[0])
        logits.append(t.float().to(torch.float16).numpy())
        for m, hw in sizes.items():
            pooled = F.adaptive_max_pool2d(f.float(), hw)
            feats[m].append(pooled.to(torch.float16).numpy())
    if len(read) != len(keys):
        raise ValueError(
            f"{shard_rel}: read {len(read)} samples, the manifest lists {len(keys)}: the dataset "
            "changed while targets were computed"
        )
    out: dict[str, Any] = {
        "keys": np.array(read, dtype=np.str_),
        "logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float16),
    }
    for m in sizes:
        out[f"feat_{m}"] = np.concatenate(feats[m])
    return out


def _load_frozen(data: str, teacher: str, teacher_mag: str) -> tuple[Any, Any]:
    """The dataset's info and the frozen teacher, fed the inputs evaluation gives it."""
    from resdistill.data import DatasetInfo
    from resdistill.train.teacher_net import stream_teacher

    info = DatasetInfo.load(data)
    return info, stream_teacher(teacher, None, info.mean_std(teacher_mag))


def _shard_job(
    data: str,
    teacher: str,
    out: str,
    shard_rel: str,
    keys: Sequence[str],
    teacher_mag: str,
    sizes: Mapping[str, Sequence[int]],
    batch_size: int,
) -> tuple[str, int, float, str]:
    """Compute and store one shard's targets; ``(shard rel, samples, seconds, sha256 of the
    .npz)``."""
    import hashlib

    import numpy as np

    from sharding.storage import open_storage

    t0 = time.perf_counter()
    info, frozen = _load_frozen(data, teacher, teacher_mag)
    arrays = compute_shard(
        frozen,
        info,
        shard_rel,
        keys,
        teacher_mag,
        {m: (int(s[0]), int(s[1])) for m, s in sizes.items()},
        batch_size=batch_size,
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data_npz = buf.getvalue()
    open_storage(out).write_bytes(npz_name(shard_rel), data_npz)
    return shard_rel, len(keys), time.perf_counter() - t0, hashlib.sha256(data_npz).hexdigest()


def _run_jobs(
    args: tuple[str, str, str],
    keys: Mapping[str, Sequence[str]],
    tail: tuple[Any, ...],
    cfg: TargetsConfig,
    log: Any,
) -> dict[str, str]:
    """One :func:`_shard_job` per shard of ``keys``: Ray tasks, or in this process with
    ``cfg.local``; ``{shard rel: sha256 of its .npz}``."""
    done: dict[str, str] = {}

    def report(rel: str, n: int, sec: float, sha: str) -> None:
        done[rel] = sha
        log(f"{rel}: {n} samples in {sec:.1f} s ({len(done)}/{len(keys)})")

    if cfg.local:
        for rel, k in keys.items():
            report(*_shard_job(*args, rel, k, *tail))
        return done
    import ray

    from sharding.ray_cluster import ray_init

    ray_init(cfg.address)
    remote = ray.remote(num_cpus=1)(_shard_job)
    pending = [remote.remote(*args, rel, k, *tail) for rel, k in keys.items()]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        report(*ray.get(ready[0]))
    return done


def write_targets(cfg: TargetsConfig, log: Any = None) -> TargetsIndex:
    """Compute and store the teacher targets of ``cfg.splits`` (default: every split in the
    manifest) for ``cfg.student_mags`` (default: every dataset magnification below the
    teacher's); one Ray task per shard, or in this process with ``cfg.local``. Under the
    root's lease, ``targets.json`` is removed first; the resolved config goes to
    ``<root>/config.yaml`` (with the dataset's fingerprint); ``targets.json``, with each
    ``.npz``'s sha256, is written last. Returns the written index. A root another run holds is
    a one-line :class:`~resdistill.errors.UsageError` before anything is written."""
    from dataclasses import replace

    from resdistill.checkpoint import absolute_url
    from resdistill.data import Dataset, shard_keys
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from resdistill.train.preflight import teacher_ref
    from resdistill.train.run_lease import check_lease, output_lease
    from sharding.magnification import Magnification
    from sharding.storage import open_storage

    data = absolute_url(cfg.data)
    teacher = absolute_url(cfg.teacher)
    splits, student_mags, teacher_mag = cfg.splits, cfg.student_mags, cfg.teacher_mag
    batch_size = cfg.batch_size
    dataset = Dataset.open(data)
    info = dataset.info
    meta = teacher_ref(teacher, info.classes)
    teacher = meta.checkpoint  # the checkpoint folder, whatever named it
    t_mag = info.resolve_mag(teacher_mag or meta.mag or info.highest)
    t_power = Magnification.parse(t_mag).power
    if student_mags:
        s_mags = [info.resolve_mag(m) for m in student_mags]
    else:
        s_mags = [m for m in info.magnifications if Magnification.parse(m).power < t_power]
    if not s_mags:
        raise ValueError(f"{data}: no magnification below the teacher's {t_mag} to store maps for")
    sizes = {m: feature_size(meta.arch, int(info.tile_px[m])) for m in s_mags}
    manifest = dataset.manifest()
    all_splits = sorted(set(manifest.column("split").to_pylist()))
    chosen = list(splits) if splits else all_splits
    keys = shard_keys(manifest, chosen)
    if not keys:
        raise ValueError(f"{data}: split(s) {', '.join(chosen)} hold no samples")
    t_sha = teacher_sha256(teacher)
    m_sha = dataset.manifest_sha256
    out = absolute_url(cfg.out) if cfg.out else default_targets_url(data, t_sha)
    store = open_storage(out)
    log = log or (lambda _msg: None)
    given = replace(cfg, data=data, teacher=absolute_url(cfg.teacher), out=out)
    with output_lease(out, "resdistill teacher-targets", log) as lease:
        store.delete(TARGETS_JSON)  # from here on the root holds no usable target set
        write_run_config(out, "teacher-targets", to_plain(given), dataset=(info.url, info.raw))
        t0 = time.perf_counter()
        tail = (t_mag, {m: list(s) for m, s in sizes.items()}, batch_size)
        sha = _run_jobs((data, teacher, out), keys, tail, cfg, log)
        doc = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "teacher": {
                "checkpoint": teacher,
                "sha256": t_sha,
                "arch": meta.arch,
                "mag": meta.mag,
                "classes": list(meta.classes),
                "feature_channels": int(meta.feature_channels),
            },
            "dataset": {"url": info.url, "manifest_sha256": m_sha},
            "teacher_mag": t_mag,
            "feature_resize": TARGET_RESIZE,
            "sizes": {m: list(s) for m, s in sizes.items()},
            "dtype": "float16",
            "splits": chosen,
            "shards": {
                rel: {"file": npz_name(rel), "samples": len(k), "sha256": sha[rel]}
                for rel, k in keys.items()
            },
            "samples": sum(len(k) for k in keys.values()),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        check_lease(lease)
        store.write_bytes(TARGETS_JSON, json.dumps(doc, indent=1).encode())
    return TargetsIndex(store.url, doc)
