"""``python benchmarks/bench_model_layout.py``: resnet18's tiles per CPU second on one thread at
each tile size the study uses, eager in NCHW and NHWC (``channels_last``) at several batch
sizes, then through the forward pass ``predict`` scores with
(:func:`resdistill.predict.cpu_forward.scoring_forward`, at
:func:`resdistill.predict.driver.auto_batch`'s batch), and each student's model-only ratio to the
teacher against the FLOPs ratio. ``--jit`` times every cell through TorchScript instead of eager,
``--bf16`` under bf16 autocast (predict scores in float32).

The model-only ratio bounds what ``predict`` can pay out per slide: planning, heatmaps and Ray's
per-block work cost every model alike and only lower it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

SIZES = {"10x": 224, "5x": 112, "2p5x": 56, "1p25x": 28}
BATCHES = (4, 8, 16, 32, 64, 128, 256)


def tiles_per_cpu_s(
    forward: Callable[[Any], Any], x: Any, seconds: float, bf16: bool = False
) -> float:
    """Tiles of batch ``x`` that ``forward`` scores per CPU second of this thread, after two
    untimed calls (under bf16 autocast with ``bf16``)."""
    import torch

    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        forward(x)
        forward(x)
        n, t0 = 0, time.thread_time()
        while time.thread_time() - t0 < seconds:
            forward(x)
            n += x.shape[0]
        return n / (time.thread_time() - t0)


def cell(net: Any, x: Any, fmt: Any, jit: bool) -> Callable[[Any], Any]:
    """``net`` in memory format ``fmt``, eager or (``jit``) as predict traces it
    (:func:`resdistill.predict.cpu_forward.torchscript`) on ``x``."""
    from resdistill.predict.cpu_forward import torchscript

    net.to(memory_format=fmt)
    return torchscript(net, x) if jit else net


def main(argv: list[str] | None = None) -> int:
    import torch

    from resdistill.measures.compute import count_flops
    from resdistill.models import build_model
    from resdistill.predict.cpu_forward import scoring_forward
    from resdistill.predict.driver import auto_batch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0, help="CPU seconds timed per cell")
    ap.add_argument("--jit", action="store_true", help="time every cell through TorchScript")
    ap.add_argument("--bf16", action="store_true", help="time every cell under bf16 autocast")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_model("resnet18", 4).eval()
    formats = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
    table: dict[str, Any] = {}
    for mag, px in SIZES.items():
        cells = {}
        for name, fmt in formats.items():
            for b in (b for b in BATCHES if b <= 64 or b * px * px <= 256 * 56 * 56):
                x = torch.rand(b, 3, px, px).contiguous(memory_format=fmt)
                cells[f"{name} {b}"] = tiles_per_cpu_s(
                    cell(net, x, fmt, args.jit), x, args.seconds, args.bf16
                )
        forward, fmt = scoring_forward(net, px, "cpu")
        picked = f"{'TorchScript' if forward is not net else 'eager'} {auto_batch(px)}"
        x = torch.rand(auto_batch(px), 3, px, px).contiguous(memory_format=fmt)
        rate = tiles_per_cpu_s(forward, x, args.seconds, args.bf16)
        best = max(cells, key=cells.__getitem__)
        net.to(memory_format=torch.contiguous_format)
        gflops = count_flops(net, (3, px, px)) / 1e9
        table[mag] = {"px": px, "gflops": gflops, "cells": cells, "best": best,
                      "best_rate": cells[best], "picked": picked, "picked_rate": rate}  # fmt: skip
        row = "  ".join(f"{k} {v:.0f}" for k, v in cells.items())
        print(f"{mag} ({px} px, {gflops:.3f} GFLOPs): {row}")
        print(f"  best {best}: {cells[best]:.0f} tiles/CPU s; predict ({picked}): {rate:.0f}")
    teacher = table["10x"]
    for mag in list(SIZES)[1:]:
        r = table[mag]
        print(f"{mag} vs 10x: FLOPs {teacher['gflops'] / r['gflops']:.1f}x; model at each one's "
              f"best cell {r['best_rate'] / teacher['best_rate']:.1f}x; as predict scores "
              f"{r['picked_rate'] / teacher['picked_rate']:.1f}x")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
