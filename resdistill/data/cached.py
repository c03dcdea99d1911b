"""Cached teacher targets as one more source of :func:`resdistill.data.loader.make_loader`.

The torch side of :mod:`resdistill.data.targets` (see its docstring for the layout and for
which augmentations are allowed with cached targets and why):

* :class:`CachedTargetStream` - a :class:`~resdistill.data.stream.TileStream` of the student tile
  whose samples carry the teacher's stored logits and pooled feature map for their key.
* :func:`make_cached_loader` - ``make_loader`` with that stream as its source: the same shard
  plan, equal steps and seeds; batch ``images`` = ``(x_s, t_logits, t_features)``. Augment with
  :class:`~resdistill.data.augment.GeometricAugment` (no colour jitter).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from resdistill.data.targets import StaleTargetsError, TargetsIndex

from .augment import GeometricAugment
from .info import Dataset, DatasetInfo
from .loader import StreamLoader, make_loader
from .sample_plan import ShardTask
from .stream import TileStream

__all__ = ["CachedTargetStream", "GeometricAugment", "make_cached_loader"]


class CachedTargetStream(TileStream):
    """A ``TileStream`` of the student tile whose samples carry the stored teacher outputs.

    Yields ``((x_s, t_logits, t_features), label, key)``: ``x_s`` the uint8 student tile
    ``(3, H, W)``, ``t_logits`` ``(K,)`` and ``t_features`` ``(C, h, w)`` float32 from the
    targets of the sample's key (the batch step flips and rotates ``x_s`` and ``t_features``
    with one draw, :mod:`~resdistill.data.prepare`). A key without targets raises
    :class:`StaleTargetsError`. Each shard's ``.npz`` is read once per pass.
    """

    def __init__(self, *args: Any, targets: TargetsIndex, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if len(self.mags) != 1:
            raise ValueError(
                "a cached-target stream reads exactly one (the student's) magnification"
            )
        self.targets = targets
        self.student_mag = self.mags[0]
        self._feat = f"feat_{self.student_mag}"

    def _raw_samples(self, tasks: Sequence[ShardTask]) -> Iterator[dict]:
        current: tuple[str, dict[str, int], dict[str, Any]] | None = None
        for sample in super()._raw_samples(tasks):
            rel = sample["__shard__"]
            if current is None or current[0] != rel:
                arrays = self.targets.read_shard(rel)
                if self._feat not in arrays:
                    raise StaleTargetsError(
                        f"{self.targets.url}: {rel} holds no {self._feat} feature maps"
                    )
                index = {str(k): i for i, k in enumerate(arrays["keys"])}
                current = (rel, index, arrays)
            i = current[1].get(sample["__key__"])
            if i is None:
                raise StaleTargetsError(
                    f"{self.targets.url}: no targets for sample {sample['__key__']} of {rel}"
                )
            sample["__tlogits__"] = current[2]["logits"][i]
            sample["__tfeat__"] = current[2][self._feat][i]
            yield sample

    def _decode(self, sample: Mapping[str, Any]) -> tuple[tuple[torch.Tensor, ...], int, str]:
        (img,), label, key = super()._decode(sample)
        logits = torch.from_numpy(sample["__tlogits__"].astype("float32"))
        feat = torch.from_numpy(sample["__tfeat__"].astype("float32"))
        return (img, logits, feat), label, key


def make_cached_loader(
    info: DatasetInfo | Dataset,
    splits: Sequence[str],
    student_mag: str,
    targets: TargetsIndex,
    *,
    train: bool = True,
    augment: GeometricAugment | None = None,
    **kwargs: Any,
) -> StreamLoader:
    """:func:`make_loader` of ``student_mag`` with :class:`CachedTargetStream` as its source:
    batches whose ``images`` are ``(x_s (N,3,H,W), t_logits (N,K), t_features (N,C,h,w))``.
    ``kwargs`` are make_loader's (batch size, rank, seeds, steps, manifest, ...). Distillation
    uses every sample, so no label filtering. ``augment`` may flip and rotate only: the stored
    outputs belong to the un-jittered tile."""
    if augment is not None and augment.changes_colour:
        raise ValueError("cached teacher targets allow flips and rotations only, not colour jitter")
    return make_loader(
        info,
        splits,
        [student_mag],
        train=train,
        augment=augment,
        source=partial(CachedTargetStream, targets=targets),
        **kwargs,
    )
