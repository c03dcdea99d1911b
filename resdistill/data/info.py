"""What a dataset says about itself: ``dataset.json`` and ``manifest.parquet``.

* :class:`DatasetInfo` - the parts of ``dataset.json`` a reader needs (classes, magnifications,
  tile sizes, per-magnification normalisation), plus the dataset's root URL. Plain values, so it
  travels in a worker config and is rebuilt there with :meth:`DatasetInfo.from_json`.
* :class:`Dataset` - a dataset opened once on the driver: its storage, its :class:`DatasetInfo`
  and its manifest, read on first use and kept (with its sha256), so one run reads each file once
  instead of reopening the URL for every question.
* :func:`read_manifest` - ``manifest.parquet`` of a URL as a pyarrow Table, when no handle is at
  hand.

The manifest is the source of truth for which samples exist and where: readers plan from it,
never by listing a folder.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resdistill.checkpoint import FALLBACK_MEAN, FALLBACK_STD
from sharding.layout import DATASET_JSON, MANIFEST, image_member
from sharding.magnification import Magnification

if TYPE_CHECKING:
    from sharding.storage import Storage

#: Manifest columns a reader plans with (see :func:`resdistill.data.sample_plan.shard_keys`).
READ_COLUMNS = ("key", "slide", "split", "label", "shard")


@dataclass(frozen=True)
class DatasetInfo:
    """The parts of ``dataset.json`` a reader needs, plus the dataset's root URL."""

    url: str
    magnifications: tuple[str, ...]  # names, highest first (e.g. "10x", "2p5x")
    tile_px: Mapping[str, int]
    image_format: str
    classes: tuple[str, ...]
    normalization: Mapping[str, Mapping[str, Sequence[float]]]
    counts: Mapping[str, Any] = field(default_factory=dict)
    mpp: Mapping[str, float] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, url: str, doc: Mapping[str, Any]) -> DatasetInfo:
        """Build from a parsed ``dataset.json`` (ValueError naming the missing field)."""
        try:
            mags = tuple(doc["magnifications"])
            classes = tuple(doc["classes"])
            tile_px = {str(k): int(v) for k, v in doc["tile_px"].items()}
        except KeyError as exc:
            raise ValueError(f"{url}/{DATASET_JSON}: missing field {exc.args[0]!r}") from None
        return cls(
            url=url,
            magnifications=mags,
            tile_px=tile_px,
            image_format=str(doc.get("image_format", "jpeg")),
            classes=classes,
            normalization=dict(doc.get("normalization") or {}),
            counts=dict(doc.get("counts") or {}),
            mpp=dict(doc.get("mpp") or {}),
            raw=dict(doc),
        )

    @classmethod
    def load(cls, url: str | Storage) -> DatasetInfo:
        """Read ``<url>/dataset.json`` (local folder or ``s3://``)."""
        return Dataset.open(url).info

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def highest(self) -> str:
        """Name of the highest magnification (the teacher's default)."""
        return self.magnifications[0]

    def resolve_mag(self, text: str | float | Magnification) -> str:
        """The dataset's name for a magnification given as ``10x``, ``10``, ``2.5x`` or ``2p5x``."""
        name = Magnification.parse(text).name
        if name not in self.magnifications:
            raise ValueError(
                f"magnification {text} is not in {self.url}: it has {', '.join(self.magnifications)}"
            )
        return name

    def member(self, mag: str) -> str:
        """Member extension of ``mag``'s image, e.g. ``10x.jpg``."""
        return image_member(mag, self.image_format)

    def mean_std(self, mag: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel RGB mean and std (of [0, 1] pixels) at ``mag``; without statistics the
        checkpoints' fallback (:func:`resdistill.checkpoint.normalization_of`), so a model trained
        on such a dataset is scored on the inputs it was trained on."""
        stats = self.normalization.get(mag)
        if not stats:
            return FALLBACK_MEAN, FALLBACK_STD
        std = tuple(max(float(s), 1e-3) for s in stats["std"])
        return tuple(float(m) for m in stats["mean"]), std  # type: ignore[return-value]


class Dataset:
    """A dataset opened once: ``store`` (its root), ``info`` (``dataset.json``, read on open) and
    the manifest (read on first use, then kept). Pass it where a URL would be reopened."""

    def __init__(self, store: Storage, info: DatasetInfo) -> None:
        self.store = store
        self.info = info
        self._manifest: bytes | None = None

    @classmethod
    def open(cls, url: str | Storage) -> Dataset:
        """Open ``url`` (local folder, ``s3://`` or a Storage) and read its ``dataset.json``."""
        from sharding.storage import open_storage

        store = open_storage(url)
        try:
            data = store.read_bytes(DATASET_JSON)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{store.child_url(DATASET_JSON)}: not found; is "
                f"{url if isinstance(url, str) else store.url} a dataset written by "
                "`resdistill shard`?"
            ) from None
        return cls(store, DatasetInfo.from_json(store.url, json.loads(data)))

    @property
    def url(self) -> str:
        return self.info.url

    def child_url(self, rel: str) -> str:
        """URL of ``rel`` under the dataset's root."""
        return self.store.child_url(rel)

    def manifest_bytes(self) -> bytes:
        """The raw ``manifest.parquet`` (read once)."""
        if self._manifest is None:
            self._manifest = _read_manifest_bytes(self.store)
        return self._manifest

    def manifest(self, columns: Sequence[str] = READ_COLUMNS) -> Any:
        """The manifest as a pyarrow Table of ``columns``."""
        return _parse_manifest(self.manifest_bytes(), columns)

    @property
    def manifest_sha256(self) -> str:
        """Hex sha256 of ``manifest.parquet``: the identity of this dataset version."""
        return hashlib.sha256(self.manifest_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"Dataset({self.url!r})"


def read_manifest(url: str | Storage, columns: Sequence[str] = READ_COLUMNS) -> Any:
    """``manifest.parquet`` of a dataset as a pyarrow Table (only ``columns``)."""
    from sharding.storage import open_storage

    return _parse_manifest(_read_manifest_bytes(open_storage(url)), columns)


def slide_patients(manifest: Any) -> dict[str, str]:
    """``{slide: patient}`` of a manifest table (:func:`read_manifest` with ``slide`` and
    ``patient``) for the slides that name a patient: the resampling unit of every interval,
    since a patient's slides are not independent."""
    cols = manifest.select(["slide", "patient"]).to_pydict()
    return {str(s): str(p) for s, p in zip(cols["slide"], cols["patient"], strict=True) if p}


def _read_manifest_bytes(store: Storage) -> bytes:
    try:
        return store.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.child_url(MANIFEST)}: not found") from None


def _parse_manifest(data: bytes, columns: Sequence[str]) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data), columns=list(columns))
