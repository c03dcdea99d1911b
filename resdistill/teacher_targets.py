"""Cached teacher targets: run the frozen teacher once over the shards, distil from the stored
outputs afterwards at the student's cost alone.

``python -m resdistill.teacher_targets --data s3://bucket/ds --teacher s3://bucket/runs/t1/ckpt``
(or ``resdistill teacher-targets ...``) reads every sample of the chosen splits at the teacher's
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

``targets.json`` records the teacher checkpoint (URL and sha256 of its ``model.pt``) and the
dataset (URL and sha256 of ``manifest.parquet``): distillation with ``--targets`` recomputes both
and refuses targets of another teacher or of a re-sharded dataset (:class:`StaleTargetsError`).
``targets.json`` is written last, so a killed run leaves no usable half-written target set.

Distillation with cached targets (``python -m resdistill.distill ... --targets URL``) reads only
the student tile; :class:`resdistill.cached_targets.CachedTargetStream` yields ``(x_s, t_logits, t_features)`` in the
batch's ``images`` slots and :func:`resdistill.distill_worker.cached_distill_batch` computes the
same :class:`resdistill.losses.DistillLoss` as the online path.

Which augmentations are allowed with cached targets, and why. The teacher saw the un-augmented
tile once. The dihedral group D4 (horizontal/vertical flips, 90-degree rotations) only moves
pixels, and ``adaptive_max_pool2d`` to a square size commutes with it (the pooling windows of row
``i`` and of row ``h - 1 - i`` are mirror images: ``floor((h-1-i) H / h) = H - ceil((i+1) H / h)``),
so ``g(pool(f_t)) == pool(g(f_t))``: flipping/rotating the stored pooled map together with the
student tile (:class:`resdistill.cached_targets.GeometricAugment`, one draw for both) keeps every
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

import argparse
import hashlib
import io
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TARGETS_JSON = "targets.json"
FORMAT_VERSION = 1
KIND = "resdistill-teacher-targets"
TARGETS_DIR = "_targets"
#: Resize mode the stored feature maps were pooled with (the paper's default).
TARGET_RESIZE = "maxpool"


class StaleTargetsError(ValueError):
    """Targets that belong to another teacher checkpoint or another version of the dataset."""


# --------------------------------------------------------------------------------------------------
# Identity and layout
# --------------------------------------------------------------------------------------------------


def sha256_of(url: str, rel: str) -> str:
    """Hex sha256 of the object ``rel`` under storage root ``url`` (local folder or ``s3://``)."""
    from sharding.storage import open_storage

    store = open_storage(url)
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.child_url(rel)}: not found") from None
    return hashlib.sha256(data).hexdigest()


def teacher_sha256(checkpoint: str) -> str:
    """sha256 of ``<checkpoint>/model.pt``: the teacher's identity."""
    from resdistill.train_loop import MODEL_FILE

    return sha256_of(checkpoint, MODEL_FILE)


def manifest_sha256(data: str) -> str:
    """sha256 of ``<data>/manifest.parquet``: the dataset version's identity."""
    from sharding.layout import MANIFEST

    return sha256_of(data, MANIFEST)


def default_targets_url(data: str, teacher_sha: str) -> str:
    """``<data>/_targets/<first 16 hex digits of the teacher's sha256>``."""
    from sharding.storage import open_storage

    return open_storage(data).child_url(f"{TARGETS_DIR}/{teacher_sha[:16]}")


def npz_name(shard_rel: str) -> str:
    """``train/shard-000003.tar`` -> ``train/shard-000003.npz``."""
    stem = shard_rel[: -len(".tar")] if shard_rel.endswith(".tar") else shard_rel
    return f"{stem}.npz"


