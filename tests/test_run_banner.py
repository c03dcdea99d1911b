"""The run banner says what learns from what, with every number filled in."""

from __future__ import annotations

from resdistill.config import DataConfig, DataPlan, ModelConfig, TeacherRef, TrainConfig
from resdistill.train.driver import describe


def _planned(stage: str, teacher: TeacherRef | None) -> TrainConfig:
    plan = DataPlan(dataset={}, n_train=96, n_labelled=48, n_val=16, train_shards=4,
                    steps_per_epoch=6)  # fmt: skip
    return TrainConfig(stage, DataConfig(url="/ds"), model=ModelConfig("resnet18", "2p5x"),
                       teacher=teacher, plan=plan)  # fmt: skip


def test_every_stage_banner_shows_the_run_shape() -> None:
    ref = TeacherRef(checkpoint="/runs/t1/checkpoint_epoch0001", arch="resnet18", mag="10x")
    for stage, teacher in (("teacher", None), ("supervised", None), ("distill", ref)):
        text = describe(_planned(stage, teacher))
        assert "{" not in text and "}" not in text, text
        assert "2 workers x batch 64 x 6 steps/epoch x 20 epochs" in text, text
