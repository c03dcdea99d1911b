"""Small datasets that follow the dataset contract exactly, for tests of the training stages.

:func:`write_dataset` writes ``dataset.json``, ``manifest.parquet`` and WebDataset tar shards
(``webdataset.TarWriter``) to a local folder or an ``s3://`` URL, without going through the
sharding pipeline, so readers are tested against the contract itself. Each class has its own
colour and stripe orientation, so a tiny ResNet separates them in a few dozen steps; every
magnification of a sample is the same synthetic region resampled to that magnification's tile
size. Shard counts per split are configurable, including counts that do not divide evenly among
ranks and loader workers, and shards of different sizes.

Fixtures: ``tiny_dataset`` (session, local folder, 2 classes, 10x+5x at 32/16 px) and
``tiny_dataset_s3`` (the same layout uploaded to a fresh bucket of the ``s3_server``).
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sharding.layout import DATASET_JSON, FORMAT_VERSION, MANIFEST, SPLITS, image_member, shard_name
from sharding.magnification import Magnification

#: (R, G, B) base colour per class index; classes beyond the list get a hashed colour.
_PALETTE = [(200, 80, 90), (80, 110, 200), (90, 180, 90), (200, 170, 60), (150, 80, 180)]

DEFAULT_SAMPLES = {"train": 48, "val": 16, "test": 8, "unlabeled": 8}
DEFAULT_SHARDS = {"train": 3, "val": 2, "test": 1, "unlabeled": 1}


def _colour(label: int) -> tuple[int, int, int]:
    if label < len(_PALETTE):
        return _PALETTE[label]
    rng = random.Random(label)
    return tuple(rng.randrange(40, 220) for _ in range(3))  # type: ignore[return-value]


def synth_region(label: int, px: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 ``(px, px, 3)`` region: class colour, class stripe orientation, noise.

    ``label`` -1 (unlabeled) draws a random class's look, as real unlabeled tissue would.
    """
    if label < 0:
        label = int(rng.integers(0, 2))
    base = np.array(_colour(label), dtype=np.float32)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32)
    period = px / 4.0
    phase = rng.uniform(0, 2 * math.pi)
    coord = yy if label % 2 == 0 else xx
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * coord / period + phase)
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def _split_sizes(n: int, shards: int, uneven: bool) -> list[int]:
    """``n`` samples over ``shards`` shards: equal, or proportional to 1, 2, 3, ... when uneven."""
    if shards <= 0:
        return []
    weights = list(range(1, shards + 1)) if uneven else [1] * shards
    total = sum(weights)
    sizes = [max(1, n * w // total) for w in weights]
    sizes[-1] += n - sum(sizes)
    if sizes[-1] < 1:
        raise ValueError(f"{n} samples cannot fill {shards} shards")
    return sizes


def write_dataset(
    root: str | Path,
    *,
    classes: Sequence[str] = ("benign", "tumor"),
    mags: Sequence[str] = ("10x", "5x"),
    tile_px: int = 32,
    samples: Mapping[str, int] | None = None,
    shards: Mapping[str, int] | None = None,
    shard_sizes: Mapping[str, Sequence[int]] | None = None,
    uneven: bool = False,
    fmt: str = "jpeg",
    slides_per_split: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a contract-conforming dataset to ``root`` (local folder or ``s3://``); return dataset.json.

    ``samples`` / ``shards``: per split (defaults :data:`DEFAULT_SAMPLES` / :data:`DEFAULT_SHARDS`);
    a split with 0 samples or shards is left out. ``shard_sizes`` gives exact samples per shard and
    overrides both for the splits it names. ``uneven`` makes shard ``i`` hold about ``i + 1``
    parts of the split. ``mags`` highest first; the highest is ``tile_px`` pixels and each lower
    one ``tile_px * mag / highest`` (must be whole).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from sharding.storage import open_storage

    mag_objs = [Magnification.parse(m) for m in mags]
    names = [m.name for m in mag_objs]
    sizes_px = {m.name: int(round(tile_px * m.power / mag_objs[0].power)) for m in mag_objs}
    classes = sorted(classes)
    samples = dict(DEFAULT_SAMPLES if samples is None else samples)
    shards = dict(DEFAULT_SHARDS if shards is None else shards)
    per_shard: dict[str, list[int]] = {}
    for split in SPLITS:
        if shard_sizes and split in shard_sizes:
            per_shard[split] = [int(v) for v in shard_sizes[split]]
        elif samples.get(split, 0) > 0 and shards.get(split, 0) > 0:
            per_shard[split] = _split_sizes(samples[split], shards[split], uneven)

    rng = np.random.default_rng(seed)
    store = open_storage(str(root))
    rows: list[dict[str, Any]] = []
    sums = {n: np.zeros(3) for n in names}
    sqsums = {n: np.zeros(3) for n in names}
    counts: dict[str, dict[str, Any]] = {}
    size0 = int(round(tile_px * 10.0 / mag_objs[0].power))  # level-0 (10x-equivalent) edge
    with tempfile.TemporaryDirectory(prefix="rdds-") as tmp:
        for split, sizes in per_shard.items():
            n = sum(sizes)
            slides = [f"{split}-slide{j}" for j in range(slides_per_split)]
            slide_label = {
                s: (None if split == "unlabeled" else classes[j % len(classes)])
                for j, s in enumerate(slides)
            }
            items = []
            for i in range(n):
                slide = slides[i % len(slides)]
                x, y = (i // len(slides)) * size0, (i % 7) * size0
                items.append((slide, x, y))
            random.Random(f"{seed}:{split}").shuffle(items)  # slides mixed inside shards
            per_class = dict.fromkeys(classes, 0)
            start = 0
            for index, size in enumerate(sizes):
                rel = shard_name(split, index)
                local = Path(tmp) / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                with wds.TarWriter(str(local)) as sink:
                    for slide, x, y in items[start : start + size]:
                        label = slide_label[slide]
                        label_idx = -1 if label is None else classes.index(label)
                        key = f"{slide}_{x}_{y}"
                        hi = synth_region(label_idx, tile_px, rng)
                        sample: dict[str, Any] = {"__key__": key}
                        row: dict[str, Any] = {
                            "key": key, "slide": slide, "x": x, "y": y, "split": split,
                            "label": label, "patient": None, "tissue": 0.9, "shard": rel,
                        }  # fmt: skip
                        for name in names:
                            img = Image.fromarray(hi)
                            if sizes_px[name] != tile_px:
                                img = img.resize((sizes_px[name],) * 2, Image.Resampling.LANCZOS)
                            data = _encode(img, fmt)
                            sample[image_member(name, fmt)] = data
                            arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) / 255.0
                            mean = arr.reshape(-1, 3).mean(0)
                            sqmean = (arr.reshape(-1, 3) ** 2).mean(0)
                            row[f"mean_{name}"] = mean.astype(np.float32).tolist()
                            row[f"sqmean_{name}"] = sqmean.astype(np.float32).tolist()
                            sums[name] += mean
                            sqsums[name] += sqmean
                        sample["json"] = json.dumps(
                            {
                                "slide": slide,
                                "x": x,
                                "y": y,
                                "size0": size0,
                                "mpp": {m.name: m.mpp for m in mag_objs},
                                "tissue": 0.9,
                                "label": label,
                                "split": split,
                                "patient": None,
                            }  # fmt: skip
                        ).encode()
                        sink.write(sample)
                        rows.append(row)
                        if label is not None:
                            per_class[label] += 1
                start += size
                store.put_file(rel, local)
            counts[split] = {
                "samples": n,
                "slides": len({s for s, _, _ in items}),
                "shards": len(sizes),
                "per_class": per_class if split != "unlabeled" else {},
            }

    # the one definition of the manifest columns, so test data cannot drift from the writer
    from sharding.manifest import manifest_schema

    table = pa.Table.from_pylist(rows, schema=manifest_schema(names))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(MANIFEST, buf.getvalue())

    total = max(1, len(rows))
    normalization = {}
    for name in names:
        mean = sums[name] / total
        std = np.sqrt(np.maximum(sqsums[name] / total - mean**2, 0.0))
        normalization[name] = {"mean": mean.tolist(), "std": std.tolist()}
    doc = {
        "format_version": FORMAT_VERSION,
        "magnifications": names,
        "mpp": {m.name: m.mpp for m in mag_objs},
        "tile_px": sizes_px,
        "image_format": fmt,
        "classes": classes,
        "counts": counts,
        "normalization": normalization,
        "splits": {"train": 0.7, "val": 0.15, "test": 0.15},
        "seed": seed,
        "min_tissue": 0.5,
        "tool": "tests.fixtures_data",
    }
    store.write_bytes(DATASET_JSON, json.dumps(doc, indent=1).encode())
    return doc


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local dataset: 2 classes, 10x (32 px) + 5x (16 px), train 48 in 3 shards, val 16 in 2."""
    root = tmp_path_factory.mktemp("tiny-dataset")
    write_dataset(root)
    return root


@pytest.fixture
def tiny_dataset_s3(s3_bucket: str) -> Iterator[str]:
    """The ``tiny_dataset`` layout in a fresh bucket: yields ``s3://<bucket>/data``."""
    url = f"{s3_bucket}/data"
    write_dataset(url)
    yield url
