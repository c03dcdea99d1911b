"""Prediction scores on a CPU through TorchScript with the eager model's probabilities, falls
back to the eager model in the faster layout when a traced module would disagree, and batches
follow the pixel rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resdistill.models import build_model
from resdistill.predict import cpu_forward
from resdistill.predict.driver import auto_batch
from resdistill.predict.stages import Scorer


def _checkpoint(tmp_path: Path, px: int) -> tuple[str, torch.nn.Module]:
    from resdistill import checkpoint as T

    torch.manual_seed(0)
    net = build_model("resnet18", 2).eval()
    card = T.ModelCard.from_dict({
        "format": T.CHECKPOINT_FORMAT, "stage": "student", "arch": "resnet18", "num_classes": 2,
        "classes": ["benign", "tumor"], "mag": "2p5x", "tile_px": px,
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "dataset": "none",
    })  # fmt: skip
    folder = tmp_path / "checkpoint_epoch0001"
    folder.mkdir(parents=True)
    T.write_checkpoint(folder, card=card, state_dict=net.state_dict(), trainer={}, epoch=1,
                       metrics={})  # fmt: skip
    return str(folder), net


@pytest.mark.parametrize("px", [28, 112])
def test_scorer_runs_torchscript_with_the_eager_probabilities(tmp_path: Path, px: int) -> None:
    folder, net = _checkpoint(tmp_path, px)
    tiles = np.random.default_rng(0).integers(0, 256, (5, px, px, 3), dtype=np.uint8)
    batch = {"tile": tiles, "error": np.array([""] * 5), "slide": np.array(["s"] * 5),
             "seconds": np.zeros(5)}  # fmt: skip
    scorer = Scorer(folder, "cpu")
    probs = scorer(batch)["probs"]
    assert isinstance(scorer.forward, torch.jit.ScriptModule)
    assert scorer.layout == torch.contiguous_format
    forward = scorer.forward
    np.testing.assert_allclose(scorer({k: v[:2] for k, v in batch.items()})["probs"], probs[:2],
                               atol=1e-6)  # fmt: skip
    assert scorer.forward is forward  # traced once, at the first batch, any batch size after
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float().contiguous() / 255.0
    with torch.no_grad():
        want = torch.softmax(net((x - 0.5) / 0.25)[0], 1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)


class _Branchy(torch.nn.Module):
    """A network whose forward takes a branch by its input's values: tracing on blank tiles
    records the other branch than random tiles take, so the traced module disagrees."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.b = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.a(x) if float(x.sum()) > 0 else self.b(x)
        return f.mean((2, 3)), f


@pytest.mark.parametrize(("px", "fmt"), [(56, torch.contiguous_format), (224, torch.channels_last)])
def test_a_disagreeing_trace_falls_back_to_eager_in_the_rules_layout(
    px: int, fmt: torch.memory_format
) -> None:
    net = _Branchy().eval()
    forward, got = cpu_forward.scoring_forward(net, px, "cpu")
    assert forward is net and got == fmt
    assert net.a.weight.is_contiguous(memory_format=fmt)


def test_a_vit_and_a_large_network_are_not_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_embedding = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, 16), torch.nn.Flatten())
    assert cpu_forward.scoring_forward(patch_embedding, 224, "cpu")[0] is patch_embedding
    net = build_model("resnet18", 2).eval()
    monkeypatch.setattr(cpu_forward, "TRACE_MAX_PARAMS", 1_000_000)  # resnet18: 11 M
    assert cpu_forward.scoring_forward(net, 56, "cpu") == (net, torch.contiguous_format)


def test_layout_rule_and_gpu() -> None:
    assert [cpu_forward.layout_for(px, "cpu") for px in (28, 56, 111, 112, 224)] == [
        torch.contiguous_format, torch.contiguous_format, torch.contiguous_format,
        torch.channels_last, torch.channels_last]  # fmt: skip
    net = build_model("resnet18", 2).eval()
    assert cpu_forward.scoring_forward(net, 56, "cuda") == (net, torch.preserve_format)


def test_batches_hold_as_many_pixels_as_64_tiles_of_56_px() -> None:
    assert [auto_batch(px) for px in (14, 28, 56, 112, 224, 448)] == [1024, 256, 64, 16, 4, 4]
    assert [auto_batch(px, "cuda") for px in (28, 56, 224)] == [256, 64, 64]
