"""Training on a real 2-worker Ray Train run (DDP on gloo) where a detail used to go wrong: a
feature projection built but unused, BatchNorm buffers that differ between ranks at validation,
a damaged shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill import checkpoint as C
from resdistill import data as D
from resdistill.commands import distill, teacher
from resdistill.commands.generate import parse
from resdistill.commands.training import train as train_run
from resdistill.models import build_model
from resdistill.train.validate import evaluate
from resdistill.train.worker_env import WorkerEnv
from sharding.layout import shard_name
from tests.fixtures_data import write_dataset

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _common(data: Path, storage: Path, name: str, address: str) -> list[str]:
    return ["--data", str(data), "--storage", str(storage), "--name", name, "--workers", "2",
            "--batch-size", "8", "--loader-workers", "1", "--shuffle-buffer", "16",
            "--epochs", "1", "--max-failures", "0", "--address", address]  # fmt: skip


def test_feature_weight_0_with_other_channel_counts_trains_under_ddp(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    """A resnet-small student (256 channels) of a resnet18 teacher (512) with the feature term
    off: no 1x1 projection is built, so DDP has no parameter without a gradient."""
    from tests.test_distill import save_checkpoint, teacher_payload

    info = D.DatasetInfo.load(str(tiny_dataset))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "teacher" / "checkpoint_epoch0001",
                           teacher_payload(build_model("resnet18", 2), info, "10x"))  # fmt: skip
    argv = _common(tiny_dataset, tmp_path / "runs", "d-nofeat", ray_cluster) + [
        "--teacher", ckpt, "--student-mag", "5x", "--arch", "resnet-small",
        "--feature-weight", "0", "--steps-per-epoch", "3", "--no-teacher-eval",
    ]  # fmt: skip
    summary = train_run(parse(distill.SPEC, argv))
    assert summary.epochs == 1
    trainer = C.load_checkpoint(summary.latest_checkpoint, C.TRAINER_FILE)
    assert trainer["loss"] == {}  # nothing trainable in the loss
    assert trainer["state"]["history"][-1]["train_feature"] == 0.0


def test_validation_scores_the_checkpointed_batchnorm_statistics(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    """resnet18 (BatchNorm): each rank's running statistics move with its own last batch; the
    reported validation must be that of the checkpoint (rank 0's buffers) on every rank."""
    argv = _common(tiny_dataset, tmp_path / "runs", "t-bn", ray_cluster) + [
        "--arch", "resnet18", "--steps-per-epoch", "3", "--eval-batch-size", "4",
    ]  # fmt: skip
    summary = train_run(parse(teacher.SPEC, argv))
    saved = C.load_checkpoint(summary.latest_checkpoint)
    model = build_model("resnet18", 2)
    model.load_state_dict(saved["state_dict"])
    info = D.DatasetInfo.load(str(tiny_dataset))
    loader = D.make_loader(info, ["val"], ["10x"], batch_size=4, train=False, num_workers=0,
                           labelled_only=True)  # fmt: skip
    env = WorkerEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    local = evaluate(model, loader, env, info.num_classes)
    reported = summary.last_metrics
    assert reported["val_samples"] == local["val_samples"] == 16
    assert reported["val_loss"] == pytest.approx(local["val_loss"], rel=1e-5, abs=1e-6)
    assert reported["val_accuracy"] == pytest.approx(local["val_accuracy"])


def test_a_truncated_shard_fails_the_run_with_one_line(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "ds"
    write_dataset(root, shard_sizes={"train": [16, 16, 16], "val": [8]})
    bad = root / shard_name("train", 1)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    argv: list[Any] = _common(root, tmp_path / "runs", "t-bad", ray_cluster) + [
        "--arch", "resnet-small",
    ]  # fmt: skip
    capsys.readouterr()
    rc = teacher.run(parse(teacher.SPEC, argv))
    # the command's own output (Ray also forwards the workers' logs to stderr)
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("teacher:")]
    assert rc == 2
    assert len(ours) == 1 and ours[0].startswith("teacher: error: "), ours
    assert shard_name("train", 1) in ours[0] and "corrupted" in ours[0]
