"""Resolution distillation (and the supervised low-magnification baseline) on a real local Ray
cluster, with shards, the teacher checkpoint and the student's checkpoints on a real S3 endpoint."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill import checkpoint as T
from resdistill import data as D
from resdistill.commands import distill
from resdistill.commands.generate import parse
from resdistill.commands.training import train as train_run
from resdistill.config import TrainConfig
from resdistill.losses import DistillLoss
from resdistill.models import build_model
from resdistill.train.preflight import prepare
from resdistill.train.stages import labelled_ce
from resdistill.train.teacher_net import (
    DistillStep,
    FrozenTeacher,
    build_loss,
    distill_batch,
    renormalizer,
)
from resdistill.train.worker import loop_config
from tests.fixtures_teacher import save_checkpoint, teacher_payload

pytestmark = pytest.mark.timeout(600)

CLASSES = ["benign", "tumor"]
LOSS_CFG = {
    "temperature": 2.0,
    "kd_weight": 1.0,
    "feature_weight": 1.0,
    "feature_loss": "mse",
    "feature_resize": "maxpool",
}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _args(data: str, storage: str, name: str, *extra: str) -> Any:
    argv = ["--data", data, "--storage", storage, "--name", name, "--workers", "2",
            "--batch-size", "8", "--loader-workers", "1", "--shuffle-buffer", "32", *extra]  # fmt: skip
    return parse(distill.SPEC, argv)


# ---------------------------------------------------------------------------------------------
# One step, no cluster
# ---------------------------------------------------------------------------------------------


class _LabelsForbidden:
    """A batch whose ``labels`` raise: proof that a code path never reads them."""

    def __init__(self, images: tuple[torch.Tensor, ...]) -> None:
        self.images = images

    @property
    def labels(self) -> torch.Tensor:
        raise AssertionError("the distillation step read the labels")


def _loss_and_grads(step: DistillStep, teacher: FrozenTeacher, batch: Any) -> tuple[float, list]:
    step.zero_grad(set_to_none=True)
    total, _, _, _ = distill_batch(step, teacher, batch)
    total.backward()
    return float(total.detach()), [p.grad.clone() for p in step.parameters() if p.grad is not None]


def test_labels_never_reach_the_distillation_loss() -> None:
    torch.manual_seed(1)
    teacher = FrozenTeacher(build_model("resnet18", 2))
    step = DistillStep(build_model("resnet18", 2), build_loss(LOSS_CFG, 512, 512))
    images = (torch.randn(6, 3, 16, 16), torch.randn(6, 3, 32, 32))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    keys = [f"k{i}" for i in range(6)]
    base = _loss_and_grads(step, teacher, D.Batch(images, labels, keys))
    variants = [
        D.Batch(images, labels.flip(0), keys),  # shuffled
        D.Batch(images, 1 - labels, keys),  # every label wrong
        D.Batch(images, torch.full((6,), -1), keys),  # unlabeled
        _LabelsForbidden(images),  # reading them would raise
    ]
    assert base[0] > 0
    for batch in variants:
        loss, grads = _loss_and_grads(step, teacher, batch)
        assert loss == base[0]
        assert len(grads) == len(base[1]) and all(
            torch.equal(a, b) for a, b in zip(grads, base[1], strict=True)
        )
    # and the loss module itself has no place for a label
    import inspect

    assert not [p for p in inspect.signature(DistillLoss.forward).parameters if "label" in p]


def test_the_supervised_term_reads_only_known_labels() -> None:
    """``--ce-weight``'s term: mean cross-entropy over the labelled samples of a batch (-1: a
    hidden or absent label, skipped); a batch without one gives 0 with a gradient path."""
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([2, -1, 0, -1])
    want = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(labelled_ce(logits, labels), want)
    none = labelled_ce(logits, torch.full((4,), -1))
    none.backward()
    assert float(none) == 0.0 and logits.grad is not None and not logits.grad.any()
    argv = ["--data", "d", "--teacher", "t", "--student-mag", "2.5x"]
    assert parse(distill.SPEC, argv).loss.ce_weight == 0.0  # distillation stays label-free
    assert parse(distill.SPEC, [*argv, "--ce-weight", "0.5"]).loss.ce_weight == 0.5


@pytest.mark.parametrize(
    ("t_arch", "s_arch", "s_px", "side"),
    [("resnet18", "resnet18", 112, 4), ("resnet18", "resnet18", 56, 2),
     ("resnet18", "resnet34", 28, 1), ("resnet50", "resnet18", 56, 2)],
)  # fmt: skip
def test_teacher_at_224_student_at_every_lower_mag(
    t_arch: str, s_arch: str, s_px: int, side: int
) -> None:
    """A 10x teacher tile of 224 px (7x7 map) against 5x/2.5x/1.25x students (4x4, 2x2, 1x1);
    a resnet50 teacher (2048 channels) gets a learnt projection of the 512-channel student."""
    torch.manual_seed(2)
    t_net, s_net = build_model(t_arch, 3), build_model(s_arch, 3)
    teacher = FrozenTeacher(t_net)
    before = {k: v.clone() for k, v in t_net.state_dict().items()}
    loss = build_loss(LOSS_CFG, s_net.feature_channels, t_net.feature_channels)
    assert (loss.feature.projection is not None) == (t_arch == "resnet50")
    step = DistillStep(s_net, loss)
    step.train()
    teacher.train()  # a frozen teacher ignores this
    assert not teacher.training and not t_net.training
    batch = D.Batch((torch.randn(2, 3, s_px, s_px), torch.randn(2, 3, 224, 224)),
                    torch.tensor([0, 1]), ["a", "b"])  # fmt: skip
    total, parts, s_logits, t_logits = distill_batch(step, teacher, batch)
    assert s_logits.shape == t_logits.shape == (2, 3)
    assert s_net(batch.images[0])[1].shape[-2:] == (side, side)
    total.backward()
    assert torch.isfinite(total) and float(parts["feature"]) > 0 and float(parts["kd"]) >= 0
    assert all(p.grad is not None for p in s_net.parameters())
    if loss.feature.projection is not None:
        assert loss.feature.projection.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in t_net.parameters())
    after = t_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics did not move


def test_renormalizer_maps_stream_statistics_onto_the_teachers() -> None:
    src = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.1))
    dst = ((0.6, 0.4, 0.2), (0.1, 0.5, 0.2))
    assert renormalizer(src, src) is None
    scale, shift = renormalizer(src, dst)
    assert scale == pytest.approx([2.0, 0.5, 0.5])
    assert shift == pytest.approx([-1.0, 0.0, 0.5])
    # the teacher sees exactly what its own normalisation would have produced from the pixels
    torch.manual_seed(3)
    pixels = torch.rand(2, 3, 32, 32)
    m_s, s_s = (torch.tensor(v).view(1, 3, 1, 1) for v in src)
    m_d, s_d = (torch.tensor(v).view(1, 3, 1, 1) for v in dst)
    net = build_model("resnet18", 2).eval()
    teacher = FrozenTeacher(copy.deepcopy(net), (scale, shift))
    got = teacher((pixels - m_s) / s_s)[0]
    with torch.no_grad():
        want = net((pixels - m_d) / s_d)[0]
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Options, teacher and dataset checks (before any Ray work)
# ---------------------------------------------------------------------------------------------


def test_teacher_with_other_classes_is_refused(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    info = D.DatasetInfo.load(str(tiny_dataset))
    for i, classes in enumerate((["benign", "normal", "tumor"], ["tumor", "benign"])):
        net = build_model("resnet18", len(classes))
        ckpt = save_checkpoint(tmp_path / f"t{i}", teacher_payload(net, info, "10x", classes))
        code = distill.main(["--data", str(tiny_dataset), "--teacher", ckpt,
                             "--student-mag", "5x", "--storage", str(tmp_path / "runs")])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "classes" in err[0] and str(classes) in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_options_exit_2_with_one_line(
    tiny_dataset: Path, trained_teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = str(tiny_dataset)
    cases = [
        (["--student-mag", "5x"], "--teacher is required"),
        (["--teacher", trained_teacher, "--student-mag", "40x"], "40x is not in"),
        (["--teacher", trained_teacher, "--student-mag", "10x", "--teacher-mag", "5x"],
         "above the teacher's"),
        (["--teacher", str(tmp_path), "--student-mag", "5x"], "model.pt"),
        (["--teacher", trained_teacher, "--student-mag", "5x", "--kd-weight", "0",
          "--feature-weight", "0"], "nothing to learn"),
        (["--supervised", "--student-mag", "5x", "--train-splits", "unlabeled"],
         "no labelled samples"),
        (["--teacher", trained_teacher, "--student-mag", "5x", "--train-splits", "nope"],
         "unknown split"),
        (["--teacher", trained_teacher, "--student-mag", "5x", "--attention-weight", "1"],
         "tiles of 64 px or more"),
        (["--teacher", trained_teacher, "--student-mag", "5x", "--unlabelled-share", "1.5"],
         "within 0..1"),
    ]  # fmt: skip
    for extra, message in cases:
        assert distill.main(["--data", data, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save({"arch": "resnet18", "classes": CLASSES, "state_dict": io.BytesIO(b"x")},
               bad / T.MODEL_FILE)  # fmt: skip
    assert distill.main(["--data", data, "--teacher", str(bad), "--student-mag", "5x"]) == 2
    assert "cannot load the teacher" in capsys.readouterr().err


def test_config_uses_every_split_for_distillation_and_labels_for_the_baseline(
    tiny_dataset: Path, trained_teacher: str
) -> None:
    base = ["--data", str(tiny_dataset), "--student-mag", "5x", "--batch-size", "8"]
    cfg = prepare(parse(distill.SPEC, [*base, "--teacher", trained_teacher]))
    assert cfg.data.train_splits == ("train", "unlabeled")
    assert (cfg.plan.n_train, cfg.plan.n_labelled, cfg.plan.n_val) == (48 + 8, 48, 16)
    assert cfg.teacher.mag == "10x" and cfg.model.arch == "resnet18"
    assert cfg.teacher.checkpoint == trained_teacher
    assert cfg.teacher.feature_channels == 512 and "state_dict" not in cfg.to_dict()["teacher"]
    assert cfg.plan.steps_per_epoch == 56 // (2 * 8)
    # what travels to the workers is plain values and comes back as the same config
    assert TrainConfig.from_dict(loop_config(cfg)["config"]) == cfg
    sup = prepare(parse(distill.SPEC, [*base, "--supervised"]))
    assert sup.data.train_splits == ("train",) and sup.plan.n_train == 48 and sup.teacher is None
    assert sup.stage == "supervised"


# ---------------------------------------------------------------------------------------------
# Ray Train runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distill_on_s3_checkpoints_and_resumes(
    ray_cluster: str, tiny_dataset_s3: str, trained_teacher: str, tmp_path: Path
) -> None:
    import boto3

    from sharding.storage import open_storage

    bucket = tiny_dataset_s3.split("/")[2]
    teacher_url = f"s3://{bucket}/teachers/t1/checkpoint_epoch0001"
    open_storage(teacher_url).put_file(T.MODEL_FILE, Path(trained_teacher) / T.MODEL_FILE)
    storage = f"s3://{bucket}/runs"
    trace = tmp_path / "trace"
    args = _args(tiny_dataset_s3, storage, "d-s3", "--teacher", teacher_url,
                 "--student-mag", "5x", "--epochs", "2", "--steps-per-epoch", "4",
                 "--schedule", "constant", "--lr", "5e-4", "--temperature", "2",
                 "--address", ray_cluster, "--trace-dir", str(trace))  # fmt: skip
    first = train_run(args)
    assert first.epochs == 2
    assert first.latest_checkpoint == f"s3://{bucket}/runs/d-s3/checkpoint_epoch0002"
    s3 = boto3.session.Session().client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert {"runs/d-s3/checkpoint_epoch0002/model.pt",
            "runs/d-s3/checkpoint_epoch0002/trainer.pt"} <= keys  # fmt: skip

    # the student's checkpoint says what it is and where it came from
    student = T.load_checkpoint(first.latest_checkpoint)
    info = D.DatasetInfo.load(tiny_dataset_s3)
    mean, std = info.mean_std("5x")
    assert student["stage"] == "distill" and student["mag"] == "5x" and student["tile_px"] == 16
    assert student["arch"] == "resnet18" and student["classes"] == CLASSES
    assert student["normalization"] == {"mean": list(mean), "std": list(std)}
    assert student["teacher"] == {"checkpoint": teacher_url, "arch": "resnet18", "mag": "10x",
                                  "classes": CLASSES}  # fmt: skip
    assert student["loss"]["temperature"] == 2.0 and student["loss"]["feature_loss"] == "mse"
    build_model(student["arch"], student["num_classes"]).load_state_dict(student["state_dict"])
    assert sorted((r["epoch"], r["rank"], r["steps"]) for r in _jsonl(trace / "epochs.jsonl")) == [
        (1, 0, 4), (1, 1, 4), (2, 0, 4), (2, 1, 4),
    ]  # fmt: skip

    # the same name resumes after epoch 2 and continues to epoch 3
    args = replace(args, optim=replace(args.optim, epochs=3))
    second = train_run(args)
    assert second.epochs == 3
    assert sorted(s["start_epoch"] for s in _jsonl(trace / "starts.jsonl")) == [0, 0, 2, 2]
    trainer = T.load_checkpoint(second.latest_checkpoint, T.TRAINER_FILE)
    state = trainer["state"]
    assert state["resumes"] == 1 and state["step"] == 12
    assert trainer["config"]["plan"]["n_train"] == 56  # train + unlabeled, labels or not
    history = state["history"]
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # the student approaches the teacher
    last = history[-1]
    assert last["train_loss"] == pytest.approx(last["train_kd"] + last["train_feature"], rel=1e-4)
    assert last["val_samples"] == 16  # every val sample scored once over both ranks
    assert last["teacher_val_accuracy"] >= 0.75  # scored once, carried across the resume
    assert 0.0 <= last["val_accuracy"] <= 1.0 and 0.0 <= last["train_agreement"] <= 1.0
    # label-free by default: the kept checkpoint is ranked by the val distillation loss
    assert second.metric == "val_distill_loss" and second.labelled_val_slides == 0
    assert state["best_epoch"] == min(
        range(1, 4), key=lambda e: (history[e - 1]["val_distill_loss"], -e)
    )


@pytest.mark.slow
def test_python_m_distills_on_unlabeled_data_only(
    ray_cluster: str, tiny_dataset: Path, trained_teacher: str, tmp_path: Path
) -> None:
    """``python -m resdistill.distill`` as ``ray job submit`` runs it (cluster from RAY_ADDRESS),
    learning from the ``unlabeled`` split alone: every sample's label is null."""
    runs = tmp_path / "runs"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.run(
        [sys.executable, "-m", "resdistill.distill", "--data", str(tiny_dataset),
         "--teacher", trained_teacher, "--student-mag", "5x", "--train-splits", "unlabeled",
         "--storage", str(runs), "--name", "d-unl", "--epochs", "1", "--workers", "2",
         "--batch-size", "4", "--loader-workers", "0", "--feature-loss", "l1",
         "--feature-resize", "bicubic", "--kd-weight", "0", "--feature-weight", "1"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "8 train samples (0 labelled, 8 unlabeled)" in out
    assert "distilled student d-unl" in out and "best checkpoint:" in out
    trainer = T.load_checkpoint(runs / "d-unl" / "checkpoint_epoch0001", T.TRAINER_FILE)
    last = trainer["state"]["history"][-1]
    assert last["step"] == 8 // (2 * 4)
    assert last["train_kd"] == 0.0 and last["train_loss"] == pytest.approx(last["train_feature"])
    model = T.load_checkpoint(runs / "d-unl" / "checkpoint_epoch0001")
    assert model["train_splits"] == ["unlabeled"] and model["loss"]["kd_weight"] == 0.0


@pytest.mark.slow
def test_supervised_baseline_learns_from_labels(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    args = _args(str(tiny_dataset), str(tmp_path / "runs"), "b-5x", "--supervised",
                 "--student-mag", "5x", "--epochs", "3", "--steps-per-epoch", "3",
                 "--schedule", "constant", "--address", ray_cluster)  # fmt: skip
    summary = train_run(args)
    assert summary.epochs == 3
    model = T.load_checkpoint(summary.latest_checkpoint)
    assert model["stage"] == "supervised" and model["teacher"] is None and model["mag"] == "5x"
    trainer = T.load_checkpoint(summary.latest_checkpoint, T.TRAINER_FILE)
    config = trainer["config"]
    assert config["plan"]["n_train"] == 48 and config["data"]["train_splits"] == ["train"]
    history = trainer["state"]["history"]
    assert "train_accuracy" in history[-1] and "train_kd" not in history[-1]
    assert "teacher_val_accuracy" not in history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    # the baseline chooses its epoch on the labels of the 4 val slides: its label budget says so
    assert (summary.select, summary.labelled_val_slides) == ("metric", 4)
    assert trainer["state"]["selection"]["metric"] == "val_macro_f1"
    assert "val_distill_loss" not in history[-1]
