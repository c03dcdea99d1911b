"""``predict`` reads a slide the way the dataset its model was trained on was sharded.

Two 40x slides (0.25 um/px, pyramid levels at 4x and 16x subsampled without filtering, as a
scanner's quick pyramid may be) are sharded at 10x, 5x and 2.5x (64/32/16 px) with
``--min-tissue 0.3`` and JPEG quality 80. A 2.5x student checkpoint records the dataset's read
chain. Sharding reads each region at 10x and box-reduces it to 2.5x, then encodes JPEG; a direct
read of the 16x pyramid level gives other pixels, and prediction's own default ``min_tissue``
(0.5) other regions. With the read chain, predict must classify the very tiles of the shard
(decoded the same way: identical pixels) on the same regions, so its tile probabilities equal
``evaluate``'s on those tiles.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from resdistill.checkpoint import load_model, read_chain
from resdistill.commands import predict as predict_cmd
from resdistill.models import build_model
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import _cli, save_checkpoint

pytestmark = pytest.mark.timeout(300)

CLASSES = ("benign", "tumor")
MAG, PX = "2p5x", 16


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """slides/{a,b}.svs, their dataset (both slides in test) and a 2.5x student checkpoint with
    the dataset's read chain."""
    from sharding.pipeline import run_shard

    root = tmp_path_factory.mktemp("readchain")
    (root / "slides").mkdir()
    paths = []
    for i, name in enumerate("ab"):
        img = blob_image(2048, 1536, seed=10 + i)
        paths.append(write_slide(root / "slides" / f"{name}.svs", img, app_mag=40, mpp=0.25))
    (root / "labels.csv").write_text("slide,label\na,benign\nb,tumor\n")
    run_shard(
        paths, str(root / "ds"), mags="10,5,2.5", tile_px=64, labels=root / "labels.csv",
        splits=(0, 0, 1), min_tissue=0.3, quality=80, workers=0, progress=False,
    )  # fmt: skip
    from resdistill.data import DatasetInfo

    desc = json.loads((root / "ds" / "dataset.json").read_text())
    # an all-test dataset has no training statistics: the fallback every reader applies
    mean, std = DatasetInfo.load(str(root / "ds")).mean_std(MAG)
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES))
    with torch.no_grad():  # moderate logits: probabilities that move with the pixels
        model.net.fc.weight.mul_(0.05)
    save_checkpoint(
        root / "ckpt", model, stage="student", mag=MAG, tile_px=PX,
        mean=list(mean), std=list(std), dataset=str(root / "ds"), read_chain=read_chain(desc),
    )  # fmt: skip
    return {"root": root, "ds": root / "ds", "ckpt": root / "ckpt", "slides": root / "slides"}


def shard_tiles(ds: Path, member: str) -> dict[str, bytes]:
    """key -> bytes of ``<key>.<member>`` in every shard of the dataset."""
    out = {}
    for shard in ds.glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == member:
                    out[key] = tar.extractfile(m).read()
    return out


def test_dataset_records_its_jpeg_quality(sharded: dict[str, Path]) -> None:
    desc = json.loads((sharded["ds"] / "dataset.json").read_text())
    assert desc["quality"] == 80
    chain = load_model(sharded["ckpt"]).card.read_chain
    assert chain["quality"] == 80 and chain["min_tissue"] == 0.3
    assert chain["magnifications"] == ["10x", "5x", MAG]


def test_predict_probabilities_match_evaluate_on_the_shard_tiles(
    sharded: dict[str, Path], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from resdistill.data import DatasetInfo
    from resdistill.eval.evaluate import predict_split

    model = load_model(sharded["ckpt"])
    evaluated = predict_split(model, DatasetInfo.load(str(sharded["ds"])), "test", num_workers=0)
    by_key = dict(zip(evaluated.keys, evaluated.probs, strict=True))
    spread = evaluated.probs[:, 1].max() - evaluated.probs[:, 1].min()
    assert spread > 1e-3  # the model's output depends on the pixels
    slides = [str(sharded["slides"] / f"{sid}.svs") for sid in "ab"]
    out = tmp_path / "o"
    assert _cli(predict_cmd, [str(sharded["ckpt"]), *slides, "--out", str(out)]) == 0
    tiles = pq.read_table(out / "tiles.parquet").to_pandas()
    for sid in "ab":
        mine = tiles[tiles["slide"] == sid]
        keys = [f"{sid}_{x}_{y}" for x, y in zip(mine["x"], mine["y"], strict=True)]
        assert sorted(keys) == sorted(k for k in by_key if k.startswith(f"{sid}_"))
        expected = np.array([by_key[k] for k in keys])
        probs = mine[[f"p_{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert json.loads((out / f"{sid}.json").read_text())["min_tissue"] == 0.3


def test_predict_classifies_the_shard_tile(sharded: dict[str, Path]) -> None:
    """The tile predict feeds the model is the shard's, decoded the same way: equal pixels."""
    from resdistill.data import decode_image
    from resdistill.read_chain import chain_of, plan_tiles, read_tiles
    from sharding.slide import open_slide

    model = load_model(sharded["ckpt"])
    chain = chain_of(model)
    stored = shard_tiles(sharded["ds"], f"{MAG}.jpg")
    path = str(sharded["slides"] / "a.svs")
    slide = open_slide(path)
    try:
        plan = plan_tiles(slide, path, chain)
        idx = np.flatnonzero(plan.keep)
        tiles = read_tiles(slide, plan, chain, idx)
    finally:
        slide.close()
    assert tiles.shape == (idx.size, PX, PX, 3) and tiles.dtype == np.uint8
    for i, tile in zip(idx, tiles, strict=True):
        want = decode_image(stored[f"a_{plan.xs[i]}_{plan.ys[i]}"]).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(tile, want)


def test_old_checkpoint_reads_the_pyramid_and_says_so_once(
    sharded: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    old = save_checkpoint(
        tmp_path / "old", build_model("resnet18", len(CLASSES)), stage="student", mag=MAG,
        tile_px=PX,
    )  # fmt: skip
    slides = [str(sharded["slides"] / f"{s}.svs") for s in "ab"]
    rc = _cli(predict_cmd, [str(old), *slides, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 0
    assert err.count("no read chain") == 1, err
    doc = json.loads((tmp_path / "o" / "a.json").read_text())
    assert doc["read_chain"]["source"] == "pyramid"
    assert doc["min_tissue"] == 0.5
