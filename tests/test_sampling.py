"""Every training sample is drawn equally often, whatever the shard sizes, ranks and workers.

The draw counts of every sample over several epochs of real loaders (2 ranks x 2 loader workers,
webdataset shards written by the fixtures) must stay within a binomial tolerance of uniform.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from resdistill.data import DatasetInfo, make_loader, read_manifest, shard_keys, steps_per_epoch
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.timeout(300)

WORLD, WORKERS, BATCH, EPOCHS = 2, 2, 5, 6


def _draw_counts(root: Path, *, labelled_slides: list[str] | None = None) -> tuple[Counter, int]:
    """Keys drawn by every rank over EPOCHS training epochs; the samples drawn per epoch."""
    info = DatasetInfo.load(str(root))
    counts: Counter[str] = Counter()
    per_epoch = 0
    for rank in range(WORLD):
        loader = make_loader(
            info, ["train"], ["5x"], batch_size=BATCH, train=True, rank=rank, world_size=WORLD,
            num_workers=WORKERS, shuffle_buffer=16, seed=3, labelled_only=labelled_slides is not None,
            labelled_slides=labelled_slides,
        )  # fmt: skip
        try:
            for _ in range(EPOCHS):
                batches = list(loader.epoch())
                assert len(batches) == loader.steps  # equal steps on every rank
                counts.update(k for b in batches for k in b.keys)
            per_epoch += loader.steps * BATCH
        finally:
            loader.close()
    return counts, per_epoch


def _assert_uniform(counts: Counter, population: list[str], per_epoch: int) -> None:
    assert set(counts) <= set(population), "a sample outside the population was drawn"
    mean = EPOCHS * per_epoch / len(population)
    tol = 3 * math.sqrt(mean) + 1  # binomial spread of one sample's count around its mean
    off = {k: counts.get(k, 0) for k in population if abs(counts.get(k, 0) - mean) > tol}
    assert not off, f"{len(off)} of {len(population)} samples off {mean:.1f} +- {tol:.1f}: " + str(
        sorted(off.items())[:6]
    )


@pytest.mark.parametrize("sizes", [[100, 10], [3, 40, 17], [7, 7, 50, 1, 30]])
def test_every_sample_equally_likely(tmp_path: Path, sizes: list[int]) -> None:
    root = tmp_path / "ds"
    write_dataset(root, mags=("10x", "5x"), tile_px=16, shard_sizes={"train": sizes, "val": [4]})
    keys = [k for v in shard_keys(read_manifest(str(root)), ["train"]).values() for k in v]
    counts, per_epoch = _draw_counts(root)
    assert per_epoch == steps_per_epoch(len(keys), WORLD, BATCH) * WORLD * BATCH
    _assert_uniform(counts, keys, per_epoch)


def test_label_scarce_draws_are_uniform_over_the_kept_samples(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_dataset(root, mags=("10x", "5x"), tile_px=16, shard_sizes={"train": [100, 10], "val": [4]},
                  slides_per_split=4)  # fmt: skip
    chosen = ["train-slide0", "train-slide1"]
    manifest = read_manifest(str(root))
    kept = [
        k
        for v in shard_keys(
            manifest, ["train"], labelled_only=True, labelled_slides=chosen
        ).values()
        for k in v
    ]
    assert 0 < len(kept) < 110
    counts, per_epoch = _draw_counts(root, labelled_slides=chosen)
    _assert_uniform(counts, kept, per_epoch)
