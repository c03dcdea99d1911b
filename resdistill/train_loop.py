"""Ray Train machinery shared by the training stages (teacher, distillation).

Driver side (the process that runs ``python -m resdistill.teacher`` or ``ray job submit``):

* :func:`ray_init` - connect to a given cluster (``--address``), to the cluster of a submitted
  job (``RAY_ADDRESS``), or start a local Ray bound to 127.0.0.1. The standard AWS variables
  of the driver (endpoint, region, credentials) travel to every actor of the job through its
  ``runtime_env`` so workers read ``s3://`` data and write checkpoints like the driver does.
* :func:`run_config` / :func:`storage_for` - ``RunConfig`` with the run's ``storage_path`` on a
  local folder or ``s3://bucket/prefix`` (a ``pyarrow.fs.S3FileSystem`` built from
  ``AWS_ENDPOINT_URL``), ``FailureConfig(max_failures)`` and a ``CheckpointConfig`` that keeps
  the best checkpoint by a validation metric plus the latest.
* :func:`launch` - a ``TorchTrainer`` (gloo on CPU, NCCL on GPU) run to completion.
* :func:`summarize` / :func:`print_summary` - best epoch, metrics and checkpoint URLs.
* :func:`load_checkpoint` - a checkpoint file from a checkpoint URL, ``weights_only=True``.

Worker side (inside the training function):

* :func:`worker_env` - rank, world size, device, bf16 autocast on GPU (no-op on CPU).
* :func:`restore` - the latest checkpoint of the run (after a worker failure or a rerun with the
  same name: Ray Train V2 reloads the run's checkpoint snapshot from ``storage_path/name``).
* :func:`evaluate` - accuracy and macro F1 from confusion matrices summed over all ranks.
* :func:`fit` - the epoch loop: train, validate, report metrics with a checkpoint each epoch.

Checkpoint layout (a directory per epoch, ``checkpoint_epochNNNN``): ``model.pt`` (weights and the
model's metadata), ``trainer.pt`` (optimizer state and :class:`TrainState`), ``meta.json``
(human-readable: epoch, metrics, model metadata). All ``.pt`` files hold only tensors and plain
containers so that ``torch.load(..., weights_only=True)`` reads them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from resdistill.checkpoint import (  # noqa: F401 - re-exported until the stages move
    CHECKPOINT_FORMAT,
    META_FILE,
    MODEL_FILE,
    TRAINER_FILE,
    checkpoint_url,
    load_checkpoint,
)
from resdistill.config import DEFAULT_METRIC
from resdistill.train.runner import (  # noqa: F401 - re-exported until the stages move
    RunSummary,
    launch,
    make_trainer,
    print_summary,
    run_config,
    run_url,
    storage_for,
    summarize,
)
from sharding.ray_cluster import ray_init  # noqa: F401 - re-exported until the stages move

# --------------------------------------------------------------------------------------------------
# Worker: environment, state, metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerEnv:
    """Where this training worker runs, and how its model and inputs are laid out.

    ``amp``: see :data:`resdistill.train_options.AMP_MODES`; ``channels_last``: NHWC weights and inputs (faster
    convolutions on tensor cores and oneDNN); ``compile``: a ``torch.compile`` backend name
    (``""``: eager), applied by :func:`prepare_model` after the DDP wrap.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp: str = "auto"
    channels_last: bool = False
    compile: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on the worker's device when ``amp`` is ``bf16`` (or ``auto`` on CUDA);
        a no-op context otherwise. Losses are computed in float32 outside it."""
        if self.amp == "bf16" or (self.amp == "auto" and self.use_cuda):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the worker's device (non-blocking: pinned batches overlap the copy), NHWC
        when ``channels_last`` and ``x`` is an image batch."""
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    @property
    def distributed(self) -> bool:
        import torch.distributed as dist

        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _quiet_train_reports() -> None:
    """Ray Train V2 logs every ``report`` at INFO with its whole metrics dict ("Reporting training
    result N: ..."), which the driver prints beside our one-line epoch summary; keep its
    warnings only. (The logger is named after its module's file.)"""
    with contextlib.suppress(Exception):  # a private module: a Ray upgrade may move it
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_env(config: Mapping[str, Any] | None = None) -> WorkerEnv:
    """The :class:`WorkerEnv` of the calling Ray Train worker (CPU unless it holds a GPU), with
    ``amp``, ``channels_last`` and ``compile`` from the worker ``config`` when given."""
    import ray.train
    import ray.train.torch

    _quiet_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    config = config or {}
    return WorkerEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=device,
        amp=str(config.get("amp") or "auto"),
        channels_last=bool(config.get("channels_last")),
        compile=str(config.get("compile") or ""),
    )


