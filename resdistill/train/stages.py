"""What differs between the training stages, behind one small protocol (:class:`Stage`).

* :class:`SupervisedStage` - cross-entropy on labels at ``model.mag``: the teacher (the dataset's
  highest magnification) and the low-magnification baseline are the same stage at different
  magnifications; ``--label-fraction`` hides the labels of all but a share of the slides.
* :class:`DistillStage` - the student at ``model.mag`` learns the frozen teacher's outputs on
  the paired teacher-magnification tile, or on cached teacher targets (another data source, the
  same loss); labels are never read unless ``--ce-weight`` adds a cross-entropy term on the
  labelled tiles (the study's self-training control), and under ``--select distill-loss`` the
  checkpoint is chosen by that loss on the validation split's images
  (:mod:`resdistill.train.selection`).

The worker (:mod:`resdistill.train.worker`) owns everything else once for every stage: start-up,
restore, the epoch loop, validation, checkpoints and failure handling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from resdistill import data as D
from resdistill.config import STAGE_DISTILL, TrainConfig
from resdistill.data.augment import paired_augment
from resdistill.train.feature_tap import feature_tap
from resdistill.train.head import HeadStage, LabelledStageParts, build_network
from resdistill.train.selection import selection
from resdistill.train.teacher_net import (
    DistillStep,
    build_loss,
    cached_distill_batch,
    distill_batch,
    stream_teacher,
    teacher_head_weight,
)
from resdistill.train.validate import distill_loss, evaluate
from resdistill.train.worker_env import WorkerEnv
from sharding.magnification import display_mag


@dataclass
class WorkerContext:
    """What every stage reads on a worker: the run's config, the worker, the dataset."""

    cfg: TrainConfig
    env: WorkerEnv
    info: D.DatasetInfo
    manifest: Any
    log: Callable[[str], None]

    def loader_kwargs(self) -> dict[str, Any]:
        """The arguments every loader of this worker shares (rank, processes, manifest)."""
        return {
            "rank": self.env.rank,
            "world_size": self.env.world_size,
            "num_workers": self.cfg.data.loader_workers,
            "pin_memory": self.env.use_cuda,
            "manifest": self.manifest,
            "stain": self.cfg.data.stain_reference,
            "device": self.env.device,
        }

    def train_kwargs(self, start_epoch: int) -> dict[str, Any]:
        """The training loader's batching, shuffling and seeds (the epoch it starts at)."""
        data = self.cfg.data
        return {
            "batch_size": data.batch_size,
            "shuffle_buffer": data.shuffle_buffer,
            "seed": self.cfg.optim.seed,
            "epoch": start_epoch,
            "steps": self.cfg.plan.steps_per_epoch if self.cfg.plan else data.steps_per_epoch,
            "slides": self.cfg.plan.train_slides if self.cfg.plan else None,
            **self.loader_kwargs(),
        }

    def eval_loader(self, mag: str) -> Any:
        """One pass over the labelled samples of the validation split at ``mag``."""
        return D.make_loader(self.info, [self.cfg.data.val_split], [mag],
                             batch_size=self.cfg.data.eval_batch, train=False, labelled_only=True,
                             **self.loader_kwargs())  # fmt: skip


class Stage(Protocol):
    """A training stage: its networks, its batches and its loss.

    ``network`` is the classifier whose weights ``model.pt`` holds; ``trainable`` what DDP wraps
    and the optimiser steps (the network, or the network with trainable loss parts).
    """

    network: nn.Module
    trainable: nn.Module
    find_unused: bool  # DDP: some trainable parameters get no gradient

    def restore(self, trainer: Mapping[str, Any]) -> None:
        """Take back the stage's extras from a checkpoint's ``trainer.pt``."""

    def train_loader(self, start_epoch: int) -> Any:
        """The rank's training loader, built once per worker start."""

    def start(self) -> None:
        """Once per worker start, after the loaders (e.g. score the teacher)."""

    def batch_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, sums)``: the batch's mean loss (with gradients through ``model``, the
        prepared ``trainable``) and per-batch sums of the stage's ``train_*`` metrics, which the
        worker averages per sample over all ranks."""

    def val_metrics(self) -> dict[str, float]:
        """Extra metrics reported with every epoch's validation (after the labelled ones)."""

    def card_fields(self) -> dict[str, Any]:
        """``teacher`` and ``loss`` of the :class:`~resdistill.checkpoint.ModelCard`."""

    def trainer_extras(self) -> dict[str, Any]:
        """What ``trainer.pt`` holds for this stage besides optimizer, state and config."""

    def close(self) -> None:
        """Release what :meth:`start` opened (loaders); called once, also after a failure."""


