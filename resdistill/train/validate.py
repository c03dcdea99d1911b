"""Validation over all ranks: rank 0's buffers (BatchNorm statistics) are broadcast first, so every
rank scores the model rank 0 checkpoints; each rank scores its own samples, the confusion matrices
and loss sums are added with one ``all_reduce``, and the totals are scored by
:func:`resdistill.measures.metrics.confusion_scores` (the same metrics evaluation reports)."""

from __future__ import annotations

from typing import Any

import torch

from resdistill.measures.metrics import confusion_scores
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
