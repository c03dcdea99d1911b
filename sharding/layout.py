"""The dataset contract: names and files that the sharding stage writes and every reader relies on.

A dataset rooted at ``ROOT`` (a local folder or ``s3://bucket/prefix``) holds::

    ROOT/dataset.json                 magnifications, tile sizes, classes, counts, mean/std per mag
    ROOT/manifest.parquet             one row per sample (MANIFEST_COLUMNS); the source of truth
    ROOT/<split>/shard-NNNNNN.tar     WebDataset shards; a sample is one region at every mag
    ROOT/_state/...                   resume bookkeeping of the writer; readers ignore it
    ROOT/_state/qc/<slide>.png        QC picture of each slide's tissue detection (sharding.qc)

Readers take the list of shards from ``manifest.parquet`` (never by listing the folder), so shards
published by a run that has not finished yet are invisible until the manifest names them.

A sample is the members of one tar sharing the key ``<slide>_<x>_<y>`` (level-0 pixel coordinates
of the region's top-left corner): ``<mag>.jpg`` (or ``.png``) for each magnification, named by
:attr:`sharding.magnification.Magnification.name`, and ``json`` with :data:`SAMPLE_JSON_FIELDS`.
"""

from __future__ import annotations

import re

#: Splits, in the order they are reported. Labelled slides go to train/val/test (by slide, or by
#: patient when given); a slide with no label goes to its patient's split when that patient has
#: labelled slides (so no image of a test patient reaches distillation), else to ``unlabeled``
#: (used by distillation only). A labelled slide's regions that its annotations leave
#: unlabelled stay in its split, label null.
SPLITS = ("train", "val", "test", "unlabeled")
LABELLED_SPLITS = SPLITS[:3]

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
STATE_DIR = "_state"
SHARD_PREFIX = "shard"
FORMAT_VERSION = 1

#: Fields of each sample's ``json`` member.
SAMPLE_JSON_FIELDS = (
    "slide",  # slide id (see slide_id)
    "x",  # level-0 x of the region's top-left corner
    "y",  # level-0 y
    "size0",  # region edge in level-0 pixels
    "mpp",  # {mag name: microns per pixel of that image}
    "tissue",  # tissue fraction of the region in [0, 1]
    "label",  # class name or null
    "label_source",  # one of LABEL_SOURCES, or null when the label is null and no annotation
    "split",  # one of SPLITS
    "patient",  # patient id or null
)

#: Where a sample's label comes from: the slide's row in the labels CSV, or the slide's region
#: annotations (which then decide every region of the slide, leaving uncovered ones unlabelled).
LABEL_SOURCES = ("slide", "annotation")

#: Columns of manifest.parquet. ``mean_<mag>`` / ``sqmean_<mag>`` hold per-channel means of the
#: image and of its square (RGB scaled to [0, 1]); dataset.json's mean/std derive from them.
#: ``ink`` is the fraction of the region that marker ink (or a black border) covers, as the tissue
#: detector found it on the thumbnail (null in fragments written before the column existed).
#: ``ann_<class>`` (ANN_PREFIX) holds, for each class of the dataset's annotations, the fraction of
#: the region that class's polygons cover (null on slides without annotations).
#: ``slide_uri``, ``slide_size`` and ``slide_sha256`` say which file the sample was cut from: its
#: absolute path or s3:// URL, its size and its fingerprint (sharding.slide_identity; null in
#: fragments written before the columns existed).
MANIFEST_COLUMNS = (
    "key", "slide", "x", "y", "split", "label", "label_source", "patient", "tissue", "ink",
    "shard", "slide_uri", "slide_size", "slide_sha256",
)  # fmt: skip
ANN_PREFIX = "ann_"

_SLIDE_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(slide: str, x: int, y: int) -> str:
    """``<slide>_<x>_<y>``: unique per region, dot-free so webdataset keeps members together."""
    return f"{slide}_{int(x)}_{int(y)}"


def image_member(mag_name: str, fmt: str) -> str:
    """Member extension of one magnification's image, e.g. ``10x.jpg`` or ``2p5x.png``."""
    return f"{mag_name}.{'jpg' if fmt == 'jpeg' else fmt}"


def shard_name(split: str, index: int) -> str:
    """Relative path of shard ``index`` in ``split``: ``train/shard-000012.tar``."""
    return f"{split}/{SHARD_PREFIX}-{index:06d}.tar"


class UnsafeNameError(ValueError):
    """A slide name that cannot be used as a key or a storage path component."""


def slide_id(name: str) -> str:
    """The slide id used in keys and paths, from a file stem or a labels-CSV entry.

    Letters, digits, ``_`` and ``-`` are kept; any other character (a dot in a TCGA barcode, a
    space) becomes ``-``, so two names can fold to one id (``A.1`` and ``A-1``): the ids of a
    run's slides are settled by :mod:`sharding.slide_ids`, never taken from the name alone. Names that could address anything outside the output prefix (path
    separators, ``..``, a leading dot, control characters, empty) are refused.
    """
    if (
        not name
        or name.strip() != name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or ".." in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise UnsafeNameError(
            f"slide name {name!r} could escape the output prefix (path separator, '..', leading "
            "dot, control character or empty): rename the file or fix the labels CSV"
        )
    return _SLIDE_ID_BAD.sub("-", name)


#: Hex digits of a slide's fingerprint that :func:`suffixed_id` appends.
SUFFIX_HEX = 8


def suffixed_id(sid: str, sha256: str) -> str:
    """The id ``--on-conflict suffix`` gives a slide whose id ``sid`` another slide holds:
    ``<sid>-<first 8 hex digits of its fingerprint>`` (see :mod:`sharding.slide_identity`), so it
    depends on the slide's bytes only and every rerun gives it the same id."""
    return f"{sid}-{sha256[:SUFFIX_HEX]}"
