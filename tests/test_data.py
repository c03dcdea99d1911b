"""The streaming data layer: dataset.json, shard plans, loaders, paired augmentation, models."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from resdistill.data import (
    Dataset,
    DatasetInfo,
    PairedAugment,
    colour_jitter,
    hue_matrix,
    make_loader,
    read_manifest,
    shard_keys,
    slot_samples,
    slot_tasks,
    steps_per_epoch,
    workers_per_rank,
)
from resdistill.models import ARCHITECTURES, build_model
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.timeout(300)


def _manifest_keys(root: str | Path, split: str) -> list[str]:
    table = read_manifest(str(root))
    cols = table.to_pydict()
    return sorted(k for k, s in zip(cols["key"], cols["split"], strict=True) if s == split)


# ---------------------------------------------------------------------------------------------
# dataset.json
# ---------------------------------------------------------------------------------------------


def test_dataset_info_reads_contract(tiny_dataset: Path) -> None:
    info = DatasetInfo.load(str(tiny_dataset))
    assert info.magnifications == ("10x", "5x")
    assert info.highest == "10x"
    assert info.classes == ("benign", "tumor")
    assert info.num_classes == 2
    assert dict(info.tile_px) == {"10x": 32, "5x": 16}
    assert info.resolve_mag("5") == "5x" and info.resolve_mag("10x") == "10x"
    with pytest.raises(ValueError, match="2.5x is not in"):
        info.resolve_mag("2.5x")
    mean, std = info.mean_std("10x")
    assert len(mean) == 3 and all(0 < s < 1 for s in std)
    assert info.member("5x") == "5x.jpg"


def test_missing_dataset_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.json"):
        DatasetInfo.load(str(tmp_path))


def test_dataset_handle_reads_each_file_once(tiny_dataset: Path, monkeypatch) -> None:
    """A Dataset opened once answers info, manifest (any columns), its sha256 and a loader's plan
    with one read of dataset.json and one of manifest.parquet."""
    import hashlib
    from collections import Counter

    from sharding.layout import MANIFEST
    from sharding.storage import open_storage

    store = open_storage(str(tiny_dataset))
    reads: Counter[str] = Counter()
    real = store.read_bytes

    def counting(rel: str) -> bytes:
        reads[rel] += 1
        return real(rel)

    monkeypatch.setattr(store, "read_bytes", counting)
    ds = Dataset.open(store)
    assert ds.info == DatasetInfo.load(str(tiny_dataset)) and ds.url == ds.info.url
    assert ds.manifest().equals(read_manifest(str(tiny_dataset)))
    assert ds.manifest(["split"]).column_names == ["split"]
    assert ds.manifest_sha256 == hashlib.sha256((tiny_dataset / MANIFEST).read_bytes()).hexdigest()
    loader = make_loader(ds, ["val"], ["10x"], batch_size=4, train=False, num_workers=0)
    assert sorted(k for b in loader.epoch() for k in b.keys) == _manifest_keys(tiny_dataset, "val")
    assert reads == {"dataset.json": 1, MANIFEST: 1}


# ---------------------------------------------------------------------------------------------
# Shard plans
# ---------------------------------------------------------------------------------------------


def _fake_shards(sizes: list[int]) -> dict[str, list[str]]:
    return {
        f"train/shard-{i:06d}.tar": [f"s{i}_{j}_0" for j in range(n)] for i, n in enumerate(sizes)
    }


@pytest.mark.parametrize(
    "sizes", [[10], [3, 17, 6], [5, 5, 5, 5], [1, 40, 2, 9, 13], [7, 7, 7, 7, 7, 7, 7]]
)
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6])
def test_slot_plans_are_disjoint_and_cover_every_sample(sizes: list[int], slots: int) -> None:
    shards = _fake_shards(sizes)
    every = sorted(itertools.chain.from_iterable(shards.values()))
    n = len(every)
    seen: list[str] = []
    for slot in range(slots):  # evaluation: every sample exactly once, ranges of N//S or N//S+1
        tasks = slot_tasks(shards, slot, slots, draw=None)
        for task in tasks:
            assert task.keys <= set(shards[task.rel])
        got = [k for t in tasks for k in t.keys]
        assert len(got) == slot_samples(n, slot, slots, train=False) in (n // slots, -(-n // slots))
        seen += got
    assert sorted(seen) == every
    for draw in range(5):  # training: disjoint, exactly N//S per slot, a new draw per pass
        seen = []
        for slot in range(slots):
            got = [k for t in slot_tasks(shards, slot, slots, draw=draw) for k in t.keys]
            assert len(got) == n // slots == slot_samples(n, slot, slots, train=True)
            seen += got
        assert len(seen) == len(set(seen)) == slots * (n // slots)


def test_a_slot_reads_only_the_shards_its_range_touches() -> None:
    shards = _fake_shards([50] * 8)  # 400 samples, 4 slots of 100: at most 3 shards each
    for draw in range(10):
        for slot in range(4):
            tasks = slot_tasks(shards, slot, 4, draw=draw)
            assert len(tasks) <= 3 and len({t.rel for t in tasks}) == len(tasks)
    assert [t.rel for t in slot_tasks(shards, 1, 4, draw=None)] == [
        "train/shard-000002.tar",
        "train/shard-000003.tar",
    ]


def test_draws_change_per_pass_and_repeat_per_seed() -> None:
    shards = _fake_shards([30, 3])
    first = slot_tasks(shards, 0, 2, draw=1)
    assert first == slot_tasks(shards, 0, 2, draw=1)
    assert any(slot_tasks(shards, 0, 2, draw=d) != first for d in range(2, 6))


def test_workers_per_rank() -> None:
    assert workers_per_rank(100, 2, 4) == 4
    assert workers_per_rank(3, 2, 4) == 1  # never a slot without a sample
    assert workers_per_rank(1, 2, 4) == 0  # fewer samples than ranks: read in process


def test_shard_keys_select_splits_and_labels(tiny_dataset: Path) -> None:
    manifest = read_manifest(str(tiny_dataset))
    both = shard_keys(manifest, ["train", "unlabeled"])
    labelled = shard_keys(manifest, ["train", "unlabeled"], labelled_only=True)
    assert sum(map(len, both.values())) == 48 + 8
    assert sorted(itertools.chain.from_iterable(labelled.values())) == _manifest_keys(
        tiny_dataset, "train"
    )
    assert all(rel.startswith(("train/", "unlabeled/")) for rel in both)
    with pytest.raises(ValueError, match="unknown split"):
        shard_keys(manifest, ["training"])


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(26, 2, 4) == 3
    with pytest.raises(ValueError, match="fewer than one batch"):
        steps_per_epoch(7, 2, 4)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,loader_workers", [(1, 0), (2, 2), (3, 1), (4, 3)])
def test_eval_loaders_read_each_sample_once_over_all_ranks(
    tiny_dataset: Path, world: int, loader_workers: int
) -> None:
    info = DatasetInfo.load(str(tiny_dataset))
    keys: list[str] = []
    for rank in range(world):
        loader = make_loader(
            info,
            ["train"],
            ["10x"],
            batch_size=5,
            train=False,
            rank=rank,
            world_size=world,
            num_workers=loader_workers,
        )
        got = [k for batch in loader.epoch() for k in batch.keys]
        assert len(got) == loader.num_samples
        keys += got
        loader.close()
    assert sorted(keys) == _manifest_keys(tiny_dataset, "train")


def test_samples_decode_only_requested_mags_in_order(tiny_dataset: Path) -> None:
    info = DatasetInfo.load(str(tiny_dataset))
    pair = make_loader(info, ["val"], ["5x", "10x"], batch_size=4, train=False, num_workers=0)
    batch = next(iter(pair.epoch()))
    assert [tuple(t.shape) for t in batch.images] == [(4, 3, 16, 16), (4, 3, 32, 32)]
    assert batch.images[0].dtype == torch.float32
    assert set(batch.labels.tolist()) <= {0, 1}
    single = make_loader(info, ["unlabeled"], ["5x"], batch_size=4, train=False, num_workers=0)
    batch = next(iter(single.epoch()))
    assert len(batch.images) == 1
    assert batch.labels.tolist() == [-1] * 4  # null labels


def test_normalisation_uses_dataset_statistics(tiny_dataset: Path) -> None:
    info = DatasetInfo.load(str(tiny_dataset))
    pixels = []
    for split in ("train", "val", "test", "unlabeled"):
        loader = make_loader(info, [split], ["10x"], batch_size=16, train=False, num_workers=0)
        pixels += [b.images[0] for b in loader.epoch()]
    x = torch.cat(pixels).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(x.mean(1), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(1), torch.ones(3), atol=1e-2)


@pytest.mark.parametrize("world", [2, 4])
def test_train_loaders_give_every_rank_the_same_steps_with_uneven_shards(
    tmp_path: Path, world: int
) -> None:
    root = tmp_path / "uneven"
    write_dataset(root, shard_sizes={"train": [3, 17, 6], "val": [4]})
    info = DatasetInfo.load(str(root))
    steps = steps_per_epoch(26, world, 2)
    for rank in range(world):
        loader = make_loader(
            info,
            ["train"],
            ["10x", "5x"],
            batch_size=2,
            train=True,
            rank=rank,
            world_size=world,
            num_workers=2,
            shuffle_buffer=8,
            augment=PairedAugment(),
        )
        assert loader.steps == steps
        for _epoch in range(2):  # the source is endless: a short rank cycles, never runs dry
            batches = list(loader.epoch())
            assert len(batches) == steps
            assert all(len(b) == 2 for b in batches)
        loader.close()


def test_train_loader_shuffles_and_covers_the_rank(tiny_dataset: Path) -> None:
    info = DatasetInfo.load(str(tiny_dataset))
    loader = make_loader(
        info, ["train"], ["10x"], batch_size=4, train=True, num_workers=1, shuffle_buffer=16
    )
    assert loader.steps == 48 // 4
    keys = [k for b in loader.epoch() for k in b.keys]
    loader.close()
    manifest = _manifest_keys(tiny_dataset, "train")
    assert len(keys) == 48 and set(keys) <= set(manifest)
    assert len(set(keys)) > 30  # a buffer of 16 < the data: mostly one pass
    ordered = make_loader(info, ["train"], ["10x"], batch_size=4, train=False, num_workers=1)
    assert keys != [k for b in ordered.epoch() for k in b.keys]


def test_s3_loader_matches_local(tiny_dataset_s3: str, tmp_path: Path) -> None:
    info = DatasetInfo.load(tiny_dataset_s3)
    assert info.url == tiny_dataset_s3
    keys = []
    for rank in range(2):
        loader = make_loader(
            info, ["train"], ["10x", "5x"], batch_size=8, train=False, rank=rank, world_size=2,
            num_workers=2,
        )  # fmt: skip
        keys += [k for b in loader.epoch() for k in b.keys]
        loader.close()
    local = tmp_path / "same"
    write_dataset(local)  # same seed and layout as the S3 copy
    assert sorted(keys) == _manifest_keys(local, "train")


# ---------------------------------------------------------------------------------------------
# Paired augmentation
# ---------------------------------------------------------------------------------------------


def _random_image(px: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, px, px), dtype=torch.uint8, generator=g)


def test_paired_augment_applies_one_draw_to_every_image() -> None:
    aug = PairedAugment(jitter=(0.5, 0.5, 0.5, 0.2))
    img = _random_image(16, 0)
    outs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a, b = aug(img, img.clone())
        assert torch.equal(a, b)  # same flips, rotation and jitter factors
        outs.add(a.numpy().tobytes())
    assert len(outs) > 6  # and the draws differ between calls


def test_paired_geometry_commutes_with_downsampling() -> None:
    aug = PairedAugment(jitter=(0, 0, 0, 0))
    high = _random_image(32, 1)
    low = torch.nn.functional.avg_pool2d(high[None].float(), 2)[0]
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        h, lo = aug(high.float(), low)
        assert torch.allclose(torch.nn.functional.avg_pool2d(h[None], 2)[0], lo)
        seen.add(h.numpy().tobytes())
    assert len(seen) >= 4  # several of the 8 flips/rotations occurred


def test_colour_jitter_formulas() -> None:
    assert torch.allclose(hue_matrix(0.0), torch.eye(3), atol=1e-6)
    assert torch.allclose(hue_matrix(0.25) @ hue_matrix(0.25), hue_matrix(0.5), atol=1e-5)
    batched = hue_matrix(torch.tensor([0.0, 0.25], dtype=torch.float64))
    assert batched.shape == (2, 3, 3) and torch.allclose(batched[1], hue_matrix(0.25))
    grey = torch.full((3, 4, 4), 0.4)
    rotated = torch.einsum("ij,jhw->ihw", hue_matrix(0.3), grey)
    assert torch.allclose(rotated, grey, atol=1e-5)  # hue leaves greys alone
    x = torch.rand(2, 3, 8, 8) * 0.5
    one, zero = torch.ones(2), torch.zeros(2)

    def jit(b, c, s, h):
        return colour_jitter(x.clone(), b, c, s, h)

    assert torch.allclose(jit(one * 1.5, one, one, zero), x * 1.5)
    # per-sample factors: sample 0 brightened, sample 1 untouched
    out = jit(torch.tensor([1.5, 1.0]), one, one, zero)
    assert torch.allclose(out[0], x[0] * 1.5) and torch.allclose(out[1], x[1])
    out = jit(one, zero, one, zero)  # contrast 0: flat grey
    assert torch.allclose(out[0], out[0].mean().expand_as(out[0]), atol=1e-6)
    out = jit(one, one, zero, zero)  # saturation 0: grey
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    hue = jit(one, one, one, torch.tensor([0.3, 0.0]))
    assert not torch.allclose(hue[0], x[0], atol=1e-3) and torch.allclose(hue[1], x[1], atol=1e-6)
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for seed in range(5):
        torch.manual_seed(seed)
        (y,) = PairedAugment(jitter=(0.9, 0.9, 0.9, 0.5))(img)
        assert y.dtype == torch.float32 and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(ValueError, match="hue"):
        PairedAugment(jitter=(0.1, 0.1, 0.1, 0.7))


def test_batch_augment_draws_per_sample_and_shares_them_across_magnifications() -> None:
    """On a batch each sample gets its own draw, and a sample's tiles at every magnification the
    same one: the augmented high tile, box-reduced, is the augmented low tile."""
    # mid-range values, so no jitter reaches the clamp (which does not commute with reduction)
    high = torch.randint(90, 160, (32, 3, 16, 16), dtype=torch.uint8)
    high[:] = high[0]  # every sample the same image: any difference comes from the draws
    low = torch.nn.functional.avg_pool2d(high.float(), 2).div(255.0)
    aug = PairedAugment(jitter=(0.3, 0.3, 0.3, 0.1))
    h, lo = aug(high, low, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.nn.functional.avg_pool2d(h, 2), lo, atol=1e-5)
    assert len({h[i].numpy().tobytes() for i in range(32)}) > 20
    again = aug(high, low, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], h)  # seeded by the generator


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_models_return_logits_and_last_feature_map(arch: str) -> None:
    model = build_model(arch, num_classes=3).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    assert feats.shape == (2, ARCHITECTURES[arch], 2, 2)
    assert model.feature_channels == ARCHITECTURES[arch]
    with torch.no_grad():  # logits are the head applied to the returned features
        assert torch.allclose(model.head(feats), logits, atol=1e-5)


def test_tiny_tiles_give_a_1x1_feature_map() -> None:
    logits, feats = build_model("resnet18", 2).eval()(torch.randn(1, 3, 28, 28))
    assert feats.shape[-2:] == (1, 1) and logits.shape == (1, 2)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg16", 2)


def test_batch_prep_normalises_per_magnification_and_leaves_a_borrowed_batch_alone() -> None:
    """BatchPrep: uint8 tiles -> (x / 255 - mean_m) / std_m for each magnification's own
    statistics; 4-D extras (stored feature maps) get the tiles' flips, others pass through; a
    batch it does not own is copied, never changed in place."""
    from resdistill.data import Batch, BatchPrep, GeometricAugment

    g = torch.Generator().manual_seed(0)
    hi = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    lo = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=g)
    logits, fmap = torch.randn(6, 2), hi[:, :1].float()  # the map is the tile's first channel
    batch = Batch((hi, lo, logits, fmap), torch.zeros(6, dtype=torch.long), list("abcdef"))
    keep = [t.clone() for t in batch.images]
    norms = [((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))]
    plain = BatchPrep(norms)(batch)
    for x, raw, (mean, std) in zip(plain.images[:2], (hi, lo), norms, strict=True):
        want = (raw.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
            3, 1, 1
        )
        assert torch.allclose(x, want, atol=1e-6)
    assert torch.equal(plain.images[2], logits) and torch.equal(plain.images[3], fmap)
    flipped = BatchPrep(norms, augment=GeometricAugment(), generator=g)(batch)
    std0, mean0 = torch.tensor(norms[0][1]).view(3, 1, 1), torch.tensor(norms[0][0]).view(3, 1, 1)
    tile = ((flipped.images[0] * std0 + mean0) * 255).round()
    assert not torch.equal(flipped.images[0], plain.images[0])  # some sample was flipped
    assert torch.allclose(tile[:, :1], flipped.images[3])  # and its map moved with its tile
    assert torch.equal(flipped.images[2], logits)
    assert all(torch.equal(a, b) for a, b in zip(batch.images, keep, strict=True))
