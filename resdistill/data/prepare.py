"""From the loader's uint8 batch to the model's input, on the batch and on the training device.

Loader workers only read and decode (:class:`~resdistill.data.stream.TileStream` yields uint8
tiles); every per-pixel step runs here once per batch, vectorised, in the process (and on the
device) that trains: uint8 crosses the worker boundary and the host-to-device copy at a quarter
of float32's bytes, and a GPU does the arithmetic for free. In order:

1. move to ``device`` (non-blocking; the loader pins batches on CUDA);
2. flips and rotations (:meth:`PairedAugment.geometry`), on uint8 tiles and on stored feature
   maps alike (pixel permutations: they commute with every per-pixel and per-tile step below);
3. ``x / 255`` to float;
4. stain normalisation (:mod:`~resdistill.data.stain_norm`, each tile with its own statistics);
5. HED and colour jitter (:meth:`PairedAugment.colour`);
6. ``(x - mean_m) / std_m`` with the dataset's statistics of each tile's magnification.

A batch's ``images`` are its tiles (one per requested magnification) then any extras of its
source (cached targets: logits ``(N, K)`` and feature maps ``(N, C, h, w)``); 4-D extras are
maps that get the geometry, the others pass through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .augment import PairedAugment, unit_float
from .stain_norm import normalizer

MeanStd = tuple[Sequence[float], Sequence[float]]


class BatchPrep:
    """The steps of the module docstring for batches with ``len(norms)`` tiles.

    ``norms``: ``(mean, std)`` per tile slot; ``stain``: a stain-normalisation reference or None;
    ``augment``: a :class:`PairedAugment` or None (evaluation); ``generator``: the augmentation's
    draws (None: torch's global RNG); ``device``: where batches go first (None: stay);
    ``owns``: the batches are this object's to change in place (the loader's fresh collated
    batches); otherwise :meth:`images` copies them first.
    """

    def __init__(
        self,
        norms: Sequence[MeanStd],
        *,
        stain: Mapping[str, Any] | None = None,
        augment: PairedAugment | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        owns: bool = False,
    ) -> None:
        self.tiles = len(norms)
        self.owns = owns
        self.device = torch.device(device) if device is not None else None
        self.augment = augment
        self.generator = generator
        self.stain = normalizer(stain) if stain else None
        # on the batches' device once, so no batch pays a host-to-device copy of them
        self._norms = [
            (
                torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1),
            )
            for mean, std in norms
        ]

    def images(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Steps 2-6 on a batch's ``images`` (tiles, then extras), already on the device."""
        tiles, extras = list(images[: self.tiles]), list(images[self.tiles :])
        # every step below works in place (a batch of 224 px tiles is tens of MB, and each fresh
        # tensor of that size costs page faults): only on tensors this call owns
        if not self.owns:
            tiles, extras = [t.clone() for t in tiles], [e.clone() for e in extras]
        maps = [i for i, e in enumerate(extras) if e.dim() == 4]
        if self.augment is not None:
            tiles, moved = self.augment.geometry(tiles, [extras[i] for i in maps], self.generator)
            for i, m in zip(maps, moved, strict=True):
                extras[i] = m
        floats = [unit_float(t) for t in tiles]
        if self.stain is not None:
            floats = [self.stain(t) for t in floats]
        if self.augment is not None:
            floats = self.augment.colour(floats, self.generator)
        out = []
        for x, (mean, std) in zip(floats, self._norms, strict=True):
            out.append(x.sub_(mean.to(x.device)).div_(std.to(x.device)))
        return (*out, *extras)

    def __call__(self, batch: Any) -> Any:
        """The prepared :class:`~resdistill.data.loader.Batch` (images and labels on the device)."""
        if self.device is not None:
            batch = batch.to(self.device, non_blocking=True)
        return type(batch)(self.images(batch.images), batch.labels, batch.keys)
