"""Which samples each reading slot takes in each pass: pure functions of the manifest.

Slots. Every loader worker of every DDP rank is one slot: ``slot = rank * W + worker`` of
``S = world_size * W`` (``W`` loader workers per rank, the same on every rank; a rank reading in
its own process is one slot). The keys of a split (:func:`shard_keys`, after ``labelled_only``
and label-fraction filtering, so draws are uniform over what a run keeps) are laid end to end in
a shard order, and each slot takes a contiguous range of that line (:func:`slot_tasks`):

* Training: a new draw every pass (pass ``p`` of a loader started at epoch ``e`` uses draw seed
  ``hash_seed(seed, "draw", e + p)``, the same on every slot): the shard order is shuffled, the
  line rotated by a uniform offset, and every slot takes exactly ``q = N // S`` keys; the
  ``N mod S`` keys after the last range sit the pass out. The ranges are disjoint, each key is
  in a pass with probability ``S*q / N``, the same for all, and since every slot yields ``q``
  samples per pass and is consumed at the same rate (equal steps per rank, DataLoader workers in
  turn), every sample is drawn equally often, whatever the shard sizes.
* Evaluation (``draw=None``): shards in name order, slot ``s`` takes ``[s*N//S, (s+1)*N//S)``:
  every sample exactly once over all slots.

Cost. A slot reads only the shards its range overlaps, and stops reading a shard once it has all
its keys of it. A range of ``q`` keys touches at most ``ceil(q / shard) + 1`` shards, so one pass
reads the data about once plus at most one extra shard per slot (a shard shared by two ranges is
read by both, the later one skipping the other's samples undecoded): I/O per pass <= ``N + S``
shards' worth, not ``S`` times the data as a per-sample hash over every shard would cost.

Equal steps. Training takes ``steps = total_samples // (world_size * batch_size)`` batches per
epoch on every rank (:func:`steps_per_epoch`), so DDP never hangs; the loader
(:mod:`resdistill.data.loader`) cuts its endless stream of passes into that many batches.

Seeds. :func:`hash_seed` turns any parts into a seed stable across processes; the same parts
give the same draws on every run.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sharding.layout import SPLITS


@dataclass(frozen=True)
class ShardTask:
    """The samples of one shard that one slot reads in one pass: exactly the keys in ``keys``."""

    rel: str
    keys: frozenset[str]

    @property
    def samples(self) -> int:
        return len(self.keys)

    def keeps(self, key: str) -> bool:
        return key in self.keys


def shard_keys(
    manifest: Any,
    splits: Sequence[str],
    *,
    labelled_only: bool = False,
    labelled_slides: Collection[str] | None = None,
    slides: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """``{shard rel path: [sample keys]}`` for the rows of ``splits`` (labelled rows only if asked).

    ``labelled_slides`` (see :func:`select_labelled_slides`) treats every other slide's samples as
    unlabeled; ``slides`` (see :func:`select_train_slides`) keeps only those slides' rows.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}: choose from {', '.join(SPLITS)}")
    cols = manifest.to_pydict()
    wanted = set(splits)
    out: dict[str, list[str]] = {}
    keep = None if labelled_slides is None else set(labelled_slides)
    only = None if slides is None else set(slides)
    for key, slide, split, label, shard in zip(
        cols["key"], cols["slide"], cols["split"], cols["label"], cols["shard"], strict=True
    ):
        if only is not None and slide not in only:
            continue
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


def select_train_slides(
    manifest: Any,
    splits: Sequence[str],
    share: float,
    seed: int = 0,
    labelled_slides: Collection[str] | None = None,
) -> list[str] | None:
    """Slides a distillation run with ``share`` of the unlabelled data reads: every labelled
    slide of ``splits`` (those of ``labelled_slides`` when given, else every slide with a label)
    plus ``round(share * n)`` of the ``n`` others (no label, or a hidden one), ranked by a seeded
    hash, so a smaller share's slides are a subset of a larger one's at the same seed.
    ``share >= 1`` returns None (every slide)."""
    if not 0 <= share <= 1:
        raise ValueError(f"unlabelled share must be in [0, 1], got {share}")
    if share >= 1:
        return None
    cols = manifest.to_pydict()
    wanted = set(splits)
    keep = None if labelled_slides is None else set(labelled_slides)
    labelled: set[str] = set()
    others: set[str] = set()
    for slide, split, label in zip(cols["slide"], cols["split"], cols["label"], strict=True):
        if split not in wanted:
            continue
        known = label is not None and (keep is None or slide in keep)
        (labelled if known else others).add(slide)
    others -= labelled
    ranked = sorted(others, key=lambda s: zlib.crc32(f"{seed}:unlabelled:{s}".encode()))
    return sorted(labelled | set(ranked[: round(share * len(ranked))]))


def slot_tasks(
    shards: Mapping[str, Sequence[str]], slot: int, slots: int, *, draw: int | None
) -> list[ShardTask]:
    """The shard tasks of ``slot`` (of ``slots``) for one pass (see the module docstring).

    ``shards`` maps each shard to its kept keys (:func:`shard_keys`). ``draw=None``: evaluation,
    shards in name order, slot ``s`` takes positions ``[s*N//S, (s+1)*N//S)`` (every sample once).
    Otherwise the pass's draw seed: shard order shuffled by ``random.Random(draw)``, a rotation
    ``o = randrange(N)`` from the same generator, slot ``s`` takes the ``q = N // S`` positions
    from ``o + s*q`` (modulo ``N``). Tasks come in reading order, one per shard.
    """
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is not in 0..{slots - 1}")
    order = sorted(shards)
    n = sum(len(shards[rel]) for rel in order)
    if n == 0:
        return []
    if draw is None:
        start, stop = slot * n // slots, (slot + 1) * n // slots
    else:
        rng = random.Random(draw)
        rng.shuffle(order)
        q = n // slots
        start = rng.randrange(n) + slot * q
        stop = start + q
    picked: dict[str, list[str]] = {}
    pos = 0
    for rel in order + order:  # twice: a range may wrap past the end
        keys = shards[rel]
        lo, hi = max(start, pos), min(stop, pos + len(keys))
        if lo < hi:
            picked.setdefault(rel, []).extend(keys[lo - pos : hi - pos])
        pos += len(keys)
        if pos >= stop:
            break
    return [ShardTask(rel, frozenset(keys)) for rel, keys in picked.items()]


def slot_samples(total: int, slot: int, slots: int, *, train: bool) -> int:
    """Samples of ``slot`` in one pass: ``total // slots`` in training, else its range's size."""
    if train:
        return total // slots
    return (slot + 1) * total // slots - slot * total // slots


def workers_per_rank(total: int, world_size: int, num_workers: int) -> int:
    """Loader workers of every rank: ``num_workers``, fewer when the split holds under one sample
    per slot (``total // world_size``); 0 reads in the rank's own process (one slot)."""
    return max(0, min(num_workers, total // world_size))


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
