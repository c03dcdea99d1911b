"""The forward pass predict scores tiles with: TorchScript on a CPU, the eager model elsewhere.

On a CPU, eager PyTorch converts every activation between its own memory layout and oneDNN's at
each convolution, a cost that grows relative to the arithmetic as feature maps shrink: on one
core of the development CPU resnet18 scores 56 px tiles at 533 tiles per CPU second eager and
744 through TorchScript's trace, freeze and ``optimize_for_inference`` (which folds batch norms
into convolutions and keeps oneDNN's layout from one convolution to the next), 224 px tiles at
44 and 51 (``python benchmarks/bench_model_layout.py [--jit]`` prints the table for the CPU it
runs on). Eager, small students paid out clearly less than their FLOPs; through TorchScript the
model-only ratios match them.

TorchScript is deprecated in PyTorch (kept here because nothing else gives the same on a CPU
without compiling C++ at start), so :func:`scoring_forward` falls back to the eager model
whenever tracing fails or the traced module disagrees with the eager one on a random batch (and
for networks it does not trace: a ViT, anything over :data:`TRACE_MAX_PARAMS`), and then picks
the memory layout: NCHW (``torch.contiguous_format``) for tiles under
:data:`NHWC_FROM_PX`, NHWC (``torch.channels_last``) from it (eager on that CPU: 56 px tiles 533
against 381 tiles per CPU second, 224 px 34 against 44). The forms' probabilities differ by
float rounding only (:data:`AGREE_ATOL` on the logits).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = [
    "AGREE_ATOL", "NHWC_FROM_PX", "TRACE_MAX_PARAMS", "layout_for", "scoring_forward", "torchscript",
]  # fmt: skip

#: Eager tiles of at least this many pixels a side are scored in NHWC on a CPU, smaller in NCHW.
NHWC_FROM_PX = 112
#: Largest difference of logits the traced module may show against the eager one.
AGREE_ATOL = 1e-3
#: Networks with more parameters are not traced: a frozen module holds its own copy of the
#: weights beside the eager model's (a foundation model's gigabytes, twice per actor).
TRACE_MAX_PARAMS = 100_000_000


def _traceable(net: Any) -> bool:
    """A convolutional network (more than one convolution: a ViT's patch embedding is its only
    one, and its matrix products gain nothing from oneDNN's layout) of at most
    :data:`TRACE_MAX_PARAMS` parameters."""
    import torch

    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    return convs > 1 and sum(p.numel() for p in net.parameters()) <= TRACE_MAX_PARAMS


def layout_for(tile_px: int, device: str) -> Any:
    """The ``torch.memory_format`` an eager model scores ``(n, 3, tile_px, tile_px)`` batches in
    on ``device`` (module docstring); on a GPU ``torch.preserve_format``: the input as it comes."""
    import torch

    if device != "cpu":
        return torch.preserve_format
    return torch.channels_last if tile_px >= NHWC_FROM_PX else torch.contiguous_format


def torchscript(net: Any, example: Any) -> Any:
    """``net`` (eval mode) traced on the batch ``example``, frozen and optimised for inference
    by TorchScript, its deprecation and tracer warnings silenced. Raises what tracing raises."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _traced(net: Any, tile_px: int) -> Any:
    """:func:`torchscript` of ``net`` on 2 blank tiles, or ``None`` when that fails or disagrees
    with ``net`` on 3 random tiles (another batch size on purpose)."""
    import torch

    try:
        module = torchscript(net, torch.zeros(2, 3, tile_px, tile_px))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # a traced module's first calls may warn too
            x = torch.rand(3, 3, tile_px, tile_px, generator=torch.Generator().manual_seed(0))
            want, got = net(x), module(x)
            if not torch.allclose(got[0], want[0], rtol=0.0, atol=AGREE_ATOL):
                return None
    except Exception:  # noqa: BLE001 - any failure means: score eager
        return None
    return module


def scoring_forward(net: Any, tile_px: int, device: str) -> tuple[Callable[[Any], Any], Any]:
    """``(forward, memory format of its input)`` for scoring ``(n, 3, tile_px, tile_px)``
    batches with ``net`` (eval mode, on ``device``): on a CPU the TorchScript module of a
    convolutional network in NCHW, else the eager ``net`` converted to :func:`layout_for`'s
    format (module docstring)."""
    import torch

    if device == "cpu" and _traceable(net):
        net.to(memory_format=torch.contiguous_format)
        module = _traced(net, tile_px)
        if module is not None:
            return module, torch.contiguous_format
    fmt = layout_for(tile_px, device)
    net.to(memory_format=fmt)
    return net, fmt
