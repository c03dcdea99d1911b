"""Cached teacher targets: computed once (in-process or as Ray tasks), read back by the
distillation stream with flips/rotations applied to the stored maps, refused when stale, on a
local folder and on a real S3 endpoint."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from resdistill import checkpoint as T
from resdistill import data as D
from resdistill.commands import distill
from resdistill.commands.generate import parse
from resdistill.commands.training import train as train_run
from resdistill.data.cached import GeometricAugment, make_cached_loader
from resdistill.data.targets import StaleTargetsError, TargetsIndex, check_for_distill
from resdistill.errors import UsageError
from resdistill.models import build_model
from resdistill.train.preflight import check, prepare
from resdistill.train.targets import feature_size, write_targets
from resdistill.train.targets_config import TargetsConfig
from resdistill.train.teacher_net import (
    DistillStep,
    FrozenTeacher,
    build_loss,
    cached_distill_batch,
    distill_batch,
    load_teacher,
)
from tests.fixtures_data import write_dataset
from tests.fixtures_teacher import save_checkpoint, teacher_payload
from tests.test_distill import LOSS_CFG

pytestmark = pytest.mark.timeout(600)


def _d4() -> list[tuple[bool, bool, int]]:
    return list(itertools.product((False, True), (False, True), range(4)))


@pytest.fixture(scope="module")
def geo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10x at 128 px (4x4 teacher map) and 5x at 64 px (2x2 student map): pooling is not trivial."""
    root = tmp_path_factory.mktemp("geo-dataset")
    write_dataset(
        root,
        tile_px=128,
        samples={"train": 12, "val": 4, "unlabeled": 4},
        shards={"train": 2, "val": 1, "unlabeled": 1},
    )
    return root


