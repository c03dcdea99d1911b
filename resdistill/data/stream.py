"""The samples of one rank, as an ``IterableDataset`` of decoded uint8 tiles.

A sample yields ``(images, label, key)``: ``images`` a tuple of uint8 tensors ``(3, H_m, W_m)``,
one per requested magnification in the order asked (stain normalisation, augmentation and the
per-magnification normalisation run on whole batches: :mod:`~resdistill.data.prepare`);
``label`` the class index in ``DatasetInfo.classes`` or ``-1`` for null (or hidden by a
label-scarce run); ``key`` the sample key. :meth:`TileStream.norms` gives the ``(mean, std)`` of
each tile's magnification.

Reading. Loader worker ``w`` of rank ``r`` is slot ``r * W + w`` and reads, in each pass, the
keys :func:`resdistill.data.sample_plan.slot_tasks` gives that slot: a fresh uniform draw every
pass in training (``repeat=True``, endless), every sample once over all slots in evaluation.
Only the members of the requested magnifications and the ``json`` member are kept from each tar,
and a sample's label is read before any image is decoded, so samples a run drops are never decoded.

Failures. A shard that cannot be opened, whose tar is corrupt, that lacks samples the manifest
lists for it, or whose member does not decode raises :class:`~resdistill.data.errors.ShardError`
naming the shard: never a hang, never a silent skip. An image's size is read from its header
(:func:`image_size`) and checked before it is decoded, so a crafted header claiming 60000x60000
px costs nothing: the exact tile edge of its magnification in dataset.json, or, without that
check, at most ``_EDGE_SLACK`` times the dataset's largest tile edge. A read from S3 that breaks
off (reset, stall) is resumed at its byte offset within a bound (:mod:`sharding.storage.s3_read`);
one that still fails, or any other read error, is the ShardError with the storage's own message.

Seeds. Slot ``s`` of a stream seeded ``seed`` starting at ``epoch`` shuffles with
``random.Random(f"{seed}:{epoch}:{s}")``; the pass draws are common to all slots (see the plan).
"""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from sharding.storage.base import StorageError

from .errors import ShardError, shard_error
from .info import DatasetInfo
from .sample_plan import ShardTask, hash_seed, slot_samples, slot_tasks
from .tar_members import iter_samples

