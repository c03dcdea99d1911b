"""Which checkpoint a training run keeps (``--select``), and what that choice costs in labels.

Rules of ``run.select`` (:data:`resdistill.config.SELECT_RULES`):

* ``metric`` - the epoch with the best ``run.metric`` (``val_macro_f1`` unless set) on the
  labelled validation split. Those labels choose the model, so they belong to its label budget:
  a semi-supervised method tuned on a labelled validation set larger than its training labels
  is not label-scarce (Oliver et al. 2018, "Realistic Evaluation of Deep Semi-Supervised
  Learning Algorithms", NeurIPS). The summary states how many labelled validation slides chose.
* ``distill-loss`` - the epoch with the lowest distillation objective (KD + feature, + attention
  when on: :class:`resdistill.losses.DistillLoss`, the training loss itself) against the frozen
  teacher on the validation split's images, reported as ``val_distill_loss``. Images only: no
  label is read (:func:`resdistill.train.validate.distill_loss`), so the student stays
  label-free; its validation accuracy is still logged, for people, never used to choose.
* ``last`` - the last epoch (no validation score at all).
* ``auto`` - ``distill-loss`` for distillation, ``metric`` for the teacher and ``--supervised``
  baseline (both learn from labels anyway).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from resdistill.config import STAGE_DISTILL, TrainConfig

#: the reported metric each label-free rule chooses by, and whether lower or higher is better
DISTILL_LOSS_METRIC = "val_distill_loss"
RULE_METRIC = {"distill-loss": (DISTILL_LOSS_METRIC, "min"), "last": ("epoch", "max")}


@dataclass(frozen=True)
class Selection:
    """A resolved ``--select``: the ``rule``, the reported ``metric`` that ranks checkpoints and
    its ``mode``, and ``labelled_val_slides``, the validation slides whose labels choose (0 for
    the label-free rules), to count in the run's label budget."""

    rule: str
    metric: str
    mode: str
    labelled_val_slides: int = 0

    @property
    def uses_labels(self) -> bool:
        return self.rule == "metric"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """What chose the checkpoint, in words (the run's header and summary)."""
        if self.rule == "last":
            return "the last epoch (no labels)"
        if self.rule == "distill-loss":
            return f"lowest {self.metric} on the validation images, labels unread (label-free)"
        return (f"best {self.metric} on the labels of {self.labelled_val_slides} validation "
                "slides (count them in the label budget)")  # fmt: skip


def resolve_rule(cfg: TrainConfig) -> str:
    """``cfg.run.select`` with ``auto`` resolved by stage."""
    rule = cfg.run.select
    if rule == "auto":
        return "distill-loss" if cfg.stage == STAGE_DISTILL else "metric"
    return rule


def selection(cfg: TrainConfig) -> Selection:
    """The :class:`Selection` of ``cfg``; the labelled slide count comes from its plan (0 when
    the config is not planned yet)."""
    rule = resolve_rule(cfg)
    if rule in RULE_METRIC:
        metric, mode = RULE_METRIC[rule]
        return Selection(rule, metric, mode)
    slides = cfg.plan.n_val_slides if cfg.plan is not None else 0
    return Selection(rule, cfg.run.metric, cfg.run.mode, slides)
