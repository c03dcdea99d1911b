"""The frozen teacher and one distillation step (DiPalma et al. 2021, arXiv:2101.04170).

On a batch holding the student-magnification tiles ``x_s`` (``batch.images[0]``) and the
teacher-magnification tiles ``x_t`` of the same regions (``batch.images[1]``)::

    (t, f_t) = teacher(x_t)        # frozen, eval mode, no gradients
    (s, f_s) = student(x_s)
    L = kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))
      + feature_weight * mean((P(f_s) - resize(f_t, size(f_s)))^2)      (or |.| with l1)

(:class:`resdistill.losses.DistillLoss`; ``P`` a learnt 1x1 convolution only when student and
teacher feature channels differ). Neither :func:`distill_batch` nor :func:`cached_distill_batch`
reads ``batch.labels``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from resdistill.config import LossConfig
from resdistill.losses import DistillLoss


def renormalizer(
    src: tuple[Sequence[float], Sequence[float]], dst: tuple[Sequence[float], Sequence[float]]
) -> tuple[list[float], list[float]] | None:
    """Per-channel ``(scale, shift)`` turning inputs normalised with ``src = (mean, std)`` into
    inputs normalised with ``dst``: ``(x * std_s + mean_s - mean_d) / std_d = x * scale + shift``,
    ``scale = std_s / std_d``, ``shift = (mean_s - mean_d) / std_d``. None when both agree to 1e-6
    (the teacher then sees the stream's tensors unchanged).
    """
    (ms, ss), (md, sd) = src, dst
    if all(abs(a - b) <= 1e-6 for a, b in zip([*ms, *ss], [*md, *sd], strict=True)):
        return None
    scale = [float(s) / float(d) for s, d in zip(ss, sd, strict=True)]
    shift = [(float(a) - float(b)) / float(d) for a, b, d in zip(ms, md, sd, strict=True)]
    return scale, shift


class FrozenTeacher(nn.Module):
    """A teacher that cannot learn: parameters without gradients, always in eval mode
    (``train()`` is a no-op, so batch-norm statistics never move), forward under ``no_grad``.

    ``forward(x) = net(x * scale + shift)`` -> ``(logits, features)``; ``(scale, shift)`` (see
    :func:`renormalizer`) map the data stream's normalisation at the teacher's magnification onto
    the one the teacher was trained with, identity when they agree.
    """

    def __init__(
        self, net: nn.Module, renorm: tuple[Sequence[float], Sequence[float]] | None = None
    ) -> None:
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.renormalises = renorm is not None
        scale, shift = renorm if renorm is not None else ([1.0] * 3, [0.0] * 3)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval mode, whatever ``mode`` says."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.renormalises:
                x = x * self.scale + self.shift
            return self.net(x)


def teacher_head_weight(url: str) -> torch.Tensor:
    """The linear head's weight ``(K, C)`` of the teacher checkpoint ``url`` (for the attention
    term when the teacher itself is not loaded, i.e. with cached targets)."""
    from resdistill.checkpoint import load_model

    return load_model(url).model.head_weight.detach()


def load_teacher(url: str, device: torch.device | str = "cpu", renorm: Any = None) -> FrozenTeacher:
    """The teacher of checkpoint ``url``, read by :func:`resdistill.checkpoint.load_model`,
    frozen."""
    from resdistill.checkpoint import load_model

    return FrozenTeacher(load_model(url).model, renorm).to(device)


class DistillStep(nn.Module):
    """Student plus distillation loss in one module, so DDP averages the gradients of every
    trainable parameter (the loss's optional 1x1 channel projection included).

    ``forward(x_s, t_logits, t_features) -> (total, parts, s_logits)`` with ``(s_logits,
    s_features) = student(x_s)`` and ``(total, parts) = loss(s_logits, t_logits, s_features,
    t_features)``: no label anywhere. With ``stage`` (1..3, :mod:`resdistill.train.feature_tap`)
    the feature term reads that stage's map instead of the last one (``student_hint``).
    """

    def __init__(self, student: nn.Module, loss: DistillLoss, stage: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.stage = stage

    def forward(
        self, x: torch.Tensor, t_logits: torch.Tensor, t_features: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        hint = None
        if self.stage is None:
            s_logits, s_features = self.student(x)
        else:
            s_logits, maps = self.student.stage_maps(x)
            s_features, hint = maps[-1], maps[self.stage - 1]
        head = self.student.head_weight if self.loss.attention is not None else None
        total, parts = self.loss(s_logits, t_logits, s_features, t_features, head,
                                 student_hint=hint)  # fmt: skip
        return total, parts, s_logits


def build_loss(
    loss_cfg: LossConfig | Mapping[str, Any],
    student_channels: int,
    teacher_channels: int,
    teacher_head: torch.Tensor | None = None,
) -> DistillLoss:
    """:class:`DistillLoss` from a :class:`~resdistill.config.LossConfig` (or a mapping of its
    temperature, kd_weight, feature_weight, feature_loss, feature_resize, attention_weight,
    feature_grid, kd_threshold); with a trainable 1x1 projection ``student_channels ->
    teacher_channels`` when the two differ or the feature grid is on (``student_channels``:
    those of the map the feature term reads), and the feature term on; ``teacher_head`` (the
    teacher's head weight) is needed when the attention term is on."""
    if isinstance(loss_cfg, LossConfig):
        loss_cfg = asdict(loss_cfg)
    grid = int(loss_cfg.get("feature_grid", 0))
    proj = student_channels != teacher_channels or grid > 0
    return DistillLoss(
        kd_weight=loss_cfg["kd_weight"],
        feature_weight=loss_cfg["feature_weight"],
        temperature=loss_cfg["temperature"],
        feature_mode=loss_cfg["feature_loss"],
        resize=loss_cfg["feature_resize"],
        student_channels=student_channels if proj else None,
        teacher_channels=teacher_channels if proj else None,
        attention_weight=float(loss_cfg.get("attention_weight", 0.0)),
        teacher_head=teacher_head,
        kd_threshold=float(loss_cfg.get("kd_threshold", 0.0)),
        feature_grid=grid,
    )


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


def distill_batch(
    step: nn.Module,
    teacher: nn.Module,
    batch: Any,
    *,
    move: Callable[[torch.Tensor], torch.Tensor] = _as_is,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The distillation loss of one batch: ``(total, parts, student_logits, teacher_logits)``.

    Reads ``batch.images[0]`` (student magnification) and ``batch.images[1]`` (teacher
    magnification) and nothing else: ``batch.labels`` is never touched, so neither a label nor
    its absence (-1) can change the loss or its gradients. ``step`` is a (possibly DDP-wrapped)
    :class:`DistillStep`, ``teacher`` a :class:`FrozenTeacher`. ``move`` puts each input where the
    models are (a worker passes :meth:`resdistill.train.worker_env.WorkerEnv.input`).
    """
    x_s, x_t = move(batch.images[0]), move(batch.images[1])
    with autocast():
        t_logits, t_features = teacher(x_t)
        total, parts, s_logits = step(x_s, t_logits, t_features)
    return total, parts, s_logits, t_logits


def cached_distill_batch(
    step: nn.Module,
    batch: Any,
    *,
    move: Callable[[torch.Tensor], torch.Tensor] = _as_is,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`distill_batch` from cached teacher targets: ``batch.images`` is ``(x_s, t_logits,
    t_features)`` (:func:`resdistill.data.cached.make_cached_loader`), the teacher's feature map already pooled to
    the student's size (so ``DistillLoss``'s resize is the identity). Same loss, no teacher run;
    ``batch.labels`` is never read."""
    x_s, t_logits, t_features = (move(t) for t in batch.images)
    with autocast():
        total, parts, s_logits = step(x_s, t_logits, t_features)
    return total, parts, s_logits, t_logits


def stream_teacher(
    url: str,
    normalization: Mapping[str, Any] | None,
    stream_mean_std: tuple[Sequence[float], Sequence[float]],
    device: torch.device | str = "cpu",
) -> FrozenTeacher:
    """The teacher of checkpoint ``url`` fed by a data stream normalised with
    ``stream_mean_std`` (the dataset's statistics at the teacher's magnification), renormalised
    onto the teacher's own ``normalization`` (``{"mean", "std"}``, as
    :func:`resdistill.train.preflight.teacher_ref` records it; None: read from the checkpoint),
    which is :func:`resdistill.checkpoint.normalization_of`: the inputs evaluation gives it."""
    from resdistill.checkpoint import load_model, normalization_of

    teacher = load_model(url)
    if normalization:
        own = (normalization["mean"], normalization["std"])
    else:
        own = normalization_of(teacher)
    return FrozenTeacher(teacher.model, renormalizer(stream_mean_std, own)).to(device)
