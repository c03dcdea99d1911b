"""The feature term's geometry at the ratios that matter: with 128 px teacher tiles at 10x, the
student's last map is one cell at 2.5x (32 px) and 1.25x (16 px), so the paper's feature loss
compares global maxima; ``--feature-grid`` keeps a spatial grid there, and only it sees where
in the region the teacher's features are."""

from __future__ import annotations

import pytest
import torch

from resdistill.config import LossConfig
from resdistill.fields import ConfigError
from resdistill.losses import DistillLoss, FeatureLoss
from resdistill.models import build_model
from resdistill.train.feature_tap import feature_tap, stage_shapes
from resdistill.train.teacher_net import DistillStep, build_loss

TEACHER_PX = 128
STUDENT_PX = {"2p5x": 32, "1p25x": 16}
#: the stage the 2 x 2 grid reads, per student magnification
GRID2_STAGE = {"2p5x": 3, "1p25x": 2}
ARCHS = ("resnet-small", "resnet18")


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {arch: build_model(arch, 3).eval() for arch in ARCHS}


def _maps(net: torch.nn.Module, px: int, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    with torch.no_grad():
        return net.stage_maps(torch.rand(2, 3, px, px))[1]


def _permuted(t: torch.Tensor) -> torch.Tensor:
    """The teacher map with its cells moved (a cyclic shift by half the map, both axes): the
    same values per channel in other places."""
    h, w = t.shape[-2:]
    return torch.roll(t, shifts=(h // 2, w // 2), dims=(-2, -1))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_map_is_one_cell_and_stage_maps_agree_with_forward(arch, nets):
    torch.manual_seed(1)
    net = nets[arch]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits, last = net(x)
        logits2, maps = net.stage_maps(x)
    assert torch.equal(logits, logits2) and torch.equal(last, maps[-1])
    for mag, px in STUDENT_PX.items():
        assert stage_shapes(net, px)[-1][1:] == (1, 1), mag  # the paper's map: one cell
    assert stage_shapes(net, TEACHER_PX)[-1][1:] == (4, 4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mag", sorted(STUDENT_PX))
def test_grid_taps_a_spatial_stage_and_sees_a_spatial_permutation(arch, mag, nets):
    px = STUDENT_PX[mag]
    net = nets[arch]
    paper, tap = feature_tap(net, px, 0), feature_tap(net, px, 2)
    assert paper.last and paper.channels == net.feature_channels
    assert tap.stage == GRID2_STAGE[mag] and min(tap.size) >= 2  # spatial structure kept
    teacher, student = _maps(net, TEACHER_PX, seed=2), _maps(net, px, seed=3)
    t = teacher[-1]
    t_moved = _permuted(t)
    assert not torch.equal(t, t_moved)
    old = FeatureLoss()
    assert old(student[-1], t_moved).item() == old(student[-1], t).item()  # blind to where
    t_channels = t.shape[1]
    new = FeatureLoss(student_channels=tap.channels, teacher_channels=t_channels, grid=2)
    hint = student[tap.stage - 1]
    assert new(hint, t).item() != new(hint, t_moved).item()
    # what moved: the grid's targets (the old rule's single target did not move)
    pooled = torch.nn.functional.adaptive_max_pool2d
    moved = (pooled(t, 2) - pooled(t_moved, 2)).abs().mean() / pooled(t, 2).abs().mean()
    assert moved > 0.01, float(moved)
    assert torch.equal(pooled(t, 1), pooled(t_moved, 1))


def test_grid_four_at_the_teachers_own_grid(nets):
    net = nets["resnet-small"]
    assert feature_tap(net, 32, 4).stage == 2 and feature_tap(net, 16, 4).stage == 1
    with pytest.raises(ValueError, match="--feature-grid 8"):
        feature_tap(net, 16, 8)


def test_grid_loss_by_hand_and_zero_at_the_target():
    torch.manual_seed(4)
    t = torch.randn(2, 3, 4, 4)
    s = torch.randn(2, 5, 2, 2)
    loss = FeatureLoss(student_channels=5, teacher_channels=3, grid=2)
    p = loss.projection
    assert p is not None
    target = torch.nn.functional.adaptive_max_pool2d(t, 2)
    by_hand = ((p(s) - target) ** 2).mean()
    assert loss(s, t).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # a projection that reproduces the pooled teacher map is a zero loss
    with torch.no_grad():
        p.weight.zero_()
        p.bias.zero_()
    assert loss(s, t).item() == pytest.approx((target**2).mean().item(), rel=1e-6)
    # equal channels still learn a projection on the grid (another stage's channels)
    assert FeatureLoss(student_channels=3, teacher_channels=3, grid=2).projection is not None
    assert FeatureLoss(student_channels=3, teacher_channels=3).projection is None


def test_grid_refuses_maps_smaller_than_the_grid():
    loss = FeatureLoss(student_channels=4, teacher_channels=4, grid=2)
    with pytest.raises(ValueError, match="teacher's feature map is 1x1"):
        loss(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 1, 1))  # e.g. cached 1x1 targets
    with pytest.raises(ValueError, match="student's feature map is 1x1"):
        loss(torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="projection"):
        FeatureLoss(grid=2)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureLoss(grid=1)
    with pytest.raises(ConfigError, match="--feature-grid"):
        LossConfig(feature_grid=1)
    with pytest.raises(ConfigError, match="--feature-grid places the feature term, which is off"):
        LossConfig(feature_grid=2)  # the term is off by default: a grid alone would do nothing


def test_distill_step_on_the_grid_trains_the_tapped_stage():
    """The whole step, as a worker builds it: the tap from the tile size, the loss from the
    config; the feature term's gradient reaches the tapped stage and the projection."""
    torch.manual_seed(5)
    student, teacher = build_model("resnet-small", 3), build_model("resnet-small", 3).eval()
    cfg = LossConfig(feature_grid=2, kd_weight=0.0, feature_weight=1.0)
    tap = feature_tap(student, 32, cfg.feature_grid)
    loss = build_loss(cfg, tap.channels, teacher.feature_channels)
    step = DistillStep(student, loss, tap.stage)
    with torch.no_grad():
        t_logits, t_maps = teacher(torch.rand(4, 3, TEACHER_PX, TEACHER_PX))
    total, parts, logits = step(torch.rand(4, 3, 32, 32), t_logits, t_maps)
    assert logits.shape == (4, 3) and parts["feature"].item() > 0
    total.backward()
    assert student.net.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert student.net.layer4[0].conv1.weight.grad is None  # only the KD term reaches layer 4
    assert loss.feature.projection.weight.grad.abs().sum() > 0
    # the paper's rule: no tap, the last map, no projection for equal channels
    plain = DistillStep(student, build_loss(LossConfig(), 256, 256))
    assert plain.stage is None and plain.loss.feature.projection is None
    assert isinstance(plain.loss, DistillLoss)


def test_cached_targets_cannot_serve_the_grid():
    """Stored teacher maps are pooled to the student's last map: a run on the grid is refused
    them, and the study runs its teacher online."""
    from dataclasses import replace

    from resdistill.config import DataConfig, ModelConfig, TeacherRef, TrainConfig
    from resdistill.errors import UsageError
    from resdistill.study.shared_targets import can_share
    from resdistill.train.preflight import _check_targets

    cfg = TrainConfig("distill", DataConfig(url="/data", targets="/targets", jitter=(0, 0, 0, 0)),
                      ModelConfig(mag="2p5x"), loss=LossConfig(feature_grid=2, feature_weight=1.0),
                      teacher=TeacherRef(checkpoint="/t"))  # fmt: skip
    with pytest.raises(UsageError, match="--feature-grid"):
        _check_targets(cfg, print)
    online = replace(cfg, data=replace(cfg.data, targets=None))
    assert not can_share(online)
    assert can_share(replace(online, loss=LossConfig()))
    assert can_share(replace(online, loss=LossConfig(feature_weight=1.0)))
