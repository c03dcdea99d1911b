"""Where a Ray Train worker runs and how its model is laid out: rank, device, autocast, DDP.

* :func:`worker_env` - the calling worker's :class:`WorkerEnv` (rank, world size, device and the
  run's :class:`~resdistill.config.SpeedConfig`).
* :func:`prepare_model` / :func:`unwrap` - channels-last, DDP, ``torch.compile`` on; and off again
  for checkpoints.
* :func:`all_reduce_sum` / :func:`reduce_means` - the collectives every stage's metrics go through
  (one per epoch, never per batch, so ranks may hold different sample counts).
* :func:`broadcast_buffers` - rank 0's buffers (BatchNorm running statistics) on every rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from resdistill.config import SpeedConfig


@dataclass(frozen=True)
class WorkerEnv:
    """Where this training worker runs, and how its model and inputs are laid out.

    ``amp``: see :data:`resdistill.config.AMP_MODES`; ``channels_last``: NHWC weights and inputs
    (faster convolutions on tensor cores and oneDNN); ``compile``: a ``torch.compile`` backend
    name (``""``: eager), applied by :func:`prepare_model` after the DDP wrap.
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
    """Ray Train V2 logs every ``report`` at INFO with its whole metrics dict, which the driver
    prints beside the stage's one-line epoch summary; keep its warnings only. (The logger is
    named after its module's file.)"""
    with contextlib.suppress(Exception):  # a private module: a Ray upgrade may move it
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_env(speed: SpeedConfig | Mapping[str, Any] | None = None) -> WorkerEnv:
    """The :class:`WorkerEnv` of the calling Ray Train worker (CPU unless it holds a GPU), with
    ``amp``, ``channels_last`` and ``compile`` from ``speed``."""
    import ray.train
    import ray.train.torch

    _quiet_train_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if isinstance(device, list):
        device = device[0]
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    if speed is None:
        speed = SpeedConfig()
    elif isinstance(speed, Mapping):
        speed = SpeedConfig(**{k: v for k, v in speed.items() if k in SpeedConfig.__annotations__})
    return WorkerEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=device,
        amp=speed.amp or "auto",
        channels_last=bool(speed.channels_last),
        compile=speed.compile or "",
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
    """Sum of ``tensor`` over all ranks (in place; unchanged on one worker). Moved to the
    worker's device for the collective (NCCL needs CUDA tensors) and returned on the CPU."""
    if env.distributed:
        import torch.distributed as dist

        on_device = tensor.to(env.device) if env.use_cuda else tensor
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return on_device.cpu()
    return tensor


def broadcast_buffers(model: torch.nn.Module, env: WorkerEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running means, variances and counts) to every rank, in
    place. DDP syncs buffers only at the start of a training forward, after which each rank
    updates them with its own batch: without this, ranks would validate different models, none
    of them the one rank 0 checkpoints. A no-op on one worker or without buffers."""
    if not env.distributed:
        return
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)


def reduce_means(sums: Mapping[str, float], count: float, env: WorkerEnv) -> dict[str, float]:
    """``{k: sum_over_ranks(sums[k]) / sum_over_ranks(count)}`` (NaN when the count is 0)."""
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys] + [float(count)], dtype=torch.float64)
    t = all_reduce_sum(t, env)
    total = float(t[-1])
    return {k: (float(t[i]) / total if total else float("nan")) for i, k in enumerate(keys)}
