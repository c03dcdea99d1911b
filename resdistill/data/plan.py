"""Which samples each DDP rank and each loader worker reads: pure functions of the manifest.

Sharding contract. Shards are assigned to ranks whole and disjointly: shards sorted by size (then
name) go one by one to the rank with the fewest samples so far (ties: lowest rank). When a split
has fewer shards than ranks, every rank reads every shard and keeps the samples with
``crc32(key) % world_size == rank`` instead (still disjoint, counts exact from the manifest). A
rank's shards are then dealt the same way to its ``min(num_workers, len(shards))`` loader workers.

Equal steps. Training takes ``steps = total_samples // (world_size * batch_size)`` batches per
epoch on every rank (:func:`steps_per_epoch`), whatever the shard sizes, so DDP never hangs; the
loader (:mod:`resdistill.data.loader`) cuts its endless stream into that many batches.

Seeds. :func:`hash_seed` turns ``(seed, rank, epoch)`` into a stream's seed, stable across
processes; the same parts give the same draws on every run.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sharding.layout import SPLITS


@dataclass(frozen=True)
class ShardTask:
    """One shard as read by one rank: all its samples, or those with ``crc32(key) % modulus == residue``."""

    rel: str
    samples: int
    modulus: int = 1
    residue: int = 0

    def keeps(self, key: str) -> bool:
        return self.modulus == 1 or key_bucket(key, self.modulus) == self.residue


def key_bucket(key: str, modulus: int) -> int:
    """``crc32(key.encode()) % modulus``: a stable, process-independent sample-to-rank map."""
    return zlib.crc32(key.encode("utf-8")) % modulus


def shard_keys(
    manifest: Any,
    splits: Sequence[str],
    *,
    labelled_only: bool = False,
    labelled_slides: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """``{shard rel path: [sample keys]}`` for the rows of ``splits`` (labelled rows only if asked).

    ``labelled_slides`` (see :func:`select_labelled_slides`) treats every other slide's samples as
    unlabeled.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}: choose from {', '.join(SPLITS)}")
    cols = manifest.to_pydict()
    wanted = set(splits)
    out: dict[str, list[str]] = {}
    keep = None if labelled_slides is None else set(labelled_slides)
    for key, slide, split, label, shard in zip(
        cols["key"], cols["slide"], cols["split"], cols["label"], cols["shard"], strict=True
    ):
        if keep is not None and slide not in keep:
            label = None
        if split in wanted and not (labelled_only and label is None):
            out.setdefault(shard, []).append(key)
    return {k: sorted(v) for k, v in sorted(out.items())}


def select_labelled_slides(
    manifest: Any, splits: Sequence[str], fraction: float, seed: int = 0
) -> list[str] | None:
    """Slides whose labels a label-scarce run may use: ``fraction`` of the labelled slides of
    ``splits``, per class ``max(1, round(fraction * n_class))`` chosen by a seeded hash (so every
    class keeps a labelled slide). ``fraction >= 1`` returns None (all labels)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return None
    cols = manifest.to_pydict()
    wanted = set(splits)
    by_class: dict[str, set[str]] = {}
    for slide, split, label in zip(cols["slide"], cols["split"], cols["label"], strict=True):
        if split in wanted and label is not None:
            by_class.setdefault(label, set()).add(slide)
    chosen: list[str] = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda s: zlib.crc32(f"{seed}:{s}".encode()))
        chosen.extend(ranked[: max(1, round(fraction * len(ranked)))])
    return sorted(chosen)


def _greedy(sizes: Mapping[str, int], bins: int) -> list[list[str]]:
    """Deal items largest first to the bin with the smallest total (ties: lowest bin index)."""
    out: list[list[str]] = [[] for _ in range(bins)]
    totals = [0] * bins
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = min(range(bins), key=lambda b: (totals[b], b))
        out[i].append(name)
        totals[i] += sizes[name]
    return out


def plan_all_ranks(shards: Mapping[str, Sequence[str]], world_size: int) -> list[list[ShardTask]]:
    """The tasks of every rank (see the module docstring); disjoint, covering every sample once."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shards = {k: v for k, v in shards.items() if len(v)}
    if len(shards) >= world_size:
        dealt = _greedy({k: len(v) for k, v in shards.items()}, world_size)
        return [[ShardTask(rel, len(shards[rel])) for rel in sorted(names)] for names in dealt]
    plans: list[list[ShardTask]] = [[] for _ in range(world_size)]
    for rel, keys in sorted(shards.items()):
        per_rank = [0] * world_size
        for key in keys:
            per_rank[key_bucket(key, world_size)] += 1
        for rank in range(world_size):
            if per_rank[rank]:
                plans[rank].append(ShardTask(rel, per_rank[rank], world_size, rank))
    return plans


def split_among_workers(tasks: Sequence[ShardTask], num_workers: int) -> list[list[ShardTask]]:
    """Deal a rank's tasks to ``min(num_workers, len(tasks))`` loader workers (greedy by size)."""
    n = max(1, min(num_workers, len(tasks)))
    by_name = {f"{i:08d}": t for i, t in enumerate(tasks)}
    dealt = _greedy({k: t.samples for k, t in by_name.items()}, n)
    return [[by_name[k] for k in sorted(names)] for names in dealt]


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """``total_samples // (world_size * batch_size)``, the batches every rank takes per epoch."""
    steps = total_samples // (world_size * batch_size)
    if steps < 1:
        raise ValueError(
            f"{total_samples} training samples are fewer than one batch per rank "
            f"({world_size} ranks x batch {batch_size}): lower --batch-size or --workers"
        )
    return steps


def hash_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF
