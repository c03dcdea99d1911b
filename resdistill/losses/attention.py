"""Inter-resolution attention transfer (del Amor et al. 2024, arXiv:2401.06010)."""

from __future__ import annotations

import torch
from torch import nn

from resdistill.config import ATTENTION_MIN_PX
from resdistill.losses.feature import ResizeMode, resize_feature_map
from resdistill.losses.kd import _float32


def class_attention(
    features: torch.Tensor, head_weight: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Unit-norm class attention maps ``(N, H*W)`` of feature maps ``F`` ``(N, C, H, W)``::

        A[n] = relu(sum_c W[k_n, c] * F[n, c]),   a[n] = A[n] / max(||A[n]||_2, 1e-8)

    with ``W`` ``(K, C)`` the weight of a global-average-pool + linear head and ``k_n =
    classes[n]``. For such a head this is Grad-CAM (Selvaraju et al. 2017) up to a positive
    factor: ``d logit_k / d F[c, h, w] = W[k, c] / (H W)`` for every cell, so Grad-CAM's channel
    weights are ``W[k, :]`` scaled, and no backward pass is needed. A map that is 0 everywhere
    stays 0."""
    w = _float32(head_weight)[classes]
    maps = torch.einsum("nc,nchw->nhw", w, _float32(features)).clamp_min(0).flatten(1)
    return maps / maps.norm(dim=1, keepdim=True).clamp_min(1e-8)


class AttentionLoss(nn.Module):
    """Inter-resolution attention transfer (del Amor et al. 2024, arXiv:2401.06010): the student
    attends to where the teacher does, for the class the teacher predicts::

        k = argmax(t),  g = resize(f_t, (Hs, Ws))                  # as FeatureLoss
        L_att = mean_n sum_hw (class_attention(f_s, W_s, k) - class_attention(g, W_t, k))^2

    ``W_t`` is the frozen teacher's head weight (a buffer), ``W_s`` the student's (its gradient
    flows). The teacher map is resized before its attention is taken, so a teacher map cached at
    the student's size (``resdistill teacher-targets``) gives the same loss as the online one.
    A 1x1 student map has one cell, whose unit-norm attention is 1 whatever the input: the term
    is refused there (:class:`ValueError`): tiles at the student's magnification must give maps
    of 2x2 cells or more (:data:`~resdistill.config.ATTENTION_MIN_PX` for the ResNets). ``resize``
    and ``antialias`` are the feature term's (:func:`resize_feature_map`)."""

    def __init__(
        self, teacher_head: torch.Tensor, resize: ResizeMode = "maxpool", antialias: bool = True
    ) -> None:
        super().__init__()
        if teacher_head.dim() != 2:
            raise ValueError(f"teacher head weight must be (K, C), got {tuple(teacher_head.shape)}")
        self.resize: ResizeMode = resize
        self.antialias = antialias
        self.register_buffer("teacher_head", _float32(teacher_head.detach().clone()))

    def forward(
        self,
        student_features: torch.Tensor,
        student_head: torch.Tensor,
        teacher_features: torch.Tensor,
        teacher_logits: torch.Tensor,
    ) -> torch.Tensor:
        """The scalar attention loss (float32)."""
        s, t = student_features, teacher_features.detach()
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError("AttentionLoss expects (N, C, H, W) feature maps")
        if tuple(s.shape[-2:]) == (1, 1):
            raise ValueError(
                "attention transfer needs student feature maps of 2x2 cells or more, got 1x1: "
                f"use tiles of {ATTENTION_MIN_PX} px or more at the student's magnification, or "
                "drop it"
            )
        k = teacher_logits.detach().argmax(1)
        g = resize_feature_map(_float32(t), (s.shape[-2], s.shape[-1]), self.resize, self.antialias)
        a_s = class_attention(s, student_head, k)
        a_t = class_attention(g, self.teacher_head, k)
        return (a_s - a_t).pow(2).sum(1).mean()