def prepare_model(
    model: torch.nn.Module, env: WorkerEnv, *, find_unused: bool = False
) -> torch.nn.Module:
    """Lay out, move, wrap and compile ``model`` for the worker.

    NHWC weights when ``env.channels_last``; moved to ``env.device`` and wrapped in DDP when
    there is more than one worker (``find_unused_parameters`` when asked); then
    ``torch.compile(model, backend=env.compile)`` when set (compiling the DDP wrapper lets
    torch's DDPOptimizer split the graph at bucket boundaries). :func:`unwrap` gets the module
    back for checkpoints.
    """
    import ray.train.torch

    if env.channels_last:
        model = model.to(memory_format=torch.channels_last)
    kwargs = {"find_unused_parameters": True} if find_unused else None
    model = ray.train.torch.prepare_model(
        model, move_to_device=env.device, parallel_strategy_kwargs=kwargs
    )
    if env.compile:
        model = torch.compile(model, backend=env.compile)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile`` and DDP wrappers (the model itself otherwise)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def all_reduce_sum(tensor: torch.Tensor, env: WorkerEnv) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place; unchanged on one worker). gloo-safe on CPU."""
    if env.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_means(sums: Mapping[str, float], count: float, env: WorkerEnv) -> dict[str, float]:
    """``{k: sum_over_ranks(sums[k]) / sum_over_ranks(count)}`` (NaN when the count is 0)."""
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys] + [float(count)], dtype=torch.float64)
    if env.use_cuda:
        t = t.to(env.device)
    t = all_reduce_sum(t, env).cpu()
    total = float(t[-1])
    return {k: (float(t[i]) / total if total else float("nan")) for i, k in enumerate(keys)}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` = samples of true class ``t`` predicted as ``p`` (int64; labels < 0 skipped)."""
    keep = labels >= 0
    idx = labels[keep].to(torch.int64) * num_classes + preds[keep].to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from a confusion matrix (rows true, columns predicted).

    ``accuracy = trace(cm) / sum(cm)``; per class ``F1_c = 2 TP / (2 TP + FP + FN)``; macro F1 is
    the mean over classes that occur among the labels or the predictions (as scikit-learn's
    ``f1_score(average="macro")``, whose default label set is exactly those). NaN when empty.
    """
    cm = cm.to(torch.float64)
    total = float(cm.sum())
    if total == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "samples": 0.0}
    tp = torch.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum()) / total,
        "macro_f1": float(f1[present].mean()),
        "samples": total,
    }


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
    """Loss, accuracy and macro F1 of ``model`` on the loader's batches, over ALL ranks.

    Each rank runs its own samples through the unwrapped model (no per-batch collectives, so
    ranks may hold different sample counts); the confusion matrices and loss sums are then
    summed with ``all_reduce`` and the metrics computed from the totals. ``image_index`` picks
    the magnification of the batch to classify.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in loader.epoch():
        labels = batch.labels
        keep = labels >= 0
        if not bool(keep.any()):
            continue
        x = env.input(batch.images[image_index])
        with env.autocast():
            logits, _ = net(x)
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
    if env.use_cuda:
        packed = packed.to(env.device)
    packed = all_reduce_sum(packed, env).cpu()
    cm_all = (
        packed[: num_classes * num_classes]
        .round()
        .to(torch.int64)
        .reshape(num_classes, num_classes)
    )
    metrics = classification_metrics(cm_all)
    count = float(packed[-1])
    metrics["loss"] = float(packed[-2]) / count if count else float("nan")
    return {f"{prefix}{k}": v for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")


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

    with ``t = (step - warmup) / max(1, total - warmup)`` clipped to [0, 1]. A pure function of the
    step, so a resumed run continues the same curve from its saved global step.
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------
# Training state, checkpoints, the epoch loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress saved in every checkpoint; plain values only (``weights_only``-loadable).

    ``epoch``: epochs completed (the next epoch to run, 0-based); ``step``: optimizer steps taken;
    ``resumes``: restores so far; ``restored_from``: the checkpoint URL of each restore, oldest
    first (a run's own checkpoint after a worker restart or rerun, another run's when a Tune
    trial starts from a copied checkpoint): the state's lineage.
    """

    epoch: int = 0
    step: int = 0
    best_epoch: int | None = None
    best_metric: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: int = 0
    restored_from: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def update_best(self, epoch: int, value: float, mode: str = "max") -> bool:
        """Record ``value`` of the 1-based ``epoch``; True when it is the best so far (ties: later)."""
        if value is None or math.isnan(value):
            return False
        better = (
            self.best_metric is None
            or (mode == "max" and value >= self.best_metric)
            or (mode == "min" and value <= self.best_metric)
        )
        if better:
            self.best_metric, self.best_epoch = float(value), epoch
        return better


@dataclass
class Restored:
    """The latest checkpoint of a run, loaded on a worker."""

    model: dict[str, Any]
    trainer: dict[str, Any]
    state: TrainState
    path: str


_START_CHECKPOINT: str | None = None


def set_start_checkpoint(url: str | None) -> None:
    """Make :func:`restore` start this worker from checkpoint folder ``url`` (local or
    ``s3://``) when its run has no checkpoint of its own yet; None clears it.

    Used by :mod:`resdistill.tune`: a trial restored by Tune (``Tuner.restore``, or a PBT
    exploit copying another trial's checkpoint) starts a new Ray Train run whose first epoch
    continues from that checkpoint. Per worker process; call it before the stage's worker.
    """
    global _START_CHECKPOINT
    _START_CHECKPOINT = url


def restore() -> Restored | None:
    """Load the run's latest checkpoint (``ray.train.get_checkpoint()``) or None for a fresh run.

    The returned state counts the restore: ``resumes`` + 1 and the checkpoint's URL appended to
    ``restored_from``.

    Ray Train V2 hands the latest reported checkpoint to the training function after a worker
    group restart (FailureConfig) and when a new trainer starts with the same ``RunConfig(name,
    storage_path)`` (it reloads the run's checkpoint-manager snapshot from storage). When the run
    has none, the checkpoint set by :func:`set_start_checkpoint` (if any) is loaded instead.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        if _START_CHECKPOINT is None:
            return None
        model = load_checkpoint(_START_CHECKPOINT, MODEL_FILE)
        trainer = load_checkpoint(_START_CHECKPOINT, TRAINER_FILE)
        path = _START_CHECKPOINT
    else:
        with ckpt.as_directory() as d:
            model = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
            trainer = torch.load(Path(d) / TRAINER_FILE, map_location="cpu", weights_only=True)
        path = checkpoint_url(ckpt) or ""
    state = TrainState.from_dict(trainer["state"])
    state.resumes += 1
    state.restored_from = [*state.restored_from, path]
    return Restored(model, trainer, state, path)


def report_epoch(
    metrics: Mapping[str, Any],
    *,
    env: WorkerEnv,
    epoch: int,
    model_payload: Callable[[], dict[str, Any]],
    trainer_payload: Callable[[], dict[str, Any]],
) -> None:
    """``ray.train.report(metrics, checkpoint)`` on every rank; rank 0 writes the checkpoint.

    The checkpoint folder is ``checkpoint_epoch{epoch:04d}`` (``epoch`` 1-based) holding
    :data:`MODEL_FILE`, :data:`TRAINER_FILE` and :data:`META_FILE`. Ray persists it to the run's
    storage path (local or s3) before ``report`` returns on rank 0.
    """
    import ray.train

    clean = {k: _plain(v) for k, v in metrics.items()}
    with tempfile.TemporaryDirectory(prefix="rdckpt-") as tmp:
        checkpoint = None
        if env.is_main:
            model = model_payload()
            torch.save(model, Path(tmp) / MODEL_FILE)
            torch.save(trainer_payload(), Path(tmp) / TRAINER_FILE)
            meta = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "metrics": clean,
                "model": {k: v for k, v in model.items() if k != "state_dict"},
                "time": time.time(),
            }
            (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            clean, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}"
        )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


class Tracer:
    """Optional JSON-lines trace of worker starts and epochs (``--trace-dir``), for tests and ops.

    ``starts.jsonl``: ``{"rank", "pid", "start_epoch", "world_size", "time"}`` per worker start;
    ``epochs.jsonl``: ``{"rank", "pid", "epoch", "steps", "samples", "time"}`` per finished epoch;
    ``rank<r>.json``: the latest ``{"pid", "epoch", "phase"}`` of rank ``r`` (replaced atomically).
    """

    def __init__(self, directory: str | None, env: WorkerEnv) -> None:
        self.dir = Path(directory) if directory else None
        self.env = env
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        if self.dir is None:
            return
        line = json.dumps(
            {"rank": self.env.rank, "pid": os.getpid(), "time": time.time(), **record}
        )
        with open(self.dir / name, "a") as fh:
            fh.write(line + "\n")

    def start(self, start_epoch: int) -> None:
        self._append(
            "starts.jsonl", {"start_epoch": start_epoch, "world_size": self.env.world_size}
        )

    def phase(self, epoch: int, phase: str) -> None:
        if self.dir is None:
            return
        dest = self.dir / f"rank{self.env.rank}.json"
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "epoch": epoch, "phase": phase}))
        os.replace(tmp, dest)

    def epoch(self, epoch: int, steps: int, samples: int) -> None:
        self._append("epochs.jsonl", {"epoch": epoch, "steps": steps, "samples": samples})


@dataclass
class EpochResult:
    """What one rank's training epoch returns to :func:`fit` (metrics already all-reduced)."""

    metrics: dict[str, float]
    steps: int
    samples: int


def fit(
    *,
    env: WorkerEnv,
    state: TrainState,
    epochs: int,
    train_epoch: Callable[[int], EpochResult],
    validate: Callable[[int], dict[str, float]],
    model_payload: Callable[[], dict[str, Any]],
    trainer_payload: Callable[[TrainState], dict[str, Any]],
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
    tracer: Tracer | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainState:
    """Run epochs ``state.epoch + 1 .. epochs`` (1-based): train, validate, report + checkpoint.

    ``train_epoch(e)`` and ``validate(e)`` run on every rank and return metrics reduced over all
    ranks; ``fit`` adds ``epoch``, ``step``, timing (``epoch_s``, ``train_samples_per_s``) and
    ``best_epoch``, reports them with a checkpoint, and appends them to
    ``state.history``. ``trainer_payload(state)`` gets the updated state to store.
    """
    tracer = tracer or Tracer(None, env)
    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        tracer.phase(epoch, "train")
        result = train_epoch(epoch)
        train_s = time.perf_counter() - t0
        tracer.epoch(epoch, result.steps, result.samples)
        tracer.phase(epoch, "validate")
        metrics: dict[str, float] = {**result.metrics, **validate(epoch)}
        epoch_s = time.perf_counter() - t0
        state.epoch = epoch
        state.update_best(epoch, metrics.get(metric, float("nan")), mode)
        metrics.update(
            epoch=epoch,
            step=state.step,
            epoch_s=epoch_s,
            train_samples_per_s=result.samples * env.world_size / train_s if train_s > 0 else 0.0,
            best_epoch=state.best_epoch if state.best_epoch is not None else 0,
        )
        state.history.append({k: float(v) for k, v in metrics.items()})
        tracer.phase(epoch, "report")
        report_epoch(
            metrics,
            env=env,
            epoch=epoch,
            model_payload=model_payload,
            trainer_payload=lambda: trainer_payload(state),
        )
        if log is not None and env.is_main:
            log(format_epoch(metrics, epochs, metric))
    tracer.phase(state.epoch, "done")
    return state


def format_epoch(metrics: Mapping[str, Any], epochs: int, metric: str = DEFAULT_METRIC) -> str:
    """One progress line: ``epoch 2/10  train_loss 0.41  val_accuracy 0.91  ...  12.3 s``."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}"]
    for k in ("train_loss", "val_loss", "val_accuracy", metric):
        if k in metrics and k not in parts:
            parts.append(f"{k} {float(metrics[k]):.4f}")
    parts.append(f"{float(metrics.get('train_samples_per_s', 0)):.0f} img/s")
    parts.append(f"{float(metrics.get('epoch_s', 0)):.1f} s")
    return "  ".join(dict.fromkeys(parts))


def console_log(prefix: str = "") -> Callable[[str], None]:
    """A ``log`` callable printing through rich (Ray forwards worker output to the driver)."""
    from rich.console import Console

    console = Console(highlight=False)

    def log(text: str) -> None:
        console.print(f"{prefix}{text}", soft_wrap=True)

    return log
