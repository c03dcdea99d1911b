"""Batches of one rank, in training or evaluation mode: the loader every stage reads through.

Equal steps. In training mode (``train=True``) every rank yields exactly ``steps`` batches per
epoch (default :func:`resdistill.data.sample_plan.steps_per_epoch` of the manifest's total over all
ranks), whatever the shard sizes, so DDP never hangs: each loader worker reads an endless series
of passes, each a fresh uniform draw of equal size per worker
(:mod:`resdistill.data.sample_plan`), so every sample is drawn equally often. Evaluation (``train=False``) reads each sample exactly once
over all ranks and workers, in shard order, without augmentation, and may give ranks different
batch counts: do not run collectives per batch there.

Sources. :func:`make_loader` selects the keys and builds a stream with its ``source``: a
:class:`TileStream` by default, or any subclass taking the same arguments (cached teacher targets,
:mod:`resdistill.data.cached`), so every source shares the plan, the equal steps and the seeds.

Batches. Workers send uint8 tiles; :meth:`StreamLoader.epoch` hands every batch to its
:class:`~resdistill.data.prepare.BatchPrep` (device, augmentation, stain and per-magnification
normalisation on the whole batch) and yields model-ready float tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .augment import PairedAugment
from .info import Dataset, DatasetInfo, read_manifest
from .prepare import BatchPrep
from .sample_plan import hash_seed, shard_keys, steps_per_epoch, workers_per_rank
from .stream import TileStream

#: Builds a rank's stream: ``source(info, shards, mags, *, repeat, rank, world_size, workers, epoch,
#: shuffle_buffer, seed, labelled_only, labelled_slides)``, the arguments of :class:`TileStream`.
Source = Callable[..., TileStream]


@dataclass
class Batch:
    """A batch: one ``(N, 3, H_m, W_m)`` tensor per requested magnification (then a source's
    extras), labels, keys: uint8 as collated, float and normalised once prepared."""

    images: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        return Batch(
            tuple(i.pin_memory() for i in self.images), self.labels.pin_memory(), self.keys
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            tuple(i.to(device, non_blocking=non_blocking) for i in self.images),
            self.labels.to(device, non_blocking=non_blocking),
            self.keys,
        )


def collate(samples: Sequence[tuple[tuple[torch.Tensor, ...], int, str]]) -> Batch:
    """Stack samples into a :class:`Batch`."""
    n_mags = len(samples[0][0])
    images = tuple(torch.stack([s[0][m] for s in samples]) for m in range(n_mags))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return Batch(images, labels, [s[2] for s in samples])


class StreamLoader:
    """Batches of one rank. Training: exactly ``steps`` batches per :meth:`epoch` (endless source);
    evaluation: one pass over the rank's samples per :meth:`epoch`. Each batch goes through
    ``prepare`` (None: collated uint8 batches as they are).
    """

    def __init__(
        self,
        stream: TileStream,
        *,
        batch_size: int,
        steps: int | None,
        num_workers: int,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        prepare: BatchPrep | None = None,
    ) -> None:
        self.stream = stream
        self.prepare = prepare
        self.batch_size = batch_size
        self.steps = steps
        self.num_workers = num_workers
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=True)
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=False,
            **kwargs,
        )
        self._it: Iterator[Batch] | None = None

    @property
    def num_samples(self) -> int:
        """Samples of this rank in one pass (from the manifest)."""
        return self.stream.num_samples

    def epoch(self) -> Iterator[Batch]:
        """The batches of one epoch (see the class docstring)."""
        prep = self.prepare or (lambda b: b)
        if self.steps is None:
            for batch in self.loader:
                yield prep(batch)
            return
        if self._it is None:
            self._it = iter(self.loader)
        for _ in range(self.steps):
            try:
                yield prep(next(self._it))
            except StopIteration:
                raise RuntimeError(
                    "training stream ended early: this rank has no samples to cycle over"
                ) from None

    def close(self) -> None:
        """Stop the loader workers, now.

        Both the iterator training epochs share and the one the DataLoader keeps for its
        persistent workers (evaluation epochs) are shut down here: left to the garbage collector,
        torch's shutdown of an iterator whose epoch ended in an error waits its join timeout per
        worker, as the queues it signals may already be gone.
        """
        iterators = [self._it, getattr(self.loader, "_iterator", None)]
        self._it = None
        self.loader._iterator = None
        for it in {id(i): i for i in iterators if i is not None}.values():
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(
    info: DatasetInfo | Dataset | str,
    splits: Sequence[str],
    mags: Sequence[str],
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    augment: PairedAugment | None = None,
    seed: int = 0,
    epoch: int = 0,
    steps: int | None = None,
    labelled_only: bool = False,
    slides: Collection[str] | None = None,
    pin_memory: bool = False,
    manifest: Any = None,
    labelled_slides: Collection[str] | None = None,
    source: Source = TileStream,
    stain: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> StreamLoader:
    """Batches of ``splits`` for ``rank`` of ``world_size`` (see the module docstring); only
    the samples of ``slides`` when given (distillation reading a share of the unlabelled data,
    :func:`~resdistill.data.sample_plan.select_train_slides`).

    ``train=True``: shuffled (buffer ``shuffle_buffer``), augmented when ``augment`` is given,
    endless source cut into ``steps`` batches per epoch (default :func:`steps_per_epoch` of the
    manifest's total over all ranks). ``train=False``: shards in order, no augmentation, one pass.
    ``epoch`` is the epoch the loader starts at (pass the starting epoch when resuming): it picks
    the first pass's draw and the shuffles' seeds. ``labelled_only`` drops samples whose label is null
    (counts follow the manifest); ``labelled_slides`` hides the labels of every other slide (a
    label-scarce run). ``manifest`` (a pyarrow Table) saves reading it again; a :class:`Dataset`
    supplies its own. ``source`` builds the stream (see the module docstring). ``stain``: the
    stain normalisation reference every tile goes through, in both modes (it is part of the
    model's input). ``device``: where batches are prepared (the training device; None: here).
    Augmentation draws come from a generator seeded by ``(seed, epoch, rank)``.
    """
    if isinstance(info, Dataset):
        if manifest is None:
            manifest = info.manifest()
        info = info.info
    elif isinstance(info, str):
        info = DatasetInfo.load(info)
    if manifest is None:
        manifest = read_manifest(info.url)
    keys = shard_keys(
        manifest, splits, labelled_only=labelled_only, labelled_slides=labelled_slides,
        slides=slides,
    )  # fmt: skip
    total = sum(len(v) for v in keys.values())
    if train:
        if total < world_size:
            raise ValueError(
                f"{info.url}: split(s) {', '.join(splits)} hold {total} samples, too few to give "
                f"each of {world_size} ranks at least one: lower --workers"
            )
        if steps is None:
            steps = steps_per_epoch(total, world_size, batch_size)
    else:
        steps = None
        augment = None
        shuffle_buffer = 0
    workers = workers_per_rank(total, world_size, num_workers)
    stream = source(
        info,
        keys,
        mags,
        repeat=train,
        rank=rank,
        world_size=world_size,
        workers=workers,
        epoch=epoch,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        labelled_only=labelled_only,
        labelled_slides=labelled_slides,
    )
    generator = torch.Generator().manual_seed(hash_seed(seed, epoch, rank, "augment"))
    prep = BatchPrep(stream.norms(), stain=stain, augment=augment, generator=generator,
                     device=device, owns=True)  # fmt: skip
    return StreamLoader(stream, batch_size=batch_size, steps=steps, num_workers=workers,
                        pin_memory=pin_memory, prepare=prep)  # fmt: skip
