"""timm backbones and local weights files: every format and key layout loads the same tensors,
a frozen file-backed backbone stays out of checkpoints, the input geometry and the feature grid
are what the docs say, and every refusal is one line (nothing downloads, ever).

All networks are tiny timm models at random initialisation: a two-block ViT (32-d tokens, 16 px
patches on a 32 px input: a 2x2 grid) and ``resnet10t``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill.backbones import BackboneSpec, WeightsError, backbone_spec
from resdistill.backbones.spec import file_sha256
from resdistill.config import ModelConfig
from resdistill.models import build_model

VIT = "timm:vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
PX = 32


def tiny_vit(**extra: Any) -> torch.nn.Module:
    import timm

    return timm.create_model(VIT[5:], num_classes=0, img_size=PX, **TINY, **extra)


def vit_spec(path: Path, **kw: Any) -> BackboneSpec:
    return BackboneSpec(arch=VIT, args=dict(TINY), weights=str(path), sha256=file_sha256(path),
                        input_px=PX, **kw)  # fmt: skip


def save(path: Path, doc: Any) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(doc, str(path))
    else:
        torch.save(doc, path)
    return path


def layouts(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The key layouts real checkpoints come in, by file name."""
    head = {"head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    return {
        "plain.safetensors": sd,
        "plain.pth": sd,
        "ddp.bin": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        # UNI-like: nested under "model", every key prefixed, a pretraining head left in
        "uni_like.pth": {
            "model": {f"model.{k}": v for k, v in {**sd, **head}.items()},
            "epoch": 99,
        },  # fmt: skip
        "compiled.safetensors": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }


def test_every_format_and_key_layout_loads_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = tiny_vit()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, PX, PX)
    for name, doc in layouts(sd).items():
        path = save(tmp_path / name, doc)
        net = build_model(VIT, 3, vit_spec(path).to_dict(), pretrained=True)
        for k, v in sd.items():
            assert torch.equal(net.backbone.state_dict()[k], v), (name, k)
        assert net.dropped_head_keys == (["head.weight", "head.bias"] if "uni" in name else [])
        with torch.no_grad():
            assert torch.allclose(net.embed(x), ref.forward_head(ref.forward_features(x), True))


def test_frozen_file_backed_backbone_is_not_in_the_checkpoint(tmp_path: Path) -> None:
    from resdistill.checkpoint import ModelCard, load_model, write_checkpoint

    torch.manual_seed(0)
    path = save(tmp_path / "w.safetensors", tiny_vit().state_dict())
    spec = vit_spec(path, frozen=True, licence="CC-BY-NC-ND (the user's)")
    net = build_model(VIT, 2, spec.to_dict())
    net.set_input_normalization((0.7, 0.5, 0.6), (0.2, 0.15, 0.1))
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.classifier.parameters())
    net.train()
    assert not net.backbone.training  # frozen: eval mode whatever train() says
    keys = set(net.state_dict())
    assert keys == {"in_scale", "in_shift", "classifier.weight", "classifier.bias"}
    folder = tmp_path / "ckpt"
    folder.mkdir()
    card = ModelCard(stage="teacher", arch=VIT, classes=("a", "b"), mag="10x", tile_px=64,
                     backbone=spec.to_dict())  # fmt: skip
    write_checkpoint(folder, card=card, state_dict=net.state_dict(), trainer={}, epoch=1,
                     metrics={})  # fmt: skip
    assert (folder / "model.pt").stat().st_size < path.stat().st_size / 4
    loaded = load_model(folder)
    assert loaded.card.backbone["sha256"] == file_sha256(path)
    assert loaded.card.backbone["licence"] == "CC-BY-NC-ND (the user's)"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], net.eval()(x)[0])

    # the weights moved: refused in one line, found again through RESDISTILL_WEIGHTS_DIR
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    path.rename(moved / path.name)
    from resdistill.errors import CheckpointError

    with pytest.raises(CheckpointError, match="RESDISTILL_WEIGHTS_DIR") as err:
        load_model(folder)
    assert "\n" not in str(err.value)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESDISTILL_WEIGHTS_DIR", str(moved))
        assert load_model(folder).card.arch == VIT
    # other bytes under the recorded name: refused by sha256
    save(tmp_path / "w.safetensors", tiny_vit().state_dict())
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(folder)


