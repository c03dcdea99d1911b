"""Knowledge distillation on logits (Hinton et al. 2015), with an optional confidence mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resdistill.config import LossConfig

_DEFAULT = LossConfig()  # the loss's defaults are the config's: declared once


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


class KDLoss(nn.Module):
    """Hinton knowledge distillation on logits, as in DiPalma et al. 2021 (arXiv:2101.04170).

    For student logits ``s`` and teacher logits ``t`` of shape ``(N, K)`` and temperature ``T``::

        p_t = softmax(t / T),  log q_s = log_softmax(s / T)
        L_KD = T^2 / N * sum_n m_n * sum_k p_t[n,k] * (log p_t[n,k] - log q_s[n,k])

    With ``threshold = 0`` (the paper) every ``m_n = 1``, i.e. ``F.kl_div(log_softmax(s/T),
    softmax(t/T), reduction="batchmean") * T * T``. The ``T^2`` factor keeps the gradient
    magnitude independent of ``T``. ``L_KD >= 0`` and it is 0 exactly when the two softmax
    distributions agree on the kept samples.

    ``threshold > 0`` is confidence masking of pseudo-labels (FixMatch, Sohn et al. 2020,
    arXiv:2001.07685): ``m_n = 1[max_k softmax(t)[n, k] >= threshold]``, the teacher's
    confidence read at temperature 1 whatever ``T``; a sample below it adds nothing, and the
    sum is still divided by the whole batch ``N``, as FixMatch's unlabelled loss is. The
    teacher logits are detached and cast to float32, so precomputed teacher logits stored in
    float16/bfloat16 are accepted.
    """

    def __init__(
        self, temperature: float = _DEFAULT.temperature, threshold: float = _DEFAULT.kd_threshold
    ) -> None:
        super().__init__()
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not (0.0 <= threshold < 1.0):
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        self.temperature = float(temperature)
        self.threshold = float(threshold)

    def confident(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``m``: a bool ``(N,)``, the samples the loss keeps (all of them at threshold 0)."""
        t = _float32(teacher_logits.detach())
        if self.threshold == 0:
            return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
        return F.softmax(t, dim=1).amax(dim=1) >= self.threshold

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Return the scalar KD loss (float32) for logits of shape ``(N, K)``."""
        if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
            raise ValueError(
                "KDLoss expects student and teacher logits of the same shape (N, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if student_logits.shape[0] == 0:
            raise ValueError("KDLoss got an empty batch (N = 0)")
        t = self.temperature
        log_q = F.log_softmax(_float32(student_logits) / t, dim=1)
        p = F.softmax(_float32(teacher_logits.detach()) / t, dim=1)
        if self.threshold == 0:
            return F.kl_div(log_q, p, reduction="batchmean") * (t * t)
        per_sample = F.kl_div(log_q, p, reduction="none").sum(dim=1)
        kept = self.confident(teacher_logits).to(per_sample.dtype)
        return (per_sample * kept).sum() / per_sample.shape[0] * (t * t)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, threshold={self.threshold}"
