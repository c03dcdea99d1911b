"""Optimiser and learning-rate schedule of every training stage.

The schedule is a pure function of the global optimizer step (:func:`lr_at`), so a run resumed
from a checkpoint (its saved ``step``) continues the same curve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from resdistill.config import OPTIMIZERS, SCHEDULES, OptimConfig


def make_optimizer(
    params: Any, name: str = "adam", lr: float = 1e-3, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """Adam (the paper's choice), AdamW, or SGD with Nesterov momentum 0.9."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def lr_at(
    step: int, *, base_lr: float, total_steps: int, schedule: str, warmup_steps: int = 0
) -> float:
    """Learning rate at global ``step`` (0-based): linear warm-up over ``warmup_steps``, then

    * ``constant``: ``base_lr``;
    * ``cosine``: ``base_lr * 0.5 * (1 + cos(pi * t))``;
    * ``linear``: ``base_lr * (1 - t)``;

    with ``t = (step - warmup) / max(1, total - warmup)`` clipped to [0, 1].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return base_lr * (1.0 - t)
    return base_lr


def schedule_for(optim: OptimConfig, steps_per_epoch: int) -> Any:
    """``step -> lr`` of a run: :func:`lr_at` over ``epochs x steps_per_epoch`` steps with
    ``round(warmup_epochs x steps_per_epoch)`` warm-up steps."""
    total = optim.epochs * steps_per_epoch
    warmup = int(round(optim.warmup_epochs * steps_per_epoch))

    def lr(step: int) -> float:
        return lr_at(
            step, base_lr=optim.lr, total_steps=total, schedule=optim.schedule, warmup_steps=warmup
        )

    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
