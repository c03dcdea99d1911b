"""A stain normalisation reference estimated from a dataset's training tiles (driver side)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .loader import make_loader
from .stain_norm import estimate_reference


def reference_from_dataset(
    data: Any, splits: Sequence[str], mag: str, method: str, *, tiles: int = 256, seed: int = 0
) -> dict[str, Any]:
    """:func:`~resdistill.data.stain_norm.estimate_reference` of up to ``tiles`` samples of ``splits`` at ``mag``, drawn
    uniformly from the manifest with ``seed`` (so over the training slides, not the first
    shards), read without augmentation. ``data`` is a :class:`~resdistill.data.info.Dataset`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    manifest = data.manifest()
    rows = np.flatnonzero(pc.is_in(manifest["split"], pa.array(list(splits))).to_numpy())
    if rows.size == 0:
        raise ValueError(f"{data.info.url}: split(s) {', '.join(splits)} hold no samples")
    pick = np.random.default_rng(seed).choice(rows, size=min(tiles, rows.size), replace=False)
    raw = {mag: {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    info = replace(data.info, normalization={**data.info.normalization, **raw})
    loader = make_loader(info, list(splits), [mag], batch_size=64, train=False, num_workers=0,
                         manifest=manifest.take(np.sort(pick)))  # fmt: skip
    try:
        batch = torch.cat([b.images[0] for b in loader.epoch()])
    finally:
        loader.close()
    return estimate_reference(batch, method, torch.Generator().manual_seed(seed))
