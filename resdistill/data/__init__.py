"""Streaming tiles from a sharded dataset (local folder or ``s3://``) into PyTorch batches.

One place for everything a training stage reads (teacher, distillation, evaluation):

* :mod:`~resdistill.data.info` - :class:`DatasetInfo` (``dataset.json``), :class:`Dataset` (a
  dataset opened once: storage, info, manifest) and :func:`read_manifest`.
* :mod:`~resdistill.data.sample_plan` - which samples each (rank, loader worker) slot reads in
  each pass, a uniform draw per training pass, taken from ``manifest.parquet`` (never by listing
  a folder), and the equal steps per epoch.
* :mod:`~resdistill.data.augment` - paired augmentation of batches (one draw per sample, shared
  by every image of that sample).
* :mod:`~resdistill.data.stream` - :class:`TileStream`, an ``IterableDataset`` over webdataset tar
  shards that decodes (to uint8) only the magnifications a stage asks for, after its label filter.
* :mod:`~resdistill.data.prepare` - :class:`BatchPrep`: a uint8 batch to the model's input on the
  training device (augmentation, stain and per-magnification normalisation, vectorised).
* :mod:`~resdistill.data.loader` - :class:`StreamLoader` / :func:`make_loader`: batches; in
  training mode every rank yields exactly :func:`steps_per_epoch` batches per epoch.
* :mod:`~resdistill.data.errors` - :class:`ShardError`, a shard that cannot be read (one line).
* :mod:`~resdistill.data.targets` - the cached teacher targets' format on storage (no torch), and
  :mod:`~resdistill.data.cached` - those targets as another source of the same loader.
"""

from .augment import (
    DEFAULT_JITTER,
    Augment,
    GeometricAugment,
    PairedAugment,
    colour_jitter,
    flip_rotate,
    hue_matrix,
)
from .errors import ShardError
from .info import READ_COLUMNS, Dataset, DatasetInfo, read_manifest, slide_patients
from .loader import Batch, Source, StreamLoader, collate, make_loader
from .prepare import BatchPrep
from .sample_plan import (
    ShardTask,
    hash_seed,
    select_labelled_slides,
    select_train_slides,
    shard_keys,
    slot_samples,
    slot_tasks,
    steps_per_epoch,
    workers_per_rank,
)
from .stream import TileStream, decode_image

__all__ = [
    "DEFAULT_JITTER",
    "READ_COLUMNS",
    "Augment",
    "Batch",
    "BatchPrep",
    "Dataset",
    "DatasetInfo",
    "GeometricAugment",
    "PairedAugment",
    "ShardError",
    "ShardTask",
    "Source",
    "StreamLoader",
    "TileStream",
    "collate",
    "colour_jitter",
    "decode_image",
    "flip_rotate",
    "hash_seed",
    "hue_matrix",
    "make_loader",
    "read_manifest",
    "slide_patients",
    "select_labelled_slides",
    "select_train_slides",
    "shard_keys",
    "slot_samples",
    "slot_tasks",
    "steps_per_epoch",
    "workers_per_rank",
]
