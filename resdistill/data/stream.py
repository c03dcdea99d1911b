"""The samples of one rank's shard tasks, as an ``IterableDataset`` of decoded, normalised tiles.

A sample yields ``(images, label, key)``: ``images`` a tuple of float tensors ``(3, H_m, W_m)``,
one per requested magnification in the order asked, normalised as ``(x / 255 - mean_m) / std_m``
with the dataset's per-magnification statistics; ``label`` the class index in
``DatasetInfo.classes`` or ``-1`` for null (or hidden by a label-scarce run); ``key`` the sample
key.

Reading. Each DataLoader worker reads its own share of the rank's tasks
(:func:`resdistill.data.plan.split_among_workers`). Only the members of the requested
magnifications and the ``json`` member are kept from each tar, and a sample's label is read
before any image is decoded, so samples a run drops (unlabelled ones with ``labelled_only``) are
never decoded. In training (``repeat=True``) a worker cycles over its shards forever, in a new
order each pass, so a rank whose shards hold fewer samples than an epoch needs repeats some
instead of running dry.

Seeds. Worker ``w`` of a stream seeded ``s`` draws its shard order and shuffle from
``random.Random(f"{s}:{w}")`` and seeds torch (the augmentations) with
``crc32(f"{s}:{w}:torch")``.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .augment import Augment
from .info import DatasetInfo
from .plan import ShardTask, split_among_workers


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG or PNG bytes -> uint8 tensor ``(3, H, W)`` (RGB), decoded by PIL (libjpeg-turbo).

    PIL rather than ``torchvision.io.decode_image``: the latter gives the same pixels and is
    about 0.1 ms faster per 224 px tile, but is deprecated since torchvision 0.29 and warns on
    every call.
    """
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _shuffle_buffer(
    items: Iterator[dict[str, Any]], size: int, rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Reservoir shuffle: keep ``size`` items, emit a random one for each new arrival, then the rest."""
    if size <= 1:
        yield from items
        return
    buf: list[dict[str, Any]] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class TileStream(IterableDataset):
    """Samples of one rank's shard tasks; each DataLoader worker reads its own share.

    The share of worker ``w`` of ``W`` is ``split_among_workers(tasks, W)[w]`` (workers beyond
    the number of tasks get none). ``repeat=True`` cycles over the shards forever in a new order
    each pass (training); ``False`` reads each once in order (evaluation). ``augment`` gets the
    sample's uint8 images together, before normalisation.
    """

    def __init__(
        self,
        info: DatasetInfo,
        tasks: Sequence[ShardTask],
        mags: Sequence[str],
        *,
        repeat: bool,
        shuffle_buffer: int = 0,
        augment: Augment | None = None,
        seed: int = 0,
        labelled_only: bool = False,
        check_size: bool = True,
        labelled_slides: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if not mags:
            raise ValueError("no magnification requested")
        self.info = info
        self.tasks = list(tasks)
        self.mags = [info.resolve_mag(m) for m in mags]
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.seed = seed
        self.labelled_only = labelled_only
        self.check_size = check_size
        self.labelled_slides = None if labelled_slides is None else frozenset(labelled_slides)
        self._members = [info.member(m) for m in self.mags]
        self._class_index = {c: i for i, c in enumerate(info.classes)}
        self._norm = []
        for m in self.mags:
            mean, std = info.mean_std(m)
            self._norm.append(
                (
                    torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
                    torch.tensor(std, dtype=torch.float32).view(3, 1, 1),
                )
            )

    @property
    def num_samples(self) -> int:
        """Samples in one pass over this stream's tasks (from the manifest)."""
        return sum(t.samples for t in self.tasks)

    def _raw_samples(self, tasks: Sequence[ShardTask], rng: random.Random) -> Iterator[dict]:
        """Undecoded samples of ``tasks`` (one pass, or forever with ``repeat``): the kept members'
        bytes plus ``__key__``, ``__url__`` and ``__shard__`` (the task's shard rel path)."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        from sharding.storage import open_storage

        wanted = {*self._members, "json"}

        def select(name: str) -> bool:
            return name.split(".", 1)[-1].lower() in wanted

        store = open_storage(self.info.url)
        for _pass in itertools.count() if self.repeat else range(1):
            order = list(tasks)
            if self.shuffle_buffer > 1:
                rng.shuffle(order)
            for task in order:
                url = store.child_url(task.rel)
                stream = gopen(url, "rb")
                try:
                    files = tar_file_expander(
                        [{"url": url, "stream": stream}], select_files=select, eof_value=None
                    )
                    for sample in group_by_keys(files):
                        if task.keeps(sample["__key__"]):
                            sample["__shard__"] = task.rel
                            yield sample
                finally:
                    stream.close()

    def _label(self, sample: Mapping[str, Any]) -> int:
        """A raw sample's class index, read before any image is decoded: -1 when the sample is
        unlabelled or its slide is not among ``labelled_slides`` (its label is hidden)."""
        key = sample["__key__"]
        meta = json.loads(sample["json"]) if "json" in sample else {}
        label_name = meta.get("label")
        if label_name is None:
            return -1
        if label_name not in self._class_index:
            raise ValueError(
                f"sample {key}: label {label_name!r} is not among the dataset's classes "
                f"{list(self.info.classes)}"
            )
        slide = key.rsplit("_", 2)[0]  # keys are <slide>_<x>_<y>
        if self.labelled_slides is not None and slide not in self.labelled_slides:
            return -1
        return self._class_index[label_name]

    def _decode(self, sample: Mapping[str, Any]) -> tuple[tuple[torch.Tensor, ...], int, str]:
        """``(images, label, key)`` of a raw sample whose ``__label__`` :meth:`__iter__` set."""
        key = sample["__key__"]
        label = sample["__label__"]
        images = []
        for mag, member in zip(self.mags, self._members, strict=True):
            if member not in sample:
                raise KeyError(f"sample {key} ({sample.get('__url__')}) has no {member} image")
            img = decode_image(sample[member])
            if self.check_size:
                want = self.info.tile_px.get(mag)
                if want is not None and tuple(img.shape[-2:]) != (want, want):
                    raise ValueError(
                        f"sample {key}: {member} is {img.shape[-1]}x{img.shape[-2]} px, "
                        f"dataset.json says {want}"
                    )
            images.append(img)
        if self.augment is not None:
            images = list(self.augment(*images))
        out = tuple(
            ((img.to(torch.float32).div_(255.0) if img.dtype == torch.uint8 else img) - mean) / std
            for img, (mean, std) in zip(images, self._norm, strict=True)
        )
        return out, label, key

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], int, str]]:
        from sharding.storage import register_webdataset_s3

        register_webdataset_s3()
        winfo = get_worker_info()
        wid, nworkers = (winfo.id, winfo.num_workers) if winfo is not None else (0, 1)
        shares = split_among_workers(self.tasks, nworkers)
        mine = shares[wid] if wid < len(shares) else []
        if not mine:
            return
        rng = random.Random(f"{self.seed}:{wid}")
        torch.manual_seed(zlib.crc32(f"{self.seed}:{wid}:torch".encode()))
        # at most one pass of this worker's samples: a bigger buffer would only delay the first
        # batch and repeat samples within a pass
        size = min(self.shuffle_buffer, sum(t.samples for t in mine))
        # labels are read (and, with labelled_only, unlabelled samples dropped) before decoding:
        # a label-scarce run would otherwise decode and augment the unlabelled majority
        raw = self._labelled(self._raw_samples(mine, rng))
        for sample in _shuffle_buffer(raw, size, rng):
            yield self._decode(sample)

    def _labelled(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__label__"] = label = self._label(sample)
            if label >= 0 or not self.labelled_only:
                yield sample
