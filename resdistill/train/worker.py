"""THE Ray Train function of every training stage (teacher, baseline, distillation), also run by
Tune's trials.

``train_worker(loop_config)`` with ``loop_config = {"config": TrainConfig.to_dict(),
"start_checkpoint": url or None}`` (:func:`loop_config`). On every DDP rank it: seeds and builds
the stage's networks (:mod:`resdistill.train.stages`), restores the run's latest checkpoint (after
a worker failure or a rerun with the same name) or else the start checkpoint (a Tune trial
continuing another run's checkpoint), wraps the trainable part in DDP, then runs
:func:`resdistill.train.loop.fit`: equal steps per rank, metrics averaged over all ranks,
validation from summed confusion matrices, a checkpoint reported every epoch, the best one
ranked by the run's :class:`~resdistill.train.selection.Selection` (recorded in ``trainer.pt``'s
state as ``selection``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from resdistill import data as D
from resdistill.backbones.geometry import input_geometry
from resdistill.checkpoint import ModelCard, read_chain
from resdistill.config import TrainConfig
from resdistill.train.loop import (
    EpochResult,
    Payload,
    Tracer,
    TrainState,
    console_log,
    fit,
    restore,
)
from resdistill.train.optim import make_optimizer, schedule_for, set_lr
from resdistill.train.selection import selection
from resdistill.train.stages import Stage, WorkerContext, make_stage
from resdistill.train.validate import evaluate
from resdistill.train.worker_env import prepare_model, reduce_means, worker_env


def loop_config(cfg: TrainConfig, start_checkpoint: str | None = None) -> dict[str, Any]:
    """The ``train_loop_config`` of :func:`train_worker`: plain values only."""
    return {"config": cfg.to_dict(), "start_checkpoint": start_checkpoint}


def model_card(cfg: TrainConfig, info: D.DatasetInfo, stage: Stage) -> ModelCard:
    """What ``model.pt`` says about the network a stage trains (see :class:`ModelCard`)."""
    mag = cfg.model.mag
    mean, std = info.mean_std(mag)
    ref = cfg.data.stain_reference
    stain = {"stain": dict(ref)} if ref else {}  # read back by ModelCard.stain_reference
    return ModelCard(
        stage=cfg.stage,
        arch=cfg.model.arch,
        classes=tuple(info.classes),
        mag=mag,
        tile_px=int(info.tile_px.get(mag, 0)),
        normalization={"mean": list(mean), "std": list(std), **stain},
        dataset=info.url,
        read_chain=read_chain(cfg.plan.dataset if cfg.plan else info.raw)
        | input_geometry(stage.network),
        train_splits=tuple(cfg.data.train_splits),
        backbone=cfg.plan.backbone if cfg.plan else None,
        **stage.card_fields(),
    )


def train_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank of a training run (see the module docstring)."""
    entered = time.time()
    cfg = TrainConfig.from_dict(loop_config["config"])
    assert cfg.plan is not None, "plan the config first (resdistill.train.preflight.prepare)"
    env = worker_env(cfg.speed)
    if env.use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed tile sizes: let cuDNN pick its kernels
    torch.manual_seed(cfg.optim.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    info = D.DatasetInfo.from_json(cfg.data.url, cfg.plan.dataset)
    log = console_log(f"[{cfg.stage}] ")
    ctx = WorkerContext(cfg, env, info, D.read_manifest(info.url), log)
    stage = make_stage(ctx)
    tracer = Tracer(cfg.run.trace_dir, env)

    restored = restore(loop_config.get("start_checkpoint"))
    state = TrainState()
    chosen = selection(cfg)
    if restored is not None:
        stage.network.load_state_dict(restored.model["state_dict"])
        stage.restore(restored.trainer)
        state = restored.state
        if state.selection.get("metric", chosen.metric) != chosen.metric:
            state.best_epoch = state.best_metric = None  # ranked by another rule before
        if env.is_main:
            log(f"resuming after epoch {state.epoch} from {restored.path}")
            if state.epoch >= cfg.optim.epochs:
                log(f"run already has {state.epoch} epochs: raise --epochs to train further")
    state.selection = chosen.to_dict()
    tracer.start(state.epoch, entered)
    model = prepare_model(stage.trainable, env, find_unused=stage.find_unused)
    optim = cfg.optim
    optimizer = make_optimizer(model.parameters(), optim.optimizer, optim.lr, optim.weight_decay)
    if restored is not None:
        optimizer.load_state_dict(restored.trainer["optimizer"])

    train_loader = val_loader = None
    try:
        train_loader = stage.train_loader(state.epoch)
        val_loader = ctx.eval_loader(cfg.model.mag)
        stage.start()
        steps = train_loader.steps or 1
        lr_at = schedule_for(optim, steps)
        log_every = cfg.run.log_every

        def train_epoch(epoch: int) -> EpochResult:
            model.train()
            sums: dict[str, torch.Tensor] = {"train_loss": torch.zeros((), device=env.device)}
            n = done = 0
            t0, first_step_s = time.perf_counter(), 0.0
            for batch in train_loader.epoch():
                set_lr(optimizer, lr_at(state.step))
                loss, batch_sums = stage.batch_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state.step += 1
                done += 1
                b = len(batch)
                if done == 1:
                    first_step_s = time.perf_counter() - t0
                sums["train_loss"] += loss.detach() * b
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0) + v
                n += b
                if log_every and env.is_main and done % log_every == 0:
                    log(f"epoch {epoch} step {done}/{steps} loss {float(loss):.4f}")
            metrics = reduce_means({k: float(v) for k, v in sums.items()}, n, env)
            metrics["lr"] = lr_at(state.step)
            # this rank's wait for its first batch plus that step: the loader's start-up on a
            # worker's first epoch, apart from the steady rate of the rest
            metrics["train_first_step_s"] = first_step_s
            return EpochResult(metrics, done, n)

        def validate(epoch: int) -> dict[str, float]:
            own = getattr(stage, "validate", None)  # a head on cached embeddings scores its own
            scored = own() if own else evaluate(stage.network, val_loader, env, info.num_classes)
            return {**scored, **stage.val_metrics()}

        def payload(st: TrainState) -> Payload:
            trainer = {"optimizer": optimizer.state_dict(), "state": st.to_dict(),
                       "config": cfg.to_dict(), **stage.trainer_extras()}  # fmt: skip
            return Payload(model_card(cfg, info, stage), stage.network.state_dict(), trainer)

        fit(env=env, state=state, epochs=optim.epochs, train_epoch=train_epoch,
            validate=validate, payload=payload, metric=chosen.metric, mode=chosen.mode,
            tracer=tracer, log=log)  # fmt: skip
    finally:
        for loader in (train_loader, val_loader):
            if loader is not None:
                loader.close()
        stage.close()