def test_input_geometry_renormalises_then_resizes() -> None:
    """``net(x)`` for ``x`` normalised with the dataset's statistics equals the backbone fed the
    tile normalised with its own and resized to its input edge."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = build_model(VIT, 2, BackboneSpec(arch=VIT, args=TINY, input_px=PX).to_dict()).eval()
    dm, ds = (0.7, 0.5, 0.6), (0.2, 0.15, 0.1)
    net.set_input_normalization(dm, ds)
    tile = torch.rand(2, 3, 64, 64)
    as_trained = (tile - torch.tensor(dm).view(1, 3, 1, 1)) / torch.tensor(ds).view(1, 3, 1, 1)
    fm_m, fm_s = (torch.tensor(v).view(1, 3, 1, 1) for v in (net.fm_mean, net.fm_std))
    own = F.interpolate((tile - fm_m) / fm_s, size=(PX, PX), mode="bilinear",
                        align_corners=False, antialias=True)  # fmt: skip
    with torch.no_grad():
        want = net.classifier(net.backbone.forward_head(net.backbone.forward_features(own), True))
        assert torch.allclose(net(as_trained)[0], want, atol=1e-5)
    from resdistill.backbones.geometry import input_geometry

    geo = input_geometry(net)["model_input"]
    assert geo["px"] == PX and geo["mean"] == pytest.approx(net.fm_mean)
    assert input_geometry(build_model("resnet18", 2)) == {}


def test_patch_tokens_become_the_feature_grid() -> None:
    """Prefix tokens (CLS and registers) are dropped; the patch tokens, row-major, are the map."""
    torch.manual_seed(0)
    args = {**TINY, "reg_tokens": 2}
    net = build_model(VIT, 2, BackboneSpec(arch=VIT, args=args, input_px=PX).to_dict()).eval()
    assert net.prefix_tokens == 3
    x = torch.randn(2, 3, PX, PX)
    with torch.no_grad():
        tokens = net.backbone.forward_features(net.prepare(x))
        _, fmap = net(x)
    assert fmap.shape == (2, 32, 2, 2) and net.spatial_features
    assert torch.equal(fmap[:, :, 0, 1], tokens[:, 3 + 1])  # row 0, column 1: patch token 1
    assert torch.equal(fmap[:, :, 1, 0], tokens[:, 3 + 2])
    # a backbone that gives only a pooled embedding: a 1x1 map, and no spatial features
    emb = torch.randn(2, 32)
    assert net.grid(emb, x, emb).shape == (2, 32, 1, 1) and not net.spatial_features


def test_cnn_backbone_and_resnet_start_from_files(tmp_path: Path) -> None:
    import timm
    import torchvision

    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t", num_classes=1000)  # a classifier over 1000 classes
    path = save(tmp_path / "r10t.pth", cnn.state_dict())
    spec = BackboneSpec(arch="timm:resnet10t", weights=str(path), sha256=file_sha256(path))
    net = build_model(spec.arch, 3, spec.to_dict(), pretrained=True)
    assert torch.equal(net.backbone.conv1[0].weight, cnn.conv1[0].weight)
    assert net.input_px == 0  # a CNN takes its tile as cut
    logits, fmap = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and fmap.shape == (2, 512, 2, 2)
    # an ImageNet torchvision ResNet file for a 3-class student: its fc is not taken
    tv = torchvision.models.resnet18(weights=None)
    path = save(tmp_path / "r18.pth", {"state_dict": tv.state_dict()})
    spec = BackboneSpec(arch="resnet18", weights=str(path), sha256=file_sha256(path))
    student = build_model("resnet18", 3, spec.to_dict(), pretrained=True)
    assert torch.equal(student.net.conv1.weight, tv.conv1.weight)
    assert student.net.fc.weight.shape == (3, 512)


def test_refusals_are_one_line_and_never_touch_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    def refused(match: str, **model: Any) -> str:
        with pytest.raises(WeightsError, match=match) as err:
            backbone_spec(ModelConfig(**model))
        assert "\n" not in str(err.value)
        return str(err.value)

    text = refused("never downloads", arch=VIT, weights="hf-hub:MahmoodLab/UNI2-h")
    assert "--local-dir" in text and "model.safetensors" in text
    refused("never downloads", arch="timm:hf-hub:paige-ai/Virchow2")
    refused("no such file", arch=VIT, weights=str(tmp_path / "missing.bin"))
    refused("needs a timm backbone", arch="resnet18", freeze_backbone=True)
    (tmp_path / "empty").mkdir()
    refused("without a weights file", arch=VIT, weights=str(tmp_path / "empty"))

    path = save(tmp_path / "vit.safetensors", tiny_vit().state_dict())  # wrong architecture
    spec = BackboneSpec(arch="timm:resnet10t", weights=str(path), sha256=file_sha256(path))
    with pytest.raises(WeightsError, match=r"do not fit timm:resnet10t: \d+ missing keys") as err:
        build_model(spec.arch, 2, spec.to_dict(), pretrained=True)
    assert "unexpected keys" in str(err.value) and "\n" not in str(err.value)
    wide = save(tmp_path / "wide.pth", tiny_vit().state_dict() | {"pos_embed": torch.zeros(1, 9)})
    with pytest.raises(WeightsError, match="shape mismatch"):
        build_model(VIT, 2, vit_spec(wide).to_dict(), pretrained=True)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable weights file"):
        build_model(VIT, 2, vit_spec(tmp_path / "junk.bin").to_dict(), pretrained=True)
    with pytest.raises(WeightsError, match="timm has no model"):
        build_model("timm:no_such_net", 2)


def test_a_downloaded_hub_folder_supplies_arguments_and_normalisation(tmp_path: Path) -> None:
    """A timm hub repo downloaded once (config.json + model.safetensors): its model_args build the
    network, its pretrained_cfg gives the input normalisation; layer classes by name resolve."""
    import json

    torch.manual_seed(0)
    args = {**TINY, "mlp_layer": "SwiGLUPacked", "act_layer": "torch.nn.SiLU", "mlp_ratio": 2}
    from resdistill.backbones.timm_net import resolve_layer_args

    ref = tiny_vit(**{k: v for k, v in resolve_layer_args(args).items() if k not in TINY})
    repo = tmp_path / "repo"
    repo.mkdir()
    save(repo / "model.safetensors", ref.state_dict())
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (repo / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": args,
        "pretrained_cfg": {"mean": mean, "std": std, "input_size": [3, PX, PX]},
    }))  # fmt: skip
    spec = backbone_spec(ModelConfig(arch=VIT, weights=str(repo), freeze_backbone=True))
    assert spec is not None and spec.external and spec.input_px == PX
    assert spec.weights == str((repo / "model.safetensors").resolve())
    net = build_model(VIT, 2, spec.to_dict())
    assert list(net.fm_mean) == pytest.approx(mean) and list(net.fm_std) == pytest.approx(std)
    assert type(net.backbone.blocks[0].mlp).__name__ == "GluMlp"  # SwiGLUPacked
    x = torch.randn(1, 3, PX, PX)  # in the backbone's own normalisation (in_scale 1, shift 0)
    with torch.no_grad():
        assert torch.allclose(net.embed(x), ref.forward_head(ref.forward_features(x), True))
