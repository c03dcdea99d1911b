"""The frozen-backbone head: embeddings computed once per dataset and reused, checked on read,
and the planner's refusals and notes (no Ray: the shard jobs run in this process)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunOptions,
    TeacherRef,
    TrainConfig,
)
from resdistill.errors import UsageError
from resdistill.train import embeddings as E
from tests.fixtures_data import write_dataset

ARCH = "timm:vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fm-ds")
    write_dataset(root, samples={"train": 24, "val": 8, "test": 0, "unlabeled": 8},
                  shards={"train": 2, "val": 1, "test": 0, "unlabeled": 1})  # fmt: skip
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(ARCH[5:], num_classes=0, img_size=32, **TINY)
    path = tmp_path_factory.mktemp("fm-w") / "vit.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}}, path)
    return path


def frozen_cfg(data: Path, path: Path, **model: Any) -> TrainConfig:
    m = {"arch": ARCH, "weights": str(path), "freeze_backbone": True,
         "backbone_args": json.dumps(TINY), "input_px": 32, **model}  # fmt: skip
    return TrainConfig("teacher", DataConfig(url=str(data), batch_size=8),
                       ModelConfig(**m), OptimConfig(epochs=1), run=RunOptions(workers=1))  # fmt: skip


def test_embeddings_are_computed_once_and_checked_when_read(
    dataset: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resdistill.data.targets import StaleTargetsError
    from resdistill.train.preflight import prepare

    calls: list[int] = []

    def local(cfg: TrainConfig, out: str, todo: Any, device: str, log: Any) -> Any:
        calls.append(len(todo))
        return E.embed_shards(cfg.data.url, cfg.to_dict(), out, todo, device, 8)

    monkeypatch.setattr(E, "_dispatch", local)
    notes: list[str] = []
    cfg = prepare(frozen_cfg(dataset, weights), notes=notes)
    assert cfg.plan.embeddings is not None and cfg.plan.backbone["frozen"]
    assert any("cached embeddings" in n for n in notes)
    logs: list[str] = []
    first = E.ensure_embeddings(cfg, "cpu", logs.append)
    assert calls == [3]  # two train shards and the val shard, labelled tiles only
    doc = first.plan.embeddings["doc"]
    assert sum(s["samples"] for s in doc["shards"].values()) == 24 + 8
    # a head with another recipe (mlp, another seed and lr): the same cache, nothing computed
    again = prepare(replace(frozen_cfg(dataset, weights, head="mlp"),
                            optim=OptimConfig(lr=0.1, seed=4)), notes=[])  # fmt: skip
    assert again.plan.embeddings["url"] == cfg.plan.embeddings["url"]
    second = E.ensure_embeddings(again, "cpu", logs.append)
    assert calls == [3] and "reusing" in logs[-1]
    assert second.plan.embeddings["doc"] == doc

    # the stored vectors are the backbone's embeddings of the normalised tiles
    got = E.read_embeddings(first.plan.embeddings["url"], doc, sorted(doc["shards"]))
    assert got["emb"].shape == (32, 32) and set(got["labels"].tolist()) <= {0, 1}

    # another input edge is another backbone input: another cache
    other = prepare(frozen_cfg(dataset, weights, input_px=16), notes=[])
    assert other.plan.embeddings["url"] != cfg.plan.embeddings["url"]

    # an array rewritten behind the index is refused in one line
    url = Path(first.plan.embeddings["url"])
    victim = sorted(url.rglob("*.npz"))[0]
    blob = victim.read_bytes()
    victim.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(StaleTargetsError, match="sha256") as err:
        E.read_embeddings(str(url), doc, sorted(doc["shards"]))
    assert "\n" not in str(err.value)


def test_head_loader_gives_equal_steps_and_disjoint_rows() -> None:
    from resdistill.train.head import EmbeddingLoader

    emb, labels = torch.arange(20.0).view(10, 2), torch.arange(10) % 2
    rows: list[set[float]] = []
    for rank in (0, 1):
        loader = EmbeddingLoader(emb, labels, batch_size=3, rank=rank, world_size=2, steps=2)
        batches = list(loader.epoch())
        assert len(batches) == 2 and all(len(b) == 3 for b in batches)
        rows.append({float(v) for b in batches for v in b.images[0][:, 0]})
        again = list(loader.epoch())  # the next epoch draws another order
        assert [b.keys for b in again] != [b.keys for b in batches]
    assert not rows[0] & rows[1]
    full = EmbeddingLoader(emb, labels, batch_size=4)
    assert sum(len(b) for b in full.epoch()) == 10


def test_planner_refusals_and_kd_only_for_pooled_teachers(dataset: Path, weights: Path) -> None:
    from resdistill.train.backbone_plan import _kd_only, plan_backbone
    from resdistill.train.preflight import prepare

    with pytest.raises(UsageError, match="--freeze-backbone needs --weights"):
        prepare(frozen_cfg(dataset, weights, weights=""), notes=[])
    with pytest.raises(UsageError, match="no such file"):
        prepare(frozen_cfg(dataset, weights, weights=str(dataset / "nope.bin")), notes=[])
    student = replace(frozen_cfg(dataset, weights), stage="distill",
                      teacher=TeacherRef(checkpoint="x"))  # fmt: skip
    planned = replace(student, plan=prepare(frozen_cfg(dataset, weights), notes=[]).plan)
    with pytest.raises(UsageError, match="a distilled student learns its whole network"):
        plan_backbone(planned, [])
    attention = replace(planned, model=replace(planned.model, freeze_backbone=False),
                        teacher=TeacherRef(checkpoint="x", arch=ARCH),
                        loss=replace(planned.loss, attention_weight=1.0))  # fmt: skip
    with pytest.raises(UsageError, match="--attention-weight needs a ResNet teacher"):
        plan_backbone(attention, [])
    pooled = replace(student, teacher=TeacherRef(checkpoint="x", arch=ARCH,
                                                 spatial_features=False),
                     loss=replace(student.loss, feature_weight=1.0))  # fmt: skip
    notes: list[str] = []
    kd = _kd_only(pooled, notes)
    assert kd.loss.feature_weight == 0 and "KD only" in notes[0]
    gridded = replace(pooled, loss=replace(pooled.loss, feature_grid=2))  # a grid goes with it
    assert _kd_only(gridded, []).loss == replace(kd.loss, feature_grid=0)
    with pytest.raises(UsageError, match="nothing to learn"):
        _kd_only(replace(pooled, loss=replace(pooled.loss, kd_weight=0.0)), [])
