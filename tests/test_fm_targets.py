"""A foundation-model teacher checkpoint through the readers that are not training: cached
teacher targets hold its logits and its patch-token grid pooled to a ResNet student's map, its
FLOPs are counted at the backbone's input edge, and its export reproduces it (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resdistill.backbones import BackboneSpec
from resdistill.backbones.geometry import input_geometry
from resdistill.backbones.spec import file_sha256
from resdistill.checkpoint import ModelCard, read_chain, write_checkpoint
from resdistill.data import DatasetInfo
from resdistill.models import build_model
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

ARCH = "timm:vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def fm_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 10x (32 px) dataset and a frozen-ViT teacher checkpoint on it, its weights in a file."""
    import json

    import timm

    root = tmp_path_factory.mktemp("fm-targets")
    write_dataset(root / "ds", samples={"train": 16, "val": 8, "test": 0, "unlabeled": 0},
                  shards={"train": 2, "val": 1, "test": 0, "unlabeled": 0})  # fmt: skip
    info = DatasetInfo.load(str(root / "ds"))
    torch.manual_seed(0)
    path = root / "vit.pth"
    torch.save(timm.create_model(ARCH[5:], num_classes=0, img_size=32, **TINY).state_dict(), path)
    spec = BackboneSpec(arch=ARCH, args=TINY, weights=str(path), sha256=file_sha256(path),
                        frozen=True, input_px=32)  # fmt: skip
    net = build_model(ARCH, info.num_classes, spec.to_dict())
    mean, std = info.mean_std("10x")
    net.set_input_normalization(mean, std)
    card = ModelCard(
        stage="teacher", arch=ARCH, classes=tuple(info.classes), mag="10x", tile_px=32,
        normalization={"mean": list(mean), "std": list(std)}, dataset=str(root / "ds"),
        read_chain=read_chain(json.loads((root / "ds" / "dataset.json").read_text()))
        | input_geometry(net), backbone=spec.to_dict(),
    )  # fmt: skip
    ckpt = root / "teacher" / "checkpoint_epoch0001"
    ckpt.mkdir(parents=True)
    write_checkpoint(ckpt, card=card, state_dict=net.state_dict(), trainer={}, epoch=1,
                     metrics={})  # fmt: skip
    return {"root": root, "data": str(root / "ds"), "ckpt": str(ckpt), "net": net.eval()}


def test_cached_targets_of_a_vit_teacher(fm_teacher: dict[str, Any]) -> None:
    from resdistill.data import BatchPrep, TileStream, shard_keys
    from resdistill.data.info import Dataset
    from resdistill.train.targets import write_targets
    from resdistill.train.targets_config import TargetsConfig

    index = write_targets(TargetsConfig(data=fm_teacher["data"], teacher=fm_teacher["ckpt"],
                                        splits=("train",), local=True))  # fmt: skip
    assert index.sizes == {"5x": (1, 1)}  # a ResNet student's last map on 16 px tiles
    assert index.doc["teacher"]["feature_channels"] == 32
    rel = sorted(index.shards)[0]
    arrays = index.read_shard(rel)
    ds = Dataset.open(fm_teacher["data"])
    keys = shard_keys(ds.manifest(), ["train"])[rel]
    stream = TileStream(ds.info, {rel: keys}, ["10x"], repeat=False)
    tiles, names = zip(*[(img[0], key) for img, _, key in stream], strict=True)
    x = BatchPrep(stream.norms(), owns=True).images([torch.stack(tiles)])[0]
    with torch.no_grad():
        logits, fmap = fm_teacher["net"](x)
    order = [list(arrays["keys"]).index(k) for k in names]
    np.testing.assert_allclose(arrays["logits"][order], logits.numpy(), atol=2e-3, rtol=2e-3)
    pooled = torch.amax(fmap, dim=(2, 3), keepdim=True).numpy()  # 2x2 patch grid -> 1x1
    np.testing.assert_allclose(arrays["feat_5x"][order], pooled, atol=2e-3, rtol=2e-3)


def test_teacher_flops_are_counted_at_the_backbones_input(fm_teacher: dict[str, Any]) -> None:
    """The FM teacher's cost beside a student's in evaluate's compute table: FLOPs of the tile
    mapped to the backbone's input, whatever the tile size."""
    from resdistill.measures.compute import count_flops

    net = fm_teacher["net"]
    at_32 = count_flops(net, (3, 32, 32))
    assert count_flops(net, (3, 96, 96)) == at_32  # resized to 32 px first
    # the backbone at its input edge, plus the linear head (2 FLOPs per multiply-accumulate)
    head = 2 * net.embed_dim * net.num_classes
    assert at_32 == count_flops(net.backbone, (3, 32, 32)) + head


def test_export_of_the_vit_teacher_reproduces_it(
    fm_teacher: dict[str, Any], tmp_path: Path
) -> None:
    from resdistill.checkpoint import load_model
    from resdistill.commands import export as export_cmd
    from resdistill.export.files import read_metadata, run_file
    from tests.test_evaluate import _cli

    out = tmp_path / "teacher.torchscript"
    assert _cli(export_cmd, [fm_teacher["ckpt"], "--out", str(out)]) == 0
    data = out.read_bytes()
    meta = read_metadata(data, "torchscript")
    assert meta["tile_read"]["model_input"]["px"] == 32
    assert meta["read_chain"]["model_input"]["backbone"] == ARCH
    tiles = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    model = load_model(fm_teacher["ckpt"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model.card.mean_std())
    with torch.no_grad():
        want, _ = model.model((torch.from_numpy(tiles).float() / 255.0 - mean) / std)
    logits, _ = run_file(data, "torchscript", tiles)
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)
