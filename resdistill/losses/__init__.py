"""Resolution-distillation losses: knowledge distillation on logits plus a feature-map loss.

Method: DiPalma, Suriawinata, Tafe, Torresani, Hassanpour, "Resolution-Based Distillation for
Efficient Histology Image Classification", arXiv:2101.04170 (2021), Artificial Intelligence in
Medicine 119:102136. A frozen teacher sees a high-magnification tile, the student the *same region*
at a lower magnification; the student is trained with

    L = kd_weight * L_KD(s, t) + feature_weight * L_feat(f_s, f_t)

and **no labels**: every module here takes only student and teacher outputs, so a label can never
reach the loss. Teacher inputs are always detached: gradients flow to the student (and to the
optional channel projection of :class:`FeatureLoss`) only.

All arithmetic is done in float32, whatever the dtype of the inputs (teacher logits or feature maps
precomputed and stored as float16/bfloat16, or student outputs produced under autocast).
"""

from resdistill.losses.attention import AttentionLoss, class_attention
from resdistill.losses.feature import FeatureLoss, FeatureMode, ResizeMode, resize_feature_map
from resdistill.losses.kd import KDLoss
from resdistill.losses.total import DistillLoss

__all__ = [
    "AttentionLoss",
    "DistillLoss",
    "FeatureLoss",
    "FeatureMode",
    "KDLoss",
    "ResizeMode",
    "class_attention",
    "resize_feature_map",
]
