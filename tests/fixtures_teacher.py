"""A tiny trained teacher for the whole session: trained once, read by every module that
distils from it (distillation, label-free selection, the study, cached targets, Tune)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill import checkpoint as T
from resdistill import data as D
from resdistill.models import build_model


def teacher_payload(
    model: torch.nn.Module, info: D.DatasetInfo, mag: str, classes: list[str] | None = None
) -> dict[str, Any]:
    """A ``model.pt`` in the layout ``resdistill.teacher`` writes."""
    mean, std = info.mean_std(mag)
    classes = list(info.classes) if classes is None else classes
    return {
        "format": T.CHECKPOINT_FORMAT,
        "stage": "teacher",
        "arch": "resnet18",
        "num_classes": len(classes),
        "classes": classes,
        "mag": mag,
        "tile_px": int(info.tile_px[mag]),
        "normalization": {"mean": list(mean), "std": list(std)},
        "dataset": info.url,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> str:
    """Write ``payload`` (a ``model.pt`` document) through the project's writer."""
    folder.mkdir(parents=True, exist_ok=True)
    card = T.ModelCard.from_dict({k: v for k, v in payload.items() if k != "state_dict"})
    T.write_checkpoint(
        folder, card=card, state_dict=payload["state_dict"], trainer={}, epoch=1, metrics={}
    )
    return str(folder)


@pytest.fixture(scope="session")
def trained_teacher(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A resnet18 teacher at 10x trained in-process (plain PyTorch, 40 steps) on the tiny
    dataset's labelled train split, saved in the teacher stage's checkpoint layout."""
    info = D.DatasetInfo.load(str(tiny_dataset))
    torch.manual_seed(0)
    model = build_model("resnet18", info.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = D.make_loader(info, ["train"], ["10x"], batch_size=16, train=True, num_workers=0,
                           shuffle_buffer=48, steps=40, labelled_only=True)  # fmt: skip
    model.train()
    for batch in loader.epoch():
        loss = torch.nn.functional.cross_entropy(model(batch.images[0])[0], batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader.close()
    model.eval()
    val = D.make_loader(info, ["val"], ["10x"], batch_size=16, train=False, num_workers=0)
    with torch.no_grad():
        correct = sum(int((model(b.images[0])[0].argmax(1) == b.labels).sum()) for b in val.epoch())
    assert correct / 16 >= 0.75, "the tiny teacher should have learnt the colour-coded classes"
    folder = tmp_path_factory.mktemp("teacher") / "checkpoint_epoch0001"
    return save_checkpoint(folder, teacher_payload(model, info, "10x"))