#: without an exact size check, an image edge may be at most this many times the largest tile
_EDGE_SLACK = 4
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` that encoded image bytes claim, read from the header alone: a JPEG's
    frame header (simplejpeg), a PNG's IHDR, else PIL's lazy open (which reads only the header).

    Raises ValueError, OSError or SyntaxError when no header can be read.
    """
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        try:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            return int(width), int(height)
        except ValueError:
            pass  # PIL reads some JPEGs libjpeg-turbo's header parser refuses
    elif data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as exc:  # not an OSError: say it as bad data
        raise ValueError(str(exc)) from None


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG or PNG bytes -> uint8 tensor ``(3, H, W)`` (RGB).

    JPEG through simplejpeg (libjpeg-turbo called with little per-image overhead: on 28-56 px
    student tiles PIL's per-call cost exceeds the decode itself; torchvision's decoders are
    deprecated since 0.29); anything else, and any JPEG simplejpeg refuses, through PIL.
    """
    import numpy as np

    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            arr = None
        if arr is not None:
            return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


#: what decoders raise for bad image data (PIL: OSError, SyntaxError, ValueError)
_BAD_IMAGE = (OSError, SyntaxError, ValueError)


#: a shard that could not be read (network, storage), as opposed to one whose bytes are wrong
_STORAGE_ERRORS = (StorageError, OSError)


def _unreadable(url: str, exc: BaseException) -> ShardError:
    """The shard error of a read that failed: the storage's own one-line message and fix."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if detail.startswith(f"{url}: "):
        return shard_error(url, detail[len(url) + 2 :], fix="")
    return shard_error(url, f"cannot be read ({detail})", fix="check the storage and retry")


def _undecodable(url: str, key: str, member: str, exc: BaseException) -> ShardError:
    return shard_error(url, f"corrupted: sample {key}'s {member} does not decode ({exc})")


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
    """The samples of rank ``rank`` of ``world_size``; each of its ``workers`` loader workers (1:
    read in the rank's own process) is one slot of the plan (see the module docstring).

    ``shards`` maps each shard of the read to its kept keys (:func:`~resdistill.data.sample_plan.
    shard_keys`), the same on every rank. ``repeat=True``: endless passes, a new draw each
    (training); ``False``: one pass, each sample of the rank once (evaluation). ``epoch`` is the
    epoch the stream starts at (its first pass's draw).
    """

    def __init__(
        self,
        info: DatasetInfo,
        shards: Mapping[str, Sequence[str]],
        mags: Sequence[str],
        *,
        repeat: bool,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        epoch: int = 0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        labelled_only: bool = False,
        check_size: bool = True,
        labelled_slides: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if not mags:
            raise ValueError("no magnification requested")
        self.info = info
        self.shards = {rel: list(keys) for rel, keys in shards.items()}
        self.mags = [info.resolve_mag(m) for m in mags]
        self.repeat = repeat
        self.rank = rank
        self.world_size = world_size
        self.workers = max(1, workers)
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.labelled_only = labelled_only
        self.check_size = check_size
        self.labelled_slides = None if labelled_slides is None else frozenset(labelled_slides)
        self._members = [info.member(m) for m in self.mags]
        self._max_edge = _EDGE_SLACK * max(info.tile_px.values(), default=2048)
        self._class_index = {c: i for i, c in enumerate(info.classes)}

    def norms(self) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
        """``(mean, std)`` of each requested magnification, in order (for the batch step)."""
        return [self.info.mean_std(m) for m in self.mags]

    @property
    def num_samples(self) -> int:
        """Samples of this rank in one pass (from the manifest)."""
        total = sum(len(v) for v in self.shards.values())
        slots = self.world_size * self.workers
        first = self.rank * self.workers
        return sum(
            slot_samples(total, s, slots, train=self.repeat)
            for s in range(first, first + self.workers)
        )

    def _passes(self, slot: int, slots: int) -> Iterator[list[ShardTask]]:
        """The tasks of ``slot`` in each pass: a new draw per pass (training), or the one
        evaluation pass."""
        if not self.repeat:
            yield slot_tasks(self.shards, slot, slots, draw=None)
            return
        for p in itertools.count():
            draw = hash_seed(self.seed, "draw", self.epoch + p)
            yield slot_tasks(self.shards, slot, slots, draw=draw)

    def _raw_samples(self, tasks: Sequence[ShardTask]) -> Iterator[dict]:
        """Undecoded samples of ``tasks`` (one pass): the kept members' bytes plus ``__key__``,
        ``__url__`` and ``__shard__`` (the task's shard rel path)."""
        from sharding.storage import open_storage

        store = open_storage(self.info.url)
        for task in tasks:
            yield from self._read_task(store.child_url(task.rel), task)

    def _read_task(self, url: str, task: ShardTask) -> Iterator[dict]:
        """The samples of one task, in the shard's order; stops once every key of the task is
        found. ShardError when the shard cannot be read or lacks keys of the task."""
        from webdataset.gopen import gopen

        wanted = {*self._members, "json"}
        found = 0
        try:
            stream = gopen(url, "rb")
        except FileNotFoundError:
            raise shard_error(url, "missing, though the manifest lists it") from None
        except _STORAGE_ERRORS as exc:
            raise _unreadable(url, exc) from None
        try:
            samples = iter_samples(stream, wanted, url)
            while found < task.samples:
                try:
                    sample = next(samples, None)
                    # a sample with none of its members wanted carries only its key and url
                    while sample is not None and sample.keys() <= {"__key__", "__url__"}:
                        sample = next(samples, None)
                except (EOFError, ValueError) as exc:  # TarFormatError is a ValueError
                    detail = exc.args[0] if exc.args else type(exc).__name__
                    raise shard_error(url, f"corrupted tar ({detail})") from None
                except _STORAGE_ERRORS as exc:  # S3 reads were already resumed, within a bound
                    raise _unreadable(url, exc) from None
                if sample is None:
                    raise shard_error(
                        url,
                        f"truncated or corrupted: found {found} of the {task.samples} samples "
                        "the manifest lists",
                    )
                if task.keeps(sample["__key__"]):
                    found += 1
                    sample["__shard__"] = task.rel
                    yield sample
        finally:
            stream.close()

    def _label(self, sample: Mapping[str, Any]) -> int:
        """A raw sample's class index, read before any image is decoded: -1 when the sample is
        unlabelled or its slide is not among ``labelled_slides`` (its label is hidden)."""
        key = sample["__key__"]
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            raise shard_error(
                sample["__url__"], f"corrupted: sample {key} has unreadable json"
            ) from None
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
        url = sample["__url__"]
        for mag, member in zip(self.mags, self._members, strict=True):
            if member not in sample:
                raise shard_error(url, f"corrupted: sample {key} has no {member} image")
            data = sample[member]
            try:
                width, height = image_size(data)
            except _BAD_IMAGE as exc:
                raise _undecodable(url, key, member, exc) from None
            self._check_size(url, key, member, mag, width, height)  # before any allocation
            try:
                img = decode_image(data)
            except _BAD_IMAGE as exc:
                raise _undecodable(url, key, member, exc) from None
            if tuple(img.shape[-2:]) != (height, width):
                raise shard_error(
                    url, f"corrupted: sample {key}'s {member} decodes to "
                    f"{img.shape[-1]}x{img.shape[-2]} px, its header says {width}x{height}"
                )  # fmt: skip
            images.append(img)
        return tuple(images), label, key

    def _check_size(
        self, url: str, key: str, member: str, mag: str, width: int, height: int
    ) -> None:
        """ShardError unless a header's size is the tile edge dataset.json gives ``mag`` (or,
        without that check, within ``_EDGE_SLACK`` times the largest tile edge)."""
        want = self.info.tile_px.get(mag) if self.check_size else None
        if want is not None and (width, height) != (want, want):
            raise shard_error(
                url, f"sample {key}'s {member} is {width}x{height} px, dataset.json says "
                f"{want}x{want}"
            )  # fmt: skip
        if want is None and not (0 < width <= self._max_edge and 0 < height <= self._max_edge):
            raise shard_error(
                url, f"sample {key}'s {member} claims {width}x{height} px, over the "
                f"{self._max_edge} px that {_EDGE_SLACK}x the dataset's largest tile allows"
            )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], int, str]]:
        from sharding.storage import register_webdataset_s3

        register_webdataset_s3()
        winfo = get_worker_info()
        wid, nworkers = (winfo.id, winfo.num_workers) if winfo is not None else (0, 1)
        if nworkers != self.workers:
            raise RuntimeError(
                f"stream planned for {self.workers} loader workers is read by {nworkers}"
            )
        slot, slots = self.rank * self.workers + wid, self.world_size * self.workers
        total = sum(len(v) for v in self.shards.values())
        per_pass = slot_samples(total, slot, slots, train=self.repeat)
        if per_pass == 0:
            return
        rng = random.Random(f"{self.seed}:{self.epoch}:{slot}")
        # at most one pass of this slot's samples: a bigger buffer would only delay the first
        # batch and repeat samples within a pass
        size = min(self.shuffle_buffer, per_pass)
        raw = (s for tasks in self._passes(slot, slots) for s in self._raw_samples(tasks))
        # labels are read (and, with labelled_only, unlabelled samples dropped) before decoding:
        # a label-scarce run would otherwise decode the unlabelled majority
        for sample in _shuffle_buffer(self._labelled(raw), size, rng):
            yield self._decode(sample)

    def _labelled(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__label__"] = label = self._label(sample)
            if label >= 0 or not self.labelled_only:
                yield sample
