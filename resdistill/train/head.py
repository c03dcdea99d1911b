"""A head trained on a frozen backbone's cached embeddings (``teacher --freeze-backbone``).

:class:`HeadStage` is a :class:`~resdistill.train.stages.Stage`: the network is the whole
:class:`~resdistill.backbones.timm_net.TimmClassifier` (frozen backbone from its weights file,
head), but what learns (``trainable``, the only part DDP wraps and the optimiser steps) is the
head alone, and its batches are rows of the embedding cache (:mod:`resdistill.train.embeddings`)::

    loss = cross_entropy(head(e), label)     # e: the stored embedding of a labelled tile

Each epoch draws a seeded permutation of the labelled training embeddings (the labelled slides
of ``--label-fraction`` only); rank ``r`` of ``W`` takes every ``W``-th row from ``r``, in
batches of ``--batch-size``, for the run's equal steps per epoch (cycling when short).
Validation scores the head on the validation split's cached embeddings with the same metrics as
every stage (:func:`resdistill.train.validate.evaluate`). No augmentation: the embeddings are of
the un-augmented tiles (said in the run's notes). The checkpoint is the usual one: the card, the
head and the input geometry buffers (the backbone is referenced by its weights file).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from resdistill.data import Batch
from resdistill.train.embeddings import read_embeddings
from resdistill.train.validate import evaluate


def build_network(cfg: Any, info: Any) -> nn.Module:
    """The stage's network: :func:`resdistill.models.build_model` of the run's backbone record
    with its weights file loaded; a timm network's input normalisation set from the dataset's
    statistics at the run's magnification (what the card records)."""
    from resdistill.models import build_model

    backbone = cfg.plan.backbone if cfg.plan else None
    net = build_model(cfg.model.arch, info.num_classes, backbone, pretrained=True)
    if hasattr(net, "set_input_normalization"):
        net.set_input_normalization(*info.mean_std(cfg.model.mag))
    return net


class EmbeddingLoader:
    """Batches of cached embeddings (see the module docstring); ``epoch()`` is the next epoch."""

    def __init__(self, emb: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 rank: int = 0, world_size: int = 1, steps: int | None = None, seed: int = 0,
                 epoch: int = 0) -> None:  # fmt: skip
        self.emb, self.labels = emb, labels
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.steps, self.seed, self.epoch_no = steps, seed, epoch

    def epoch(self) -> Iterator[Batch]:
        n = len(self.labels)
        if self.steps is None:  # evaluation: this rank's rows once, in order
            rows = torch.arange(self.rank, n, self.world)
            for i in range(0, len(rows), self.batch_size):
                yield self._batch(rows[i : i + self.batch_size])
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_no)
        self.epoch_no += 1
        rows = torch.randperm(n, generator=g)[self.rank :: self.world]
        if len(rows) == 0:
            return
        need = self.steps * self.batch_size
        rows = rows.repeat((need + len(rows) - 1) // len(rows))[:need]
        for i in range(self.steps):
            yield self._batch(rows[i * self.batch_size : (i + 1) * self.batch_size])

    def _batch(self, rows: torch.Tensor) -> Batch:
        return Batch((self.emb[rows],), self.labels[rows], [str(int(r)) for r in rows])

    def close(self) -> None:
        pass


class HeadOnly(nn.Module):
    """``e -> (head(e), e)``: the head in the ``(logits, features)`` form ``evaluate`` takes."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(e), e


class LabelledStageParts:
    """What a stage trained on labels alone reports beside its loss: no extra validation
    metrics, no teacher on its model card, no trainer extras, nothing to close. Shared by
    :class:`HeadStage` and :class:`resdistill.train.stages.SupervisedStage`."""

    ctx: Any

    def val_metrics(self) -> dict[str, float]:
        return {}

    def card_fields(self) -> dict[str, Any]:
        return {"teacher": None, "loss": {"label_smoothing": self.ctx.cfg.loss.label_smoothing}}

    def trainer_extras(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class HeadStage(LabelledStageParts):
    """See the module docstring."""

    find_unused = False

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        self.network = build_network(cfg, ctx.info)
        self.trainable = self.network.classifier
        self.ce = nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
        self.cache = dict(cfg.plan.embeddings)
        if "doc" not in self.cache:  # planned but not ensured by this driver (a Tune trial)
            from resdistill.train.embeddings import load_index

            doc = load_index(self.cache["url"], self.cache["key"])
            if doc is None:
                raise ValueError(f"{self.cache['url']}: no embeddings of this backbone yet: run "
                                 "`resdistill teacher ... --freeze-backbone` once to compute "
                                 "them")  # fmt: skip
            self.cache["doc"] = doc
        self.val: EmbeddingLoader | None = None

    def _rows(self, splits: Sequence[str], slides: Sequence[str] | None) -> tuple[Any, Any]:
        from resdistill.data import shard_keys

        keys = shard_keys(self.ctx.manifest, list(splits), labelled_only=True,
                          labelled_slides=slides)  # fmt: skip
        got = read_embeddings(self.cache["url"], self.cache["doc"], sorted(keys))
        keep = {k for ks in keys.values() for k in ks}
        idx = [i for i, k in enumerate(got["keys"]) if k in keep]
        emb = torch.from_numpy(got["emb"][idx]) if idx else torch.zeros(0, 1)
        return emb, torch.from_numpy(got["labels"][idx]).long()

    def restore(self, trainer: Mapping[str, Any]) -> None:
        pass

    def train_loader(self, start_epoch: int) -> EmbeddingLoader:
        cfg, env = self.ctx.cfg, self.ctx.env
        labelled = cfg.plan.labelled_slides
        emb, labels = self._rows(cfg.data.train_splits, labelled)
        return EmbeddingLoader(emb, labels, batch_size=cfg.data.batch_size, rank=env.rank,
                               world_size=env.world_size, steps=cfg.plan.steps_per_epoch,
                               seed=cfg.optim.seed, epoch=start_epoch)  # fmt: skip

    def start(self) -> None:
        cfg, env = self.ctx.cfg, self.ctx.env
        emb, labels = self._rows([cfg.data.val_split], None)
        self.val = EmbeddingLoader(emb, labels, batch_size=cfg.data.eval_batch, rank=env.rank,
                                   world_size=env.world_size)  # fmt: skip

    def batch_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        env = self.ctx.env
        e = batch.images[0].to(env.device, non_blocking=True)
        y = batch.labels.to(env.device, non_blocking=True)
        with env.autocast():
            logits = model(e)
        loss = self.ce(logits.float(), y)
        return loss, {"train_accuracy": (logits.detach().argmax(1) == y).sum()}

    def validate(self) -> dict[str, float]:
        """The head on the validation split's cached embeddings (all ranks)."""
        assert self.val is not None
        return evaluate(HeadOnly(self.network.classifier), self.val, self.ctx.env,
                        self.ctx.info.num_classes)  # fmt: skip