def _teacher(info: D.DatasetInfo, folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    net = build_model("resnet18", info.num_classes)
    # non-trivial batch-norm statistics, so eval mode differs from train mode
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(folder, teacher_payload(net, info, "10x"))


@pytest.fixture(scope="module")
def geo_teacher(geo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    info = D.DatasetInfo.load(str(geo_dataset))
    return _teacher(info, tmp_path_factory.mktemp("t") / "checkpoint_epoch0001", 0)


@pytest.fixture(scope="module")
def geo_targets(geo_dataset: Path, geo_teacher: str) -> TargetsIndex:
    return write_targets(
        TargetsConfig(data=str(geo_dataset), teacher=geo_teacher, local=True, batch_size=5)
    )


def test_maxpool_commutes_with_flips_and_rotations() -> None:
    """g(pool(f)) == pool(g(f)) for all 8 elements of D4 and the sizes the ResNets produce."""
    torch.manual_seed(0)
    for big, small in [(7, 4), (7, 2), (7, 1), (4, 2), (5, 3)]:
        f = torch.randn(2, 8, big, big)
        for g in _d4():
            a = GeometricAugment.apply(F.adaptive_max_pool2d(f, small), *g)
            b = F.adaptive_max_pool2d(GeometricAugment.apply(f, *g), small)
            assert torch.equal(a, b), (big, small, g)
    assert feature_size("resnet18", 224) == (7, 7) and feature_size("resnet50", 112) == (4, 4)
    assert feature_size("resnet18", 56) == (2, 2) and feature_size("resnet18", 28) == (1, 1)


def test_targets_layout_and_identity(
    geo_dataset: Path, geo_teacher: str, geo_targets: TargetsIndex
) -> None:
    doc = geo_targets.doc
    assert geo_targets.url.startswith(str(geo_dataset / "_targets"))
    assert doc["teacher"]["checkpoint"] == geo_teacher and len(doc["teacher"]["sha256"]) == 64
    assert doc["teacher_mag"] == "10x" and doc["sizes"] == {"5x": [2, 2]}
    assert doc["samples"] == 20 and set(doc["splits"]) == {"train", "val", "unlabeled"}
    arrays = geo_targets.read_shard("train/shard-000000.tar")
    n = doc["shards"]["train/shard-000000.tar"]["samples"]
    assert arrays["logits"].shape == (n, 2) and arrays["logits"].dtype.name == "float16"
    assert arrays["feat_5x"].shape == (n, 512, 2, 2) and arrays["feat_5x"].dtype.name == "float16"
    # the stored values are the frozen teacher's, pooled as FeatureLoss pools them
    info = D.DatasetInfo.load(str(geo_dataset))
    teacher = load_teacher(geo_teacher)
    loader = D.make_loader(info, ["train"], ["10x"], batch_size=64, train=False, num_workers=0)
    by_key = {}
    for b in loader.epoch():
        t, f = teacher(b.images[0])
        for i, k in enumerate(b.keys):
            by_key[k] = (t[i], F.adaptive_max_pool2d(f[i : i + 1], (2, 2))[0])
    for i, k in enumerate(arrays["keys"]):
        t, f = by_key[str(k)]
        assert torch.allclose(
            torch.from_numpy(arrays["logits"][i]).float(), t, atol=2e-3, rtol=2e-3
        )
        assert torch.allclose(
            torch.from_numpy(arrays["feat_5x"][i]).float(), f, atol=2e-3, rtol=2e-3
        )


def _online_by_key(
    info: D.DatasetInfo, teacher: FrozenTeacher, splits: list[str]
) -> dict[str, Any]:
    loader = D.make_loader(info, splits, ["5x", "10x"], batch_size=64, train=False, num_workers=0)
    out = {}
    for b in loader.epoch():
        t, f = teacher(b.images[1])
        for i, k in enumerate(b.keys):
            out[k] = (b.images[0][i], b.images[1][i], t[i], f[i])
    return out


def test_cached_loss_equals_online_loss(
    geo_dataset: Path, geo_teacher: str, geo_targets: TargetsIndex
) -> None:
    """Without augmentation: the same batch gives the same loss (fp16 storage aside) and grads."""
    info = D.DatasetInfo.load(str(geo_dataset))
    teacher = load_teacher(geo_teacher)
    online = _online_by_key(info, teacher, ["train", "unlabeled"])
    loader = make_cached_loader(info, ["train", "unlabeled"], "5x", geo_targets, batch_size=6,
                                train=True, num_workers=0, shuffle_buffer=16, steps=2, augment=None)  # fmt: skip
    torch.manual_seed(1)
    step = DistillStep(build_model("resnet18", 2), build_loss(LOSS_CFG, 512, 512)).eval()
    batches = list(loader.epoch())
    assert len(batches) == 2 and all(len(b) == 6 for b in batches)
    for batch in batches:
        x_s, t_logits, t_feat = batch.images
        assert t_logits.shape == (6, 2) and t_feat.shape == (6, 512, 2, 2)
        ref = D.Batch(
            (
                torch.stack([online[k][0] for k in batch.keys]),
                torch.stack([online[k][1] for k in batch.keys]),
            ),
            batch.labels,
            batch.keys,
        )
        assert torch.equal(x_s, ref.images[0])
        cached_total, cached_parts, _, _ = cached_distill_batch(step, batch)
        online_total, online_parts, _, _ = distill_batch(step, teacher, ref)
        assert float(cached_total.detach()) == pytest.approx(float(online_total.detach()), rel=2e-3)
        for name in ("kd", "feature"):
            assert float(cached_parts[name]) == pytest.approx(
                float(online_parts[name]), rel=5e-3, abs=1e-5
            )
    loader.close()


def test_flips_and_rotations_move_the_stored_map_with_the_tile(
    geo_dataset: Path, geo_teacher: str, geo_targets: TargetsIndex
) -> None:
    """With GeometricAugment, every sample's student tile is g(tile) and its map g(pool(f_t)) for
    the same g; the loss equals the online loss computed on those transformed pieces."""
    info = D.DatasetInfo.load(str(geo_dataset))
    teacher = load_teacher(geo_teacher)
    online = _online_by_key(info, teacher, ["train"])
    loader = make_cached_loader(info, ["train"], "5x", geo_targets, batch_size=12, train=True,
                                num_workers=0, shuffle_buffer=0, steps=3, augment=GeometricAugment(),
                                seed=4)  # fmt: skip
    seen: set[tuple[bool, bool, int]] = set()
    torch.manual_seed(2)
    step = DistillStep(build_model("resnet18", 2), build_loss(LOSS_CFG, 512, 512)).eval()
    for batch in loader.epoch():
        x_s, t_logits, t_feat = batch.images
        for i, k in enumerate(batch.keys):
            x0, _, t0, f0 = online[k]
            gs = [g for g in _d4() if torch.equal(GeometricAugment.apply(x0, *g), x_s[i])]
            assert gs, f"{k}: the tile is no flip/rotation of the original"
            pooled = F.adaptive_max_pool2d(f0[None], (2, 2))[0]
            assert any(
                torch.allclose(GeometricAugment.apply(pooled, *g), t_feat[i], atol=2e-3, rtol=2e-3)
                for g in gs
            ), f"{k}: the stored map was not transformed like the tile"
            assert torch.allclose(t_logits[i], t0, atol=2e-3, rtol=2e-3)  # logits: upright tile
            seen.add(gs[0])
        # the loss is the online loss on (g(x_s), t, g(pool(f_t)))
        ref_feat = torch.stack(
            [
                next(
                    GeometricAugment.apply(F.adaptive_max_pool2d(online[k][3][None], (2, 2))[0], *g)
                    for g in _d4()
                    if torch.equal(GeometricAugment.apply(online[k][0], *g), x_s[i])
                )
                for i, k in enumerate(batch.keys)
            ]
        )
        ref_logits = torch.stack([online[k][2] for k in batch.keys])
        total, _, _ = step(x_s, t_logits, t_feat)
        ref_total, _, _ = step(x_s, ref_logits, ref_feat)
        assert float(total.detach()) == pytest.approx(float(ref_total.detach()), rel=2e-3)
    loader.close()
    assert len(seen) >= 4  # the draws do vary


def test_stale_or_incompatible_targets_are_refused(
    geo_dataset: Path, geo_teacher: str, geo_targets: TargetsIndex, tmp_path: Path
) -> None:
    info = D.DatasetInfo.load(str(geo_dataset))
    other = _teacher(info, tmp_path / "other" / "checkpoint_epoch0001", 7)
    common = {"data": str(geo_dataset), "train_shards": list(geo_targets.shards),
              "student_mag": "5x", "teacher_mag": "10x"}  # fmt: skip
    check_for_distill(geo_targets.url, teacher_checkpoint=geo_teacher, **common)  # fine
    with pytest.raises(StaleTargetsError, match="stale targets"):
        check_for_distill(geo_targets.url, teacher_checkpoint=other, **common)
    with pytest.raises(StaleTargetsError, match="2p5x"):
        check_for_distill(geo_targets.url, teacher_checkpoint=geo_teacher,
                          **{**common, "student_mag": "2p5x"})  # fmt: skip
    with pytest.raises(StaleTargetsError, match="no targets for 1 shard"):
        check_for_distill(geo_targets.url, teacher_checkpoint=geo_teacher,
                          **{**common, "train_shards": ["test/shard-000000.tar"]})  # fmt: skip

    def args(*extra: str) -> Any:
        return parse(distill.SPEC,
            ["--data", str(geo_dataset), "--teacher", other, "--student-mag", "5x",
             "--targets", geo_targets.url, "--workers", "1", "--batch-size", "4", *extra]
        )  # fmt: skip

    with pytest.raises(UsageError, match="stale targets"):
        prepare(args())
    with pytest.raises(UsageError, match="--jitter is not allowed"):
        check(args("--jitter", "0.5,0.5,0.5,0.2"))
    with pytest.raises(UsageError, match="maxpool"):
        check(args("--feature-resize", "bicubic"))
    cfg = check(args())
    assert tuple(cfg.data.jitter) == (0.0, 0.0, 0.0, 0.0)  # the default jitter is switched off
    # the right teacher: a config that carries the targets and no jitter
    b = args()
    cfg = prepare(replace(b, teacher=replace(b.teacher, checkpoint=geo_teacher)))
    assert cfg.plan.targets["url"] == geo_targets.url and cfg.data.jitter == (0.0,) * 4


@pytest.mark.slow
def test_targets_on_s3_with_ray_tasks_and_cached_distillation(
    ray_cluster: str, tiny_dataset_s3: str, tmp_path: Path
) -> None:
    """Targets written by Ray tasks onto S3, read back by a 2-rank Ray Train distillation."""
    from sharding.storage import open_storage

    info = D.DatasetInfo.load(tiny_dataset_s3)
    local = _teacher(info, tmp_path / "t" / "checkpoint_epoch0001", 3)
    bucket = tiny_dataset_s3.split("/")[2]
    teacher_url = f"s3://{bucket}/teachers/t1/checkpoint_epoch0001"
    open_storage(teacher_url).put_file(T.MODEL_FILE, Path(local) / T.MODEL_FILE)
    out = f"s3://{bucket}/targets/t1"
    index = write_targets(TargetsConfig(data=tiny_dataset_s3, teacher=teacher_url, out=out,
                                        splits=("train", "unlabeled"), address=ray_cluster))  # fmt: skip
    assert index.url == out and index.doc["samples"] == 56 and index.doc["sizes"] == {"5x": [1, 1]}
    assert TargetsIndex.load(out).doc == index.doc
    assert open_storage(out).exists("train/shard-000002.npz")
    written = yaml.safe_load(open_storage(out).read_bytes("config.yaml"))  # beside the targets
    assert written["config"]["out"] == out and written["config"]["splits"] == ["train", "unlabeled"]
    assert (
        written["dataset"]["url"] == tiny_dataset_s3
        and len(written["dataset"]["fingerprint"]) == 16
    )

    argv = ["--data", tiny_dataset_s3, "--teacher", teacher_url, "--targets", out,
            "--student-mag", "5x", "--storage", f"s3://{bucket}/runs", "--name", "cached",
            "--workers", "2", "--batch-size", "8", "--loader-workers", "1", "--shuffle-buffer",
            "16", "--epochs", "2", "--steps-per-epoch", "3", "--jitter", "0",
            "--feature-weight", "1",  # the paper's term, so stored maps are read too
            "--no-teacher-eval", "--address", ray_cluster]  # fmt: skip
    summary = train_run(parse(distill.SPEC, argv))
    assert summary.epochs == 2
    trainer = T.load_checkpoint(summary.latest_checkpoint, T.TRAINER_FILE)
    history = trainer["state"]["history"]
    assert trainer["config"]["plan"]["targets"]["url"] == out
    assert all(h["train_loss"] > 0 for h in history)
    assert history[-1]["train_loss"] == pytest.approx(
        history[-1]["train_kd"] + history[-1]["train_feature"], rel=1e-4
    )


def test_command_line_in_process_and_bad_input(
    geo_dataset: Path, geo_teacher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resdistill import teacher_targets

    out = tmp_path / "tt"
    argv = ["--data", str(geo_dataset), "--teacher", geo_teacher, "--out", str(out), "--local",
            "--splits", "val", "--batch-size", "3"]  # fmt: skip
    assert teacher_targets.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"--targets {out}" in printed and "4 samples in 1 shards" in printed
    index = TargetsIndex.load(str(out))
    assert list(index.shards) == ["val/shard-000000.tar"] and index.sizes == {"5x": (2, 2)}
    # the targets root holds the resolved options: --config on them repeats this run
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["resdistill"]["command"] == "teacher-targets"
    from resdistill.commands import teacher_targets as command
    from resdistill.commands.generate import parse
    from resdistill.run_config import dataset_fingerprint

    raw = D.DatasetInfo.load(str(geo_dataset)).raw
    assert written["dataset"]["fingerprint"] == dataset_fingerprint(raw)

    assert parse(command.SPEC, ["--config", str(out / "config.yaml")]) == parse(command.SPEC, argv)
    bad = ["--data", str(geo_dataset), "--teacher", str(tmp_path / "nowhere"), "--local"]
    assert teacher_targets.main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("teacher-targets: error:") and "nowhere" in err[0]


def _student_accuracy(info: D.DatasetInfo, teacher_url: str, targets: TargetsIndex | None) -> float:
    """Distil a 5x student in-process for 20 steps (online teacher, or cached targets) with
    flips/rotations, then its accuracy on the val split."""
    torch.manual_seed(5)
    step = DistillStep(build_model("resnet18", 2), build_loss(LOSS_CFG, 512, 512))
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    common = {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 48, "steps": 20, "seed": 1}
    if targets is None:
        teacher = load_teacher(teacher_url)
        loader = D.make_loader(info, ["train", "unlabeled"], ["5x", "10x"], train=True,
                               augment=D.PairedAugment((0, 0, 0, 0)), **common)  # fmt: skip
    else:
        loader = make_cached_loader(info, ["train", "unlabeled"], "5x", targets,
                                    augment=GeometricAugment(), **common)  # fmt: skip
    step.train()
    for batch in loader.epoch():
        if targets is None:
            loss = distill_batch(step, teacher, batch)[0]
        else:
            loss = cached_distill_batch(step, batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader.close()
    student = step.student.eval()
    val = D.make_loader(info, ["val"], ["5x"], batch_size=16, train=False, num_workers=0)
    with torch.no_grad():
        correct = sum(
            int((student(b.images[0])[0].argmax(1) == b.labels).sum()) for b in val.epoch()
        )
    return correct / 16


@pytest.mark.slow
def test_cached_student_matches_online_student_quality(
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """Same seeds, same steps: the student distilled from cached targets scores like the one
    distilled online (tiny colour-coded dataset, 16 val samples)."""
    info = D.DatasetInfo.load(str(tiny_dataset))
    targets = write_targets(TargetsConfig(
        data=str(tiny_dataset), teacher=trained_teacher, out=str(tmp_path / "tt"),
        splits=("train", "unlabeled"), local=True,
    ))  # fmt: skip
    online = _student_accuracy(info, trained_teacher, None)
    cached = _student_accuracy(info, trained_teacher, targets)
    print(f"val accuracy: online {online:.4f}, cached {cached:.4f}")
    assert online >= 0.75 and cached >= 0.75
    assert abs(online - cached) <= 1 / 16 + 1e-9  # at most one of 16 samples apart


def test_cached_step_under_cpu_bf16_autocast_and_channels_last() -> None:
    """The GPU code path (bf16 autocast, channels_last) of the cached step, run on the CPU."""
    torch.manual_seed(6)
    step = DistillStep(build_model("resnet18", 3), build_loss(LOSS_CFG, 512, 512)).eval()
    batch = D.Batch(
        (torch.randn(4, 3, 64, 64), torch.randn(4, 3), torch.randn(4, 512, 2, 2)),
        torch.full((4,), -1),
        list("abcd"),
    )
    ref, ref_parts, _, _ = cached_distill_batch(step, batch)
    step = step.to(memory_format=torch.channels_last)
    cl = D.Batch(
        (batch.images[0].to(memory_format=torch.channels_last), *batch.images[1:]),
        batch.labels,
        batch.keys,
    )
    total, parts, s_logits, _ = cached_distill_batch(
        step, cl, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    assert s_logits.dtype == torch.bfloat16  # autocast really ran the student in bf16
    assert parts["kd"].dtype == torch.float32  # the losses are computed in float32
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=5e-2)
    total.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in step.student.parameters()
    )