def feature_size(arch: str, tile_px: int) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of ``arch``'s last feature map on a ``tile_px`` square tile (the
    same for every supported ResNet: five stride-2 stages, rounded up)."""
    import torch

    from resdistill.models import build_model

    net = build_model(arch, 2).eval()
    with torch.inference_mode():
        f = net.features(torch.zeros(1, 3, tile_px, tile_px))
    return int(f.shape[-2]), int(f.shape[-1])


@dataclass(frozen=True)
class TargetsIndex:
    """A parsed ``targets.json`` and the URL of its root."""

    url: str
    doc: Mapping[str, Any]

    @classmethod
    def load(cls, url: str) -> TargetsIndex:
        """Read ``<url>/targets.json`` (FileNotFoundError / ValueError with one line)."""
        from sharding.storage import open_storage

        store = open_storage(url)
        try:
            doc = json.loads(store.read_bytes(TARGETS_JSON))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{store.child_url(TARGETS_JSON)}: not found; write targets with "
                "`python -m resdistill.teacher_targets --data ... --teacher ...`"
            ) from None
        if doc.get("kind") != KIND or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{store.child_url(TARGETS_JSON)}: not a v{FORMAT_VERSION} target set")
        return cls(store.url, doc)

    @property
    def teacher_sha(self) -> str:
        return str(self.doc["teacher"]["sha256"])

    @property
    def teacher_mag(self) -> str:
        return str(self.doc["teacher_mag"])

    @property
    def sizes(self) -> dict[str, tuple[int, int]]:
        """``{student mag: (h, w)}`` of the stored feature maps."""
        return {m: (int(s[0]), int(s[1])) for m, s in self.doc["sizes"].items()}

    @property
    def shards(self) -> dict[str, Mapping[str, Any]]:
        """``{dataset shard rel: {"file": npz rel, "samples": n}}``."""
        return dict(self.doc["shards"])

    def verify(
        self,
        *,
        teacher_sha: str | None = None,
        manifest_sha: str | None = None,
        shards: Sequence[str] = (),
        student_mag: str | None = None,
        teacher_mag: str | None = None,
    ) -> None:
        """Refuse (:class:`StaleTargetsError`, one line) targets of another teacher or dataset
        version, or ones lacking a shard, the student's magnification or the teacher's."""
        where = f"{self.url}/{TARGETS_JSON}"
        if teacher_sha is not None and teacher_sha != self.teacher_sha:
            raise StaleTargetsError(
                f"{where}: stale targets: written for teacher {self.doc['teacher']['checkpoint']} "
                f"(model.pt sha256 {self.teacher_sha[:12]}), this teacher's is {teacher_sha[:12]}; "
                "rerun teacher-targets"
            )
        if manifest_sha is not None and manifest_sha != self.doc["dataset"]["manifest_sha256"]:
            raise StaleTargetsError(
                f"{where}: stale targets: the dataset's manifest.parquet changed since they were "
                "written; rerun teacher-targets"
            )
        missing = [s for s in shards if s not in self.doc["shards"]]
        if missing:
            raise StaleTargetsError(
                f"{where}: no targets for {len(missing)} shard(s) (e.g. {missing[0]}); rerun "
                "teacher-targets with those splits"
            )
        if student_mag is not None and student_mag not in self.doc["sizes"]:
            raise StaleTargetsError(
                f"{where}: no feature maps for student magnification {student_mag} (stored: "
                f"{', '.join(self.doc['sizes']) or 'none'})"
            )
        if teacher_mag is not None and teacher_mag != self.teacher_mag:
            raise StaleTargetsError(
                f"{where}: targets were computed at teacher magnification {self.teacher_mag}, "
                f"not {teacher_mag}"
            )

    def read_shard(self, shard_rel: str) -> dict[str, Any]:
        """The arrays of one shard: ``keys`` (str), ``logits`` (N, K) and ``feat_<mag>`` (float16)."""
        import numpy as np

        from sharding.storage import open_storage

        entry = self.doc["shards"].get(shard_rel)
        if entry is None:
            raise StaleTargetsError(f"{self.url}/{TARGETS_JSON}: no targets for {shard_rel}")
        data = open_storage(self.url).read_bytes(entry["file"])
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------------
# Computing targets
# --------------------------------------------------------------------------------------------------


def compute_shard(
    teacher: Any,
    info: Any,
    shard_rel: str,
    samples: int,
    teacher_mag: str,
    sizes: Mapping[str, tuple[int, int]],
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run ``teacher`` (a :class:`resdistill.distill_worker.FrozenTeacher`) over one shard at
    ``teacher_mag`` without augmentation; the arrays of its ``.npz`` (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from resdistill.data import ShardTask, TileStream

    stream = TileStream(info, [ShardTask(shard_rel, samples)], [teacher_mag], repeat=False)
    keys: list[str] = []
    logits: list[Any] = []
    feats: dict[str, list[Any]] = {m: [] for m in sizes}

    def flush(batch: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            t, f = teacher(torch.stack(batch))
        logits.append(t.float().to(torch.float16).numpy())
        for m, hw in sizes.items():
            pooled = F.adaptive_max_pool2d(f.float(), hw)
            feats[m].append(pooled.to(torch.float16).numpy())

    pending: list[torch.Tensor] = []
    for images, _label, key in stream:
        keys.append(key)
        pending.append(images[0])
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    if len(keys) != samples:
        raise ValueError(
            f"{shard_rel}: read {len(keys)} samples, the manifest lists {samples}: the dataset "
            "changed while targets were computed"
        )
    out: dict[str, Any] = {
        "keys": np.array(keys, dtype=np.str_),
        "logits": np.concatenate(logits) if logits else np.zeros((0, 0), np.float16),
    }
    for m in sizes:
        out[f"feat_{m}"] = np.concatenate(feats[m])
    return out


def _load_frozen(data: str, teacher: str, teacher_mag: str) -> tuple[Any, Any]:
    from resdistill.data import DatasetInfo
    from resdistill.distill_worker import load_teacher, renormalizer
    from resdistill.train_loop import load_checkpoint

    info = DatasetInfo.load(data)
    ckpt = load_checkpoint(teacher)
    renorm = None
    if ckpt.get("normalization"):
        tn = ckpt["normalization"]
        renorm = renormalizer(info.mean_std(teacher_mag), (tn["mean"], tn["std"]))
    return info, load_teacher(teacher, "cpu", renorm)


def _shard_job(
    data: str,
    teacher: str,
    out: str,
    shard_rel: str,
    samples: int,
    teacher_mag: str,
    sizes: Mapping[str, Sequence[int]],
    batch_size: int,
) -> tuple[str, int, float]:
    """Compute and store one shard's targets; ``(shard rel, samples, seconds)``."""
    import numpy as np

    from sharding.storage import open_storage

    t0 = time.perf_counter()
    info, frozen = _load_frozen(data, teacher, teacher_mag)
    arrays = compute_shard(
        frozen,
        info,
        shard_rel,
        samples,
        teacher_mag,
        {m: (int(s[0]), int(s[1])) for m, s in sizes.items()},
        batch_size=batch_size,
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    open_storage(out).write_bytes(npz_name(shard_rel), buf.getvalue())
    return shard_rel, samples, time.perf_counter() - t0


def write_targets(
    data: str,
    teacher: str,
    *,
    out: str | None = None,
    splits: Sequence[str] | None = None,
    student_mags: Sequence[str] | None = None,
    teacher_mag: str | None = None,
    batch_size: int = 64,
    use_ray: bool = True,
    address: str | None = None,
    log: Any = None,
) -> TargetsIndex:
    """Compute and store the teacher targets of ``splits`` (default: every split in the
    manifest) for ``student_mags`` (default: every dataset magnification below the teacher's);
    one Ray task per shard (``use_ray``) or in this process. Returns the written index."""
    from resdistill.data import DatasetInfo, read_manifest, shard_keys
    from resdistill.distill import absolute_url, teacher_meta
    from sharding.magnification import Magnification
    from sharding.storage import open_storage

    data = absolute_url(data)
    teacher = absolute_url(teacher)
    info = DatasetInfo.load(data)
    meta = teacher_meta(teacher, info.classes)
    t_mag = info.resolve_mag(teacher_mag or meta.get("mag") or info.highest)
    t_power = Magnification.parse(t_mag).power
    if student_mags:
        s_mags = [info.resolve_mag(m) for m in student_mags]
    else:
        s_mags = [m for m in info.magnifications if Magnification.parse(m).power < t_power]
    if not s_mags:
        raise ValueError(f"{data}: no magnification below the teacher's {t_mag} to store maps for")
    sizes = {m: feature_size(meta["arch"], int(info.tile_px[m])) for m in s_mags}
    manifest = read_manifest(info.url)
    all_splits = sorted(set(manifest.column("split").to_pylist()))
    chosen = list(splits) if splits else all_splits
    keys = shard_keys(manifest, chosen)
    if not keys:
        raise ValueError(f"{data}: split(s) {', '.join(chosen)} hold no samples")
    t_sha = teacher_sha256(teacher)
    m_sha = manifest_sha256(data)
    out = absolute_url(out) if out else default_targets_url(data, t_sha)
    store = open_storage(out)
    log = log or (lambda _msg: None)
    jobs = [(rel, len(k)) for rel, k in keys.items()]
    t0 = time.perf_counter()
    args = (data, teacher, out)
    tail = (t_mag, {m: list(s) for m, s in sizes.items()}, batch_size)
    if use_ray:
        import ray

        from resdistill.train_loop import ray_init

        ray_init(address)
        remote = ray.remote(num_cpus=1)(_shard_job)
        refs = [remote.remote(*args, rel, n, *tail) for rel, n in jobs]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rel, n, sec = ray.get(ready[0])
            log(f"{rel}: {n} samples in {sec:.1f} s ({len(refs) - len(pending)}/{len(refs)})")
    else:
        for i, (rel, n) in enumerate(jobs):
            _rel, _n, sec = _shard_job(*args, rel, n, *tail)
            log(f"{rel}: {n} samples in {sec:.1f} s ({i + 1}/{len(jobs)})")
    doc = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "teacher": {
            "checkpoint": teacher,
            "sha256": t_sha,
            "arch": meta["arch"],
            "mag": meta.get("mag"),
            "classes": list(meta["classes"]),
            "feature_channels": int(meta["feature_channels"]),
        },
        "dataset": {"url": info.url, "manifest_sha256": m_sha},
        "teacher_mag": t_mag,
        "feature_resize": TARGET_RESIZE,
        "sizes": {m: list(s) for m, s in sizes.items()},
        "dtype": "float16",
        "splits": chosen,
        "shards": {rel: {"file": npz_name(rel), "samples": n} for rel, n in jobs},
        "samples": sum(n for _, n in jobs),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.write_bytes(TARGETS_JSON, json.dumps(doc, indent=1).encode())
    return TargetsIndex(store.url, doc)


# --------------------------------------------------------------------------------------------------
# Distillation side (driver check; the stream is in resdistill.cached_targets)
# --------------------------------------------------------------------------------------------------


def check_for_distill(
    targets_url: str,
    *,
    teacher_checkpoint: str,
    data: str,
    train_shards: Sequence[str],
    student_mag: str,
    teacher_mag: str,
) -> dict[str, Any]:
    """Driver-side check of ``distill --targets``: the target set exists, matches the teacher's
    ``model.pt`` and the dataset's manifest, and covers the train shards and the student's
    magnification. Returns the config section ``{"url", "teacher_sha256", "sizes"}``."""
    from resdistill.distill import absolute_url

    index = TargetsIndex.load(absolute_url(targets_url))
    index.verify(
        teacher_sha=teacher_sha256(teacher_checkpoint),
        manifest_sha=manifest_sha256(data),
        shards=list(train_shards),
        student_mag=student_mag,
        teacher_mag=teacher_mag,
    )
    return {"url": index.url, "teacher_sha256": index.teacher_sha, "doc": dict(index.doc)}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``resdistill teacher-targets``."""
    parser.add_argument(
        "--data", required=True, help="dataset root: a folder or s3://bucket/prefix"
    )
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (local or s3)")
    parser.add_argument(
        "--out", default=None, help="targets root (default: <data>/_targets/<teacher sha256[:16]>)"
    )
    parser.add_argument("--splits", default=None, help="comma list (default: every split)")
    parser.add_argument(
        "--student-mags",
        default=None,
        help="comma list of student magnifications to pool maps for (default: all below the "
        "teacher's)",
    )
    parser.add_argument("--teacher-mag", default=None, help="default: the teacher's own")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Compute the targets; print where they are. 0 ok, 2 unusable input."""
    from resdistill.distill import UsageError

    def split(text: str | None) -> list[str] | None:
        return [s.strip() for s in text.split(",") if s.strip()] if text else None

    try:
        index = write_targets(
            args.data,
            args.teacher,
            out=args.out,
            splits=split(args.splits),
            student_mags=split(args.student_mags),
            teacher_mag=args.teacher_mag,
            batch_size=args.batch_size,
            use_ray=not args.local,
            address=args.address,
            log=print,
        )
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"teacher-targets: error: {exc}", file=sys.stderr)
        return 2
    d = index.doc
    print(
        f"{d['samples']} samples in {len(d['shards'])} shards, teacher {d['teacher']['arch']} at "
        f"{d['teacher_mag']}, maps for {', '.join(d['sizes'])}, {d['seconds']:.1f} s -> {index.url}"
    )
    print(f"distill with: --teacher {d['teacher']['checkpoint']} --targets {index.url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher_targets``."""
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.teacher_targets",
        description="Run the frozen teacher once over the shards and store its targets.",
    )
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