class SupervisedStage(LabelledStageParts):
    """``cross_entropy(network(x), label)`` (label-smoothed when set) on labelled samples."""

    find_unused = False

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        self.network = build_network(cfg, ctx.info)
        self.trainable = self.network
        self.ce = nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)

    def restore(self, trainer: Mapping[str, Any]) -> None:
        pass

    def train_loader(self, start_epoch: int) -> Any:
        cfg, data = self.ctx.cfg, self.ctx.cfg.data
        labelled = cfg.plan.labelled_slides if cfg.plan else None
        return D.make_loader(
            self.ctx.info, list(data.train_splits), [cfg.model.mag], train=True,
            augment=paired_augment(data), labelled_only=True,
            labelled_slides=list(labelled) if labelled is not None else None,
            **self.ctx.train_kwargs(start_epoch),
        )  # fmt: skip

    def start(self) -> None:
        pass

    def batch_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env = self.ctx.env
        x = env.input(batch.images[0])
        y = batch.labels.to(env.device, non_blocking=True)
        with env.autocast():
            logits, _ = model(x)
        loss = self.ce(logits.float(), y)
        return loss, {"train_accuracy": (logits.detach().argmax(1) == y).sum()}


class DistillStage:
    """KD + feature loss from the frozen teacher (:class:`~resdistill.losses.DistillLoss`),
    online on the paired tile or from cached targets; the teacher is scored once on the
    validation split (``teacher_val_*``) unless ``teacher.evaluate`` is off. Selecting by
    ``distill-loss``, every validation also reports that loss on the validation split's pairs
    (``val_distill_loss``, :func:`~resdistill.train.validate.distill_loss`), the teacher run
    online even when training reads cached targets."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        cfg, env = ctx.cfg, ctx.env
        ref = cfg.teacher
        assert ref is not None and cfg.plan is not None, "distillation needs a planned config"
        self.ref = ref
        self.cached = cfg.plan.targets
        # built in this order after the seed: the student's init, then the teacher's, then the
        # loss's projection, so every run with the same seed starts from the same weights
        self.network = build_network(cfg, ctx.info)
        self.teacher = None
        self.by_loss = selection(cfg).rule == "distill-loss"
        self.val_pairs: Any = None
        if not self.cached or ref.evaluate or self.by_loss:
            stream = ctx.info.mean_std(ref.mag)
            self.teacher = stream_teacher(ref.checkpoint, ref.normalization, stream, env.device)
            if env.channels_last:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        head = None
        if cfg.loss.attention_weight > 0:
            head = (self.teacher.net.head_weight.detach() if self.teacher is not None
                    else teacher_head_weight(ref.checkpoint))  # fmt: skip
        tap = feature_tap(self.network, ctx.info.tile_px[cfg.model.mag], cfg.loss.feature_grid)
        self.loss = build_loss(cfg.loss, tap.channels, ref.feature_channels, head)
        self.trainable = DistillStep(self.network, self.loss, None if tap.last else tap.stage)
        self.find_unused = cfg.loss.kd_weight == 0
        self.ce_weight = cfg.loss.ce_weight
        self.teacher_val: dict[str, float] = {}

    def restore(self, trainer: Mapping[str, Any]) -> None:
        if trainer.get("loss"):
            self.loss.load_state_dict(trainer["loss"])
        self.teacher_val = dict(trainer.get("teacher_val") or {})

    def train_loader(self, start_epoch: int) -> Any:
        ctx, data = self.ctx, self.ctx.cfg.data
        s_mag = ctx.cfg.model.mag
        if self.cached:
            from resdistill.data.cached import GeometricAugment, make_cached_loader
            from resdistill.data.targets import TargetsIndex

            index = TargetsIndex(self.cached["url"], self.cached["doc"])
            return make_cached_loader(ctx.info, list(data.train_splits), s_mag, index,
                                      augment=GeometricAugment(flips=data.flips),
                                      **ctx.train_kwargs(start_epoch))  # fmt: skip
        labelled = ctx.cfg.plan.labelled_slides if ctx.cfg.plan else None
        return D.make_loader(
            ctx.info, list(data.train_splits), [s_mag, self.ref.mag], train=True,
            augment=paired_augment(data), labelled_only=False,
            labelled_slides=list(labelled) if labelled is not None else None,
            **ctx.train_kwargs(start_epoch),
        )  # fmt: skip

    def start(self) -> None:
        if self.teacher is not None and self.ref.evaluate and not self.teacher_val:
            self.teacher_val = self._score_teacher()
        if self.by_loss:
            ctx = self.ctx
            self.val_pairs = D.make_loader(
                ctx.info, [ctx.cfg.data.val_split], [ctx.cfg.model.mag, self.ref.mag],
                batch_size=ctx.cfg.data.eval_batch, train=False, labelled_only=False,
                **ctx.loader_kwargs(),
            )  # fmt: skip

    def _score_teacher(self) -> dict[str, float]:
        """The teacher's accuracy and macro F1 on the validation split at its magnification (all
        ranks), once per run: reported with every epoch as ``teacher_val_*`` for comparison."""
        ctx = self.ctx
        loader = ctx.eval_loader(self.ref.mag)
        try:
            scored = evaluate(self.teacher, loader, ctx.env, ctx.info.num_classes,
                              prefix="teacher_val_")  # fmt: skip
        finally:
            loader.close()
        out = {k: v for k, v in scored.items() if k.endswith(("accuracy", "macro_f1"))}
        if ctx.env.is_main:
            ctx.log(
                f"teacher on {ctx.cfg.data.val_split} at {display_mag(self.ref.mag)}: accuracy "
                f"{out['teacher_val_accuracy']:.4f}  macro F1 {out['teacher_val_macro_f1']:.4f}"
            )
        return out

    def batch_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        env, b = self.ctx.env, len(batch)
        if self.cached:
            loss, parts, logits, t_logits = cached_distill_batch(
                model, batch, move=env.input, autocast=env.autocast
            )
        else:
            loss, parts, logits, t_logits = distill_batch(
                model, self.teacher, batch, move=env.input, autocast=env.autocast
            )
        extra = {}
        if self.ce_weight > 0:  # semi-supervised only: at 0 the labels are never read
            ce = labelled_ce(logits, batch.labels.to(env.device, non_blocking=True))
            loss = loss + self.ce_weight * ce
            extra["train_ce"] = ce.detach() * b
        return loss, {
            **extra,
            "train_kd": parts["kd"].detach() * b,
            "train_feature": parts["feature"].detach() * b,
            **({"train_attention": parts["attention"].detach() * b} if self.loss.attention else {}),
            **({"train_kd_kept": parts["kd_kept"] * b} if "kd_kept" in parts else {}),
            "train_agreement": (logits.detach().argmax(1) == t_logits.argmax(1)).sum(),
        }

    def val_metrics(self) -> dict[str, float]:
        if self.val_pairs is None:
            return dict(self.teacher_val)
        env = self.ctx.env
        return {
            **self.teacher_val,
            **distill_loss(self.trainable, self.teacher, self.val_pairs, env),
        }

    def card_fields(self) -> dict[str, Any]:
        ref = self.ref
        loss = {k: v for k, v in asdict(self.ctx.cfg.loss).items() if k != "label_smoothing"}
        teacher = {"checkpoint": ref.checkpoint, "arch": ref.arch, "mag": ref.mag,
                   "classes": list(ref.classes)}  # fmt: skip
        return {"teacher": teacher, "loss": loss}

    def trainer_extras(self) -> dict[str, Any]:
        state = {k: v.detach().cpu() for k, v in self.loss.state_dict().items()}
        return {"teacher_val": dict(self.teacher_val), "loss": state}

    def close(self) -> None:
        if self.val_pairs is not None:
            self.val_pairs.close()
            self.val_pairs = None


def labelled_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the samples with a label (``labels >= 0``; -1 is a hidden or
    absent label); 0, still attached to ``logits`` (DDP reduces every gradient), when the
    batch has none."""
    known = labels >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits[known].float(), labels[known])


def make_stage(ctx: WorkerContext) -> Stage:
    """The stage of ``ctx.cfg.stage``: distillation, or supervised (teacher and baseline), on a
    frozen backbone's cached embeddings when the plan has them (:mod:`resdistill.train.head`)."""
    if ctx.cfg.stage == STAGE_DISTILL:
        return DistillStage(ctx)
    if ctx.cfg.plan is not None and ctx.cfg.plan.embeddings is not None:
        return HeadStage(ctx)  # a frozen backbone: the head learns from cached embeddings
    return SupervisedStage(ctx)
