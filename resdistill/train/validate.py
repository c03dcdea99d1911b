"""Validation over all ranks: rank 0's buffers (BatchNorm statistics) are broadcast first, so every
rank scores the model rank 0 checkpoints; each rank scores its own samples, and the sums are added
with one ``all_reduce``.

* :func:`evaluate` - labelled: confusion matrices scored by
  :func:`resdistill.measures.metrics.confusion_scores` (the same metrics evaluation reports).
* :func:`distill_loss` - label-free: the distillation objective against the frozen teacher on
  the split's images (how a distilled student chooses its checkpoint, see
  :mod:`resdistill.train.selection`).
"""

from __future__ import annotations

from typing import Any

import torch

from resdistill.measures.metrics import confusion_scores
from resdistill.train.teacher_net import distill_batch
from resdistill.train.worker_env import WorkerEnv, all_reduce_sum, broadcast_buffers, unwrap


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` = samples of true class ``t`` predicted as ``p`` (int64; labels < 0 skipped)."""
    keep = labels >= 0
    idx = labels[keep].to(torch.int64) * num_classes + preds[keep].to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    env: WorkerEnv,
    num_classes: int,
    *,
    image_index: int = 0,
    prefix: str = "val_",
) -> dict[str, float]:
    """``{prefix}accuracy``, ``macro_f1``, ``samples`` and ``loss`` of ``model`` over ALL ranks.

    Rank 0's buffers are broadcast first (:func:`broadcast_buffers`); then each rank runs its
    own labelled samples through the unwrapped model (no per-batch collectives, so ranks may hold different sample counts); ``image_index`` picks the
    magnification of the batch to classify. ``loss`` is the mean cross-entropy (NaN when empty).
    """
    net = unwrap(model)
    broadcast_buffers(net, env)
    was_training = net.training
    net.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in loader.epoch():
        labels = batch.labels
        keep = labels >= 0
        if not bool(keep.any()):
            continue
        with env.autocast():
            logits, _ = net(env.input(batch.images[image_index]))
        logits = logits.float().cpu()
        loss_sum += float(
            torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        )
        n += int(keep.sum())
        cm += confusion_matrix(logits.argmax(1), labels, num_classes)
    net.train(was_training)
    packed = torch.cat(
        [cm.flatten().to(torch.float64), torch.tensor([loss_sum, n], dtype=torch.float64)]
    )
    packed = all_reduce_sum(packed, env)
    cells = num_classes * num_classes
    total_cm = packed[:cells].round().to(torch.int64).reshape(num_classes, num_classes)
    metrics = confusion_scores(total_cm.numpy())
    count = float(packed[-1])
    metrics["loss"] = float(packed[-2]) / count if count else float("nan")
    return {f"{prefix}{k}": v for k, v in metrics.items()}


#: the loss parts :func:`distill_loss` reports, beside the total
DISTILL_PARTS = ("kd", "feature", "attention")


@torch.no_grad()
def distill_loss(
    step: torch.nn.Module, teacher: torch.nn.Module, loader: Any, env: WorkerEnv, *,
    prefix: str = "val_",
) -> dict[str, float]:  # fmt: skip
    """The distillation objective of the student in ``step`` (a :class:`DistillStep`, possibly
    DDP-wrapped) on every pair ``loader`` yields, over ALL ranks, in eval mode; no label read.

    For ``N`` samples in batches ``b`` of ``n_b`` samples, ``{prefix}distill_loss`` =
    ``sum_b n_b * L_b / N`` with ``L_b`` the batch's training loss (:func:`distill_batch`, which
    never touches ``batch.labels``): the per-sample mean of the objective the student minimises,
    on data it does not learn from. Also ``{prefix}kd``, ``{prefix}feature`` (and
    ``{prefix}attention`` when on) likewise, ``{prefix}agreement`` (share of samples whose
    student and teacher top classes agree) and ``{prefix}distill_samples``; NaN when empty.
    """
    net = unwrap(step)
    broadcast_buffers(net, env)
    was_training = net.training
    net.eval()
    sums = torch.zeros(len(DISTILL_PARTS) + 3, dtype=torch.float64)  # parts, total, agree, n
    for batch in loader.epoch():
        total, parts, s_logits, t_logits = distill_batch(
            net, teacher, batch, move=env.input, autocast=env.autocast
        )
        n = s_logits.shape[0]
        for i, name in enumerate(DISTILL_PARTS):
            if name in parts:
                sums[i] += float(parts[name]) * n
        sums[-3] += float(total) * n
        sums[-2] += float((s_logits.argmax(1) == t_logits.argmax(1)).sum())
        sums[-1] += n
    net.train(was_training)
    sums = all_reduce_sum(sums, env)
    count = float(sums[-1])

    def mean(v: torch.Tensor) -> float:
        return float(v) / count if count else float("nan")

    out = {f"{prefix}distill_loss": mean(sums[-3]), f"{prefix}agreement": mean(sums[-2]),
           f"{prefix}distill_samples": count}  # fmt: skip
    attention = getattr(net, "loss", None) is not None and net.loss.attention is not None
    for i, name in enumerate(DISTILL_PARTS):
        if name != "attention" or attention:
            out[f"{prefix}{name}"] = mean(sums[i])
    return out
