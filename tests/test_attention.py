"""Inter-resolution attention transfer: class attention is Grad-CAM, the loss by hand, where its
gradients go, its place in DistillLoss, and a distillation step on real ResNets that learns it."""

from __future__ import annotations

import pytest
import torch

from resdistill.losses import AttentionLoss, DistillLoss, class_attention
from resdistill.models import build_model
from resdistill.train.teacher_net import DistillStep, FrozenTeacher


def grad_cam(model: torch.nn.Module, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by autograd: channel weights = spatial sum of d logit_k / d F, then relu(sum)."""
    f = features.detach().clone().requires_grad_(True)
    logits = model.head(f)
    picked = logits.gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, f)
    alpha = grad.sum(dim=(2, 3), keepdim=True)
    cam = (alpha * f).sum(1).clamp_min(0).flatten(1).detach()
    return cam / cam.norm(dim=1, keepdim=True).clamp_min(1e-8)


@pytest.mark.parametrize("arch", ["resnet-small", "resnet18"])
def test_class_attention_equals_grad_cam(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=3).eval()
    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        _, f = model(x)
    assert f.shape[-2:] == (4, 4)
    classes = torch.tensor([0, 1, 2, 1])
    got = class_attention(f, model.head_weight, classes)
    torch.testing.assert_close(got, grad_cam(model, f, classes), atol=1e-5, rtol=1e-4)
    assert torch.allclose(got.norm(dim=1), torch.ones(4), atol=1e-5)


def test_attention_loss_by_hand() -> None:
    # one channel, 2x2 maps; heads of two classes with weights (1, -1)
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    t = torch.tensor([[[[3.0, 4.0], [0.0, 0.0]]]])
    head = torch.tensor([[1.0], [-1.0]])
    loss = AttentionLoss(head)
    value = loss(s, head, t, torch.tensor([[2.0, 1.0]]))  # the teacher says class 0
    # a_s = (1, 0, 0, 0); a_t = (3, 4, 0, 0) / 5 -> (1 - 0.6)^2 + 0.8^2 = 0.16 + 0.64
    assert value.item() == pytest.approx(0.8)
    # class 1 turns both maps negative: relu leaves zeros, and zero maps match
    assert loss(s, head, t, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0)


def test_teacher_map_is_resized_like_the_feature_loss() -> None:
    torch.manual_seed(1)
    t = torch.rand(2, 8, 4, 4)
    head = torch.randn(3, 8)
    pooled = torch.nn.functional.adaptive_max_pool2d(t, (2, 2))
    logits = torch.randn(2, 3)
    loss = AttentionLoss(head)
    # a student identical to the pooled teacher, with the teacher's head, matches it exactly
    assert loss(pooled, head, t, logits).item() == pytest.approx(0.0, abs=1e-10)
    # a cached (already pooled) teacher map gives the online loss
    s = torch.rand(2, 8, 2, 2)
    assert loss(s, head, t, logits).item() == pytest.approx(loss(s, head, pooled, logits).item())


def test_one_cell_maps_are_refused() -> None:
    loss = AttentionLoss(torch.ones(2, 4))
    with pytest.raises(ValueError, match="2x2 cells or more"):
        loss(torch.rand(3, 4, 1, 1), torch.ones(2, 4), torch.rand(3, 4, 2, 2), torch.rand(3, 2))


def test_gradients_reach_the_student_only() -> None:
    torch.manual_seed(2)
    s = torch.rand(2, 8, 2, 2, requires_grad=True)
    s_head = torch.randn(3, 8, requires_grad=True)
    t = torch.rand(2, 8, 4, 4, requires_grad=True)
    loss = AttentionLoss(torch.randn(3, 8))
    loss(s, s_head, t, torch.randn(2, 3, requires_grad=True)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert s_head.grad is not None and s_head.grad.abs().sum() > 0
    assert t.grad is None and not loss.teacher_head.requires_grad
    assert [n for n, _ in loss.named_parameters()] == []  # nothing of the teacher learns


def test_attention_is_a_weighted_term_of_distill_loss() -> None:
    torch.manual_seed(3)
    head_t, head_s = torch.randn(3, 8), torch.randn(3, 8)
    s_logits, t_logits = torch.randn(4, 3), torch.randn(4, 3)
    s_f, t_f = torch.rand(4, 8, 2, 2), torch.rand(4, 8, 4, 4)
    plain = DistillLoss(temperature=2.0)
    with_att = DistillLoss(temperature=2.0, attention_weight=0.5, teacher_head=head_t)
    base, parts0 = plain(s_logits, t_logits, s_f, t_f)
    total, parts = with_att(s_logits, t_logits, s_f, t_f, head_s)
    att = AttentionLoss(head_t)(s_f, head_s, t_f, t_logits)
    assert parts0["attention"].item() == 0.0
    assert parts["attention"].item() == pytest.approx(att.item()) and att.item() > 0
    assert total.item() == pytest.approx(base.item() + 0.5 * att.item())
    with pytest.raises(ValueError, match="head weight"):
        DistillLoss(attention_weight=1.0)
    with pytest.raises(ValueError, match="student's head weight"):
        with_att(s_logits, t_logits, s_f, t_f)


def test_a_distillation_step_learns_the_teachers_attention() -> None:
    """A resnet-small student at 64 px (2x2 maps) distilled from a 128 px teacher (4x4) with
    only the attention term: a few Adam steps on one batch bring its attention to the teacher's."""
    torch.manual_seed(4)
    teacher = FrozenTeacher(build_model("resnet-small", 3))
    student = build_model("resnet-small", 3)
    loss = DistillLoss(kd_weight=1e-6, feature_weight=0.0, attention_weight=1.0,
                       teacher_head=teacher.net.head_weight)  # fmt: skip
    step = DistillStep(student, loss)
    x_t = torch.rand(8, 3, 128, 128)
    x_s = torch.nn.functional.avg_pool2d(x_t, 2)
    t_logits, t_f = teacher(x_t)
    opt = torch.optim.Adam(step.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        total, parts, _ = step(x_s, t_logits, t_f)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(parts["attention"].item())
    assert history[-1] < 0.5 * history[0], history
