"""Cached teacher targets on storage: layout, identity and the read side (no torch).

Written by :func:`resdistill.train.targets.write_targets`; read by the cached-target stream of
distillation. Layout at the targets root (default ``<data>/_targets/<first 16 hex of the
teacher's sha256>``)::

    targets.json                       teacher identity, dataset identity, sizes, shard list
    <split>/shard-NNNNNN.npz           one per dataset shard: keys, logits, feat_<mag> (float16)

``targets.json`` records the teacher checkpoint (URL and sha256 of its ``model.pt``), the
dataset (URL and sha256 of ``manifest.parquet``) and the sha256 of every shard's ``.npz``:
distillation with ``--targets`` recomputes the first two and refuses targets of another teacher
or of a re-sharded dataset, and checks each ``.npz`` against its recorded sha256 as it reads it
(:meth:`TargetsIndex.read_shard`), so arrays rewritten since (by a rerun with another teacher
into the same root) are refused too: :class:`StaleTargetsError`, one line. A (re)write removes
``targets.json`` first and writes it last, so a killed run leaves no usable target set, never
an old index over new arrays. Which augmentations cached targets allow, and why: see
:mod:`resdistill.train.targets`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resdistill.data.errors import ShardError
from resdistill.data.info import Dataset

TARGETS_JSON = "targets.json"
#: 2: every shard's entry records its ``.npz``'s sha256 (version 1 sets are refused: rewrite)
FORMAT_VERSION = 2
KIND = "resdistill-teacher-targets"
TARGETS_DIR = "_targets"
#: Resize mode the stored feature maps were pooled with (the paper's default).
TARGET_RESIZE = "maxpool"


class StaleTargetsError(ShardError):
    """Targets that belong to another teacher checkpoint or another version of the dataset, or
    an ``.npz`` whose bytes are not the ones ``targets.json`` records (one line). A
    :class:`ShardError` (so a ``ValueError``), so that met by a training worker it ends the run
    with its one line, as an unreadable shard does."""

    def __init__(self, message: str) -> None:
        # a DataLoader worker's error comes back as "Caught ...\nOriginal Traceback ...": its
        # last line holds ours
        text, name = str(message), f"{type(self).__name__}: "
        if "\n" in text and name in text:
            text = [ln for ln in text.splitlines() if name in ln][-1].split(name, 1)[1]
        super().__init__(text)


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
    from resdistill.checkpoint import MODEL_FILE

    return sha256_of(checkpoint, MODEL_FILE)


def default_targets_url(data: str, teacher_sha: str) -> str:
    """``<data>/_targets/<first 16 hex digits of the teacher's sha256>``."""
    from sharding.storage import open_storage

    return open_storage(data).child_url(f"{TARGETS_DIR}/{teacher_sha[:16]}")


def npz_name(shard_rel: str) -> str:
    """``train/shard-000003.tar`` -> ``train/shard-000003.npz``."""
    stem = shard_rel[: -len(".tar")] if shard_rel.endswith(".tar") else shard_rel
    return f"{stem}.npz"


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
                "`resdistill teacher-targets --data ... --teacher ...`"
            ) from None
        if doc.get("kind") != KIND or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{store.child_url(TARGETS_JSON)}: not a v{FORMAT_VERSION} target set (one "
                "without each array's sha256, or not a target set): rerun teacher-targets"
            )
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
        """The arrays of one shard: ``keys`` (str), ``logits`` (N, K) and ``feat_<mag>``
        (float16), once their bytes match the sha256 ``targets.json`` records for them
        (:class:`StaleTargetsError` naming the file otherwise)."""
        import numpy as np

        from sharding.storage import open_storage

        entry = self.doc["shards"].get(shard_rel)
        if entry is None:
            raise StaleTargetsError(f"{self.url}/{TARGETS_JSON}: no targets for {shard_rel}")
        store = open_storage(self.url)
        data = store.read_bytes(entry["file"])
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise StaleTargetsError(
                f"{store.child_url(entry['file'])}: stale targets: its sha256 {digest[:12]} is "
                f"not the {str(entry.get('sha256'))[:12]} {TARGETS_JSON} records (rewritten "
                "since, e.g. by a teacher-targets run of another teacher); rerun teacher-targets"
            )
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def check_for_distill(
    targets_url: str,
    *,
    teacher_checkpoint: str,
    data: str | Dataset,
    train_shards: Sequence[str],
    student_mag: str,
    teacher_mag: str,
) -> dict[str, Any]:
    """Driver-side check of ``distill --targets``: the target set exists, matches the teacher's
    ``model.pt`` and the dataset's manifest, and covers the train shards and the student's
    magnification. ``data`` is the dataset's URL or its opened :class:`Dataset` (whose manifest
    was already read). Returns the config section ``{"url", "teacher_sha256", "doc"}``."""
    from resdistill.checkpoint import absolute_url

    dataset = data if isinstance(data, Dataset) else Dataset.open(data)

    index = TargetsIndex.load(absolute_url(targets_url))
    index.verify(
        teacher_sha=teacher_sha256(teacher_checkpoint),
        manifest_sha=dataset.manifest_sha256,
        shards=list(train_shards),
        student_mag=student_mag,
        teacher_mag=teacher_mag,
    )
    return {"url": index.url, "teacher_sha256": index.teacher_sha, "doc": dict(index.doc)}
