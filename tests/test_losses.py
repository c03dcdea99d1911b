"""Distillation losses: hand computations, feature-map shapes for real ResNets, no labels, grads."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torchvision
from torch import nn

from resdistill.losses import DistillLoss, FeatureLoss, KDLoss, resize_feature_map

# Tile side in pixels of each magnification when the top magnification (10x) is tiled at 224 px.
TILE_PX = {"10x": 224, "5x": 112, "2p5x": 56, "1p25x": 28, "0p625x": 14}
# Expected last-conv map side of a torchvision resnet18 (stride 32, ceil through the stem) per tile.
EXPECTED_SIDE = {"10x": 7, "5x": 4, "2p5x": 2, "1p25x": 1, "0p625x": 1}
MAG_PAIRS = list(itertools.combinations(TILE_PX, 2))  # (teacher=higher, student=lower)


def resnet_logits_and_features(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and last conv feature map (before avgpool) of a torchvision ResNet."""
    m = model
    f = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    return m.fc(torch.flatten(m.avgpool(f), 1)), f


def softmax_list(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kd_by_hand(s: torch.Tensor, t: torch.Tensor, temperature: float) -> float:
    """sum_n sum_k p_t (log p_t - log p_s) / N * T^2, with explicit Python loops."""
    total = 0.0
    for s_row, t_row in zip(s.tolist(), t.tolist(), strict=True):
        ps = softmax_list(s_row, temperature)
        pt = softmax_list(t_row, temperature)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
    return total / s.shape[0] * temperature**2


@pytest.fixture(scope="module")
def resnet18_maps() -> dict[str, torch.Tensor]:
    """Real resnet18 last-conv feature maps for each magnification's tile size (batch of 2)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    out = {}
    with torch.no_grad():
        for mag, px in TILE_PX.items():
            out[mag] = resnet_logits_and_features(model, torch.rand(2, 3, px, px))[1]
    return out


# ----------------------------------------------------------------------------- KD
def test_kd_matches_hand_computation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    for temperature in (1.0, 2.0, 4.0):
        got = KDLoss(temperature)(s, t).item()
        assert got == pytest.approx(kd_by_hand(s, t, temperature), rel=1e-5)


def test_kd_hand_value_two_classes() -> None:
    # s uniform, t = softmax([ln 3, 0]) = [3/4, 1/4]: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert KDLoss(1.0)(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_temperature_squared_scaling() -> None:
    # Scaling both logit sets by T at temperature T gives the T=1 distributions, times T^2.
    torch.manual_seed(1)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    base = KDLoss(1.0)(s, t).item()
    for temperature in (2.0, 3.0):
        scaled = KDLoss(temperature)(s * temperature, t * temperature).item()
        assert scaled == pytest.approx(base * temperature**2, rel=1e-5)


def test_kd_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(2)
    t = torch.randn(6, 3)
    assert KDLoss(2.0)(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    assert KDLoss(1.0)(t + 5.0, t).item() == pytest.approx(0.0, abs=1e-6)  # softmax shift-invariant
    assert KDLoss(1.0)(torch.randn(6, 3), t).item() > 0


def test_kd_accepts_half_precision_teacher_logits() -> None:
    torch.manual_seed(3)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    for dtype in (torch.float16, torch.bfloat16):
        t_low = t.to(dtype)
        loss = KDLoss(2.0)(s, t_low)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(kd_by_hand(s.detach(), t_low.float(), 2.0), rel=1e-5)


def test_kd_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)
    with pytest.raises(ValueError, match="same shape"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty"):
        KDLoss()(torch.zeros(0, 3), torch.zeros(0, 3))


def test_kd_threshold_masks_unconfident_teachers_by_hand() -> None:
    """FixMatch's rule: a sample teaches only when the teacher's top probability at T=1 reaches
    the threshold; the sum is over the kept samples, divided by the whole batch."""
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.1, 0.2]])
    t = torch.tensor([[6.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 5.0]])
    top = torch.softmax(t, 1).amax(1)
    assert top[0] > 0.95 and top[1] < 0.95 and top[2] > 0.95
    for temperature in (1.0, 4.0):
        kept = [kd_by_hand(s[i : i + 1], t[i : i + 1], temperature) for i in (0, 2)]
        loss = KDLoss(temperature, threshold=0.95)
        assert loss(s, t).item() == pytest.approx(sum(kept) / 3, rel=1e-5)
        assert loss.confident(t).tolist() == [True, False, True]
    assert KDLoss(1.0, 0.0)(s, t).item() == pytest.approx(kd_by_hand(s, t, 1.0), rel=1e-5)
    assert KDLoss(1.0, 0.999)(s, t).item() == 0.0  # nobody confident enough: no signal
    with pytest.raises(ValueError, match="threshold"):
        KDLoss(1.0, 1.0)
    total, parts = DistillLoss(feature_weight=0.0, temperature=1.0, kd_threshold=0.95)(s, t)
    assert parts["kd_kept"].item() == pytest.approx(2 / 3)
    assert "kd_kept" not in DistillLoss(feature_weight=0.0)(s, t)[1]


# ----------------------------------------------------------------------------- feature maps
def test_resnet18_feature_map_sides(resnet18_maps: dict[str, torch.Tensor]) -> None:
    for mag, side in EXPECTED_SIDE.items():
        assert tuple(resnet18_maps[mag].shape) == (2, 512, side, side), mag


def test_maxpool_windows_by_hand() -> None:
    # 7 -> 4: windows [floor(i*7/4), ceil((i+1)*7/4)) = [0,2) [1,4) [3,6) [5,7)
    torch.manual_seed(4)
    t = torch.randn(1, 2, 7, 7)
    got = resize_feature_map(t, (4, 4), "maxpool")
    windows = [(0, 2), (1, 4), (3, 6), (5, 7)]
    for c in range(2):
        for i, (r0, r1) in enumerate(windows):
            for j, (c0, c1) in enumerate(windows):
                cells = [t[0, c, r, q].item() for r in range(r0, r1) for q in range(c0, c1)]
                assert got[0, c, i, j].item() == max(cells)
    # any map -> 1x1 is the global max
    assert resize_feature_map(t, (1, 1))[0, :, 0, 0].tolist() == t.amax(dim=(2, 3))[0].tolist()


def test_feature_mse_and_l1_by_hand() -> None:
    torch.manual_seed(5)
    t = torch.randn(2, 3, 4, 4)
    s = torch.randn(2, 3, 2, 2)
    # target cell (i, j) is the max of the 2x2 block (2i..2i+1, 2j..2j+1)
    sq = ab = 0.0
    count = 0
    for n, c, i, j in itertools.product(range(2), range(3), range(2), range(2)):
        block = [t[n, c, 2 * i + a, 2 * j + b].item() for a in range(2) for b in range(2)]
        diff = s[n, c, i, j].item() - max(block)
        sq += diff * diff
        ab += abs(diff)
        count += 1
    assert FeatureLoss("mse")(s, t).item() == pytest.approx(sq / count, rel=1e-5)
    assert FeatureLoss("l1")(s, t).item() == pytest.approx(ab / count, rel=1e-5)


@pytest.mark.parametrize("resize", ["maxpool", "bicubic"])
@pytest.mark.parametrize(("teacher_mag", "student_mag"), MAG_PAIRS)
def test_feature_loss_every_magnification_pair(
    resnet18_maps: dict[str, torch.Tensor], teacher_mag: str, student_mag: str, resize: str
) -> None:
    t = resnet18_maps[teacher_mag]
    s = resnet18_maps[student_mag].clone().requires_grad_(True)
    side = EXPECTED_SIDE[student_mag]
    target = resize_feature_map(t, (side, side), resize)  # type: ignore[arg-type]
    assert tuple(target.shape) == (2, 512, side, side)
    assert torch.isfinite(target).all()
    loss = FeatureLoss("mse", resize)(s, t)  # type: ignore[arg-type]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.shape == s.shape
    # the student reproducing the resized teacher map is a zero loss
    assert FeatureLoss("mse", resize)(target.clone(), t).item() == pytest.approx(0.0, abs=1e-10)  # type: ignore[arg-type]


@pytest.mark.parametrize("resize", ["maxpool", "bicubic"])
def test_feature_same_size_is_identity(resnet18_maps: dict[str, torch.Tensor], resize: str) -> None:
    for mag, t in resnet18_maps.items():
        assert resize_feature_map(t, tuple(t.shape[-2:]), resize) is t, mag  # type: ignore[arg-type]
        assert FeatureLoss("mse", resize)(t.clone(), t).item() == 0.0  # type: ignore[arg-type]
        assert FeatureLoss("l1", resize)(t + 1.0, t).item() == pytest.approx(1.0, rel=1e-6)  # type: ignore[arg-type]


def test_bicubic_to_one_cell_uses_whole_map() -> None:
    # antialiased bicubic shrink is a weighted average of the whole map: a constant stays constant,
    # and a single changed cell anywhere changes the result (no point sampling).
    const = torch.full((1, 1, 7, 7), 3.0)
    assert resize_feature_map(const, (1, 1), "bicubic").item() == pytest.approx(3.0, rel=1e-5)
    corner = const.clone()
    corner[0, 0, 0, 0] = 100.0
    assert resize_feature_map(corner, (1, 1), "bicubic").item() != pytest.approx(3.0, rel=1e-5)


def test_student_larger_than_teacher_replicates_teacher() -> None:
    t = torch.arange(4.0).view(1, 1, 2, 2)
    up = resize_feature_map(t, (4, 4), "maxpool")
    assert up[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert tuple(resize_feature_map(t, (4, 4), "bicubic").shape) == (1, 1, 4, 4)


def test_channel_mismatch_error_and_projection() -> None:
    torch.manual_seed(6)
    student = torchvision.models.resnet18(num_classes=3)
    teacher = torchvision.models.resnet50(num_classes=3).eval()
    with torch.no_grad():
        _, ft = resnet_logits_and_features(teacher, torch.rand(2, 3, 64, 64))
    _, fs = resnet_logits_and_features(student, torch.rand(2, 3, 32, 32))
    assert ft.shape[1] == 2048 and fs.shape[1] == 512
    with pytest.raises(ValueError, match="student_channels=512, teacher_channels=2048"):
        FeatureLoss()(fs, ft)
    loss_fn = FeatureLoss(student_channels=512, teacher_channels=2048)
    assert loss_fn.projection is not None
    loss = loss_fn(fs, ft)
    loss.backward()
    assert loss_fn.projection.weight.grad is not None
    assert student.layer4[-1].conv2.weight.grad is not None
    with pytest.raises(ValueError, match="both"):
        FeatureLoss(student_channels=512)
    assert FeatureLoss(student_channels=512, teacher_channels=512).projection is None


# ----------------------------------------------------------------------------- DistillLoss
def test_no_projection_without_the_feature_term() -> None:
    """A projection the loss never uses would be a parameter without a gradient (DDP hangs on
    it): with ``feature_weight=0`` none is built, whatever the channel counts."""
    off = DistillLoss(feature_weight=0.0, student_channels=256, teacher_channels=512)
    assert off.feature.projection is None and list(off.parameters()) == []
    on = DistillLoss(feature_weight=1.0, student_channels=256, teacher_channels=512)
    assert on.feature.projection is not None


def test_distill_loss_is_weighted_sum() -> None:
    torch.manual_seed(7)
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    fs, ft = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 7, 7)
    loss_fn = DistillLoss(kd_weight=0.5, feature_weight=2.0, temperature=2.0, feature_mode="l1")
    total, parts = loss_fn(s, t, fs, ft)
    kd = KDLoss(2.0)(s, t).item()
    feat = FeatureLoss("l1")(fs, ft).item()
    assert parts["kd"].item() == pytest.approx(kd_by_hand(s, t, 2.0), rel=1e-5)
    assert parts["feature"].item() == pytest.approx(feat, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * kd + 2.0 * feat, rel=1e-5)
    assert parts["total"].item() == pytest.approx(total.item())
    # a term switched off needs no inputs
    kd_only, parts = DistillLoss(feature_weight=0.0, temperature=2.0)(s, t)
    assert kd_only.item() == pytest.approx(kd, rel=1e-6) and parts["feature"].item() == 0.0
    with pytest.raises(ValueError, match="features"):
        DistillLoss(feature_weight=1.0)(s, t)


def test_distill_forward_takes_no_labels() -> None:
    params = list(inspect.signature(DistillLoss.forward).parameters)
    assert params == [
        "self",
        "student_logits",
        "teacher_logits",
        "student_features",
        "teacher_features",
        "student_head",
        "student_hint",  # another student map, for the feature grid
    ]
    with pytest.raises(TypeError):
        DistillLoss()(torch.zeros(2, 3), torch.zeros(2, 3), labels=torch.zeros(2))  # type: ignore[call-arg]


class TinyNet(nn.Module):
    """Conv feature map + linear head, like a ResNet's last stage, small enough for a unit test."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x))
        return self.fc(f.mean(dim=(2, 3))), f


def distill_batch_loss(
    batch: dict[str, torch.Tensor], student: nn.Module, teacher: nn.Module, loss_fn: DistillLoss
) -> torch.Tensor:
    """What a training step does: student on the low mag, teacher on the high mag, no label."""
    s_logits, s_feat = student(batch["5x"])
    t_logits, t_feat = teacher(batch["10x"])
    return loss_fn(s_logits, t_logits, s_feat, t_feat)[0]


def test_loss_identical_when_labels_shuffled() -> None:
    torch.manual_seed(8)
    student, teacher = TinyNet(), TinyNet().eval()
    batch = {
        "10x": torch.rand(6, 3, 32, 32),
        "5x": torch.rand(6, 3, 16, 16),
        "label": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    shuffled = dict(batch, label=batch["label"][torch.randperm(6)].flip(0))
    assert not torch.equal(shuffled["label"], batch["label"])
    loss_fn = DistillLoss(temperature=2.0)
    a = distill_batch_loss(batch, student, teacher, loss_fn)
    b = distill_batch_loss(shuffled, student, teacher, loss_fn)
    no_labels = distill_batch_loss({k: batch[k] for k in ("10x", "5x")}, student, teacher, loss_fn)
    assert a.item() > 0
    assert torch.equal(a, b) and torch.equal(a, no_labels)


def test_gradients_flow_to_student_only() -> None:
    torch.manual_seed(9)
    student, teacher = TinyNet(), TinyNet()  # teacher deliberately not frozen nor under no_grad
    x_hi, x_lo = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 16, 16)
    for resize in ("maxpool", "bicubic"):
        student.zero_grad(set_to_none=True)
        teacher.zero_grad(set_to_none=True)
        s_logits, s_feat = student(x_lo)
        t_logits, t_feat = teacher(x_hi)
        total, _ = DistillLoss(resize=resize)(s_logits, t_logits, s_feat, t_feat)
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
