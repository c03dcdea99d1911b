"""Compute table: exact parameter counts, counted FLOPs of a real resnet18, measured throughput."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from resdistill.measures.compute import compute_table, count_flops, count_params, measure_throughput


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=3)


def test_params_resnet18_three_classes_exact(resnet18: nn.Module) -> None:
    # torchvision's ImageNet resnet18 has 11,689,512 parameters; its head is Linear(512, 1000).
    imagenet_head = 512 * 1000 + 1000
    three_class_head = 512 * 3 + 3
    assert count_params(resnet18) == 11_689_512 - imagenet_head + three_class_head == 11_178_051
    for p in resnet18.fc.parameters():
        p.requires_grad_(False)
    try:
        assert count_params(resnet18, trainable_only=True) == 11_178_051 - three_class_head
    finally:
        for p in resnet18.fc.parameters():
            p.requires_grad_(True)


def test_params_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert count_params(model) == (3 * 4 * 9 + 4) + (4 + 4) + (4 * 2 + 2)


def test_flops_resnet18_224(resnet18: nn.Module) -> None:
    resnet18.train()
    flops = count_flops(resnet18, (3, 224, 224))
    assert resnet18.training  # mode restored
    # 1.814e9 multiply-accumulates (the often-quoted "1.8 GFLOPs") counted as 2 FLOPs each
    assert flops == 3_627_125_760
    assert flops / 2 == pytest.approx(1.82e9, rel=0.01)


def test_flops_by_hand() -> None:
    # conv 3->4, 3x3, 8x8 input -> 6x6 output: 6*6*4 outputs * 27 MACs; linear 144->2: 288 MACs
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    assert count_flops(model, (3, 8, 8)) == 2 * (6 * 6 * 4 * 27 + 144 * 2)


def test_flops_scale_with_input_area(resnet18: nn.Module) -> None:
    flops = {side: count_flops(resnet18, (3, side, side)) for side in (224, 112, 56)}
    # halving the side quarters the work; padding/rounding of small maps keeps it a bit above 1/4
    assert flops[224] / flops[112] == pytest.approx(4.0, rel=0.1)
    assert flops[112] / flops[56] == pytest.approx(4.0, rel=0.2)
    assert flops[224] / flops[56] > 12


def test_bad_shape_rejected(resnet18: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        count_flops(resnet18, (1, 3, 224, 224))


def test_throughput_positive_and_model_restored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    rate = measure_throughput(model, (3, 16, 16), batch=4, seconds=0.05, repeats=3, warmup=1)
    assert rate > 0
    assert model.training
    assert next(model.parameters()).device.type == "cpu"


def test_compute_table_rows() -> None:
    small = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten())
    rows = compute_table(
        {"hi": (small, (3, 16, 16)), "lo": (small, (3, 8, 8))}, batch=2, seconds=0.02, repeats=2
    )
    assert [r["name"] for r in rows] == ["hi", "lo"]
    assert rows[0]["flops"] == 2 * 14 * 14 * 4 * 27 and rows[1]["flops"] == 2 * 6 * 6 * 4 * 27
    assert rows[0]["macs"] * 2 == rows[0]["flops"]
    assert all(r["params"] == 108 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["input_shape"] == [3, 16, 16] and rows[0]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_throughput_cuda() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    rate = measure_throughput(model, (3, 112, 112), batch=16, seconds=0.2, device="cuda")
    assert rate > 0
    assert next(model.parameters()).device.type == "cpu"
