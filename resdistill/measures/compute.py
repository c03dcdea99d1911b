"""Compute cost of a model: parameters, counted FLOPs per tile, measured inference throughput.

FLOPs are *counted* by running the model once under ``torch.utils.flop_counter.FlopCounterMode``,
never estimated by hand. FlopCounterMode counts **2 FLOPs per multiply-accumulate** (MAC) for
convolutions and matrix products (conv, linear/addmm, mm, bmm, attention) and nothing for
element-wise operations (batch norm, ReLU, pooling, residual adds). So ``flops = 2 * macs``; e.g.
torchvision's resnet18 at 224x224 has 1.81e9 MACs = 3.63e9 FLOPs. The paper's compute ratios
(4x per halving of magnification) are ratios of this number; :func:`human_flops` writes it for
people (``3.63 G``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: human_flops needs none of it
    import torch
    from torch import nn

__all__ = [
    "compute_table",
    "count_flops",
    "count_params",
    "human_flops",
    "measure_throughput",
    "sync_device",
]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements: ``sum(p.numel() for p in model.parameters())``.

    Shared (tied) parameters are counted once. With ``trainable_only`` only those with
    ``requires_grad`` are counted. Buffers (batch-norm running statistics) are not parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be one image's (C, H, W), got {tuple(input_shape)}")
    return shape


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    import torch

    for p in model.parameters():
        return p.device, p.dtype if p.dtype.is_floating_point else torch.float32
    return torch.device("cpu"), torch.float32


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of **one image** of shape ``(C, H, W)`` (2 FLOPs per MAC).

    Runs ``model`` once in eval mode under ``torch.no_grad`` on a zero tensor of shape
    ``(1, C, H, W)`` on the model's device and dtype, counting with ``FlopCounterMode``; the
    model's training flag is restored afterwards. Divide by 2 for multiply-accumulates.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shape = _check_shape(input_shape)
    device, dtype = _param_device_dtype(model)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def human_flops(flops: float) -> str:
    """``3.63 G``, ``227 M``, ``14.2 k``: three significant digits with an SI prefix."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= div:
            return f"{flops / div:.3g} {unit}"
    return f"{flops:.3g}"


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so a clock reads its end."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    model: nn.Module,
    input_shape: Sequence[int],
    batch: int = 32,
    seconds: float = 2.0,
    device: str | torch.device = "cpu",
    *,
    repeats: int = 5,
    warmup: int = 2,
) -> float:
    """Measured inference throughput in images per second (median of ``repeats``).

    The model is put in eval mode and moved to ``device`` (its original device and training flag
    are restored afterwards). A random batch ``(batch, C, H, W)`` is fed ``warmup`` times
    untimed, then ``repeats`` timed rounds follow under ``torch.inference_mode``: each round runs
    forward passes until ``seconds / repeats`` have passed (at least one pass) and yields
    ``images / elapsed``; the median round is returned. CUDA work is synchronised before each
    clock reading. The number depends on the machine, its load and ``torch.get_num_threads()``.
    """
    import torch

    shape = _check_shape(input_shape)
    if batch < 1 or repeats < 1 or warmup < 0 or seconds < 0:
        raise ValueError("batch and repeats must be >= 1, warmup and seconds >= 0")
    dev = torch.device(device)
    orig_device, dtype = _param_device_dtype(model)
    was_training = model.training
    model.eval()
    model.to(dev)
    try:
        x = torch.rand((batch, *shape), device=dev, dtype=dtype)
        per_round = seconds / repeats
        rates: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync_device(dev)
            for _ in range(repeats):
                images = 0
                start = time.perf_counter()
                while True:
                    model(x)
                    images += batch
                    sync_device(dev)
                    elapsed = time.perf_counter() - start
                    if elapsed >= per_round:
                        break
                rates.append(images / max(elapsed, 1e-9))
    finally:
        model.to(orig_device)
        model.train(was_training)
    return float(statistics.median(rates))


def compute_table(
    models: Mapping[str, tuple[nn.Module, Sequence[int]]],
    *,
    batch: int = 32,
    seconds: float = 2.0,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """One row per model ``name -> (model, (C, H, W))``, in the mapping's order::

        {"name", "input_shape": [C, H, W], "params", "flops" (per image, 2 per MAC), "macs",
         "gflops", "images_per_s", "batch", "device", "threads"}

    ``threads`` is ``torch.get_num_threads()`` at measurement time (it matters on CPU).
    """
    import torch

    rows: list[dict[str, Any]] = []
    for name, (model, input_shape) in models.items():
        shape = _check_shape(input_shape)
        flops = count_flops(model, shape)
        rows.append(
            {
                "name": name,
                "input_shape": list(shape),
                "params": count_params(model),
                "flops": flops,
                "macs": flops // 2,
                "gflops": flops / 1e9,
                "images_per_s": measure_throughput(
                    model, shape, batch, seconds, device, repeats=repeats, warmup=warmup
                ),
                "batch": batch,
                "device": str(torch.device(device)),
                "threads": torch.get_num_threads(),
            }
        )
    return rows
