"""Frozen foundation-model teacher: a head epoch on cached embeddings vs running the backbone
each step (``teacher --freeze-backbone``; target >= 10x per epoch).

Both loops train the same head (linear, Adam, cross-entropy) on the same labelled tiles of the
dataset's top magnification, in this process, same threads:

* baseline: every step runs the frozen backbone on the batch's tiles (the input geometry
  included: renormalised and resized to the backbone's input) and then the head, as a frozen
  backbone without a cache must;
* ours: :class:`resdistill.train.head.EmbeddingLoader` batches of the embeddings computed once
  (``TimmClassifier.embed``, what :mod:`resdistill.train.embeddings` stores) through the head,
  as :class:`resdistill.train.head.HeadStage` does.

The one-off cost of computing the embeddings (about one baseline epoch's forward passes) is in
the row's note. The backbone is a timm ViT at random initialisation (the timing does not depend
on the weights): ``vit_small_patch16_224`` (``--quick``: ``vit_tiny_patch16_224``) at 224 px.

    python benchmarks/bench_fm_head.py [--data DATASET] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import row as default_row  # noqa: E402


def labelled_tiles(data: str | None, n: int, px: int) -> tuple[Any, Any, tuple[Any, Any]]:
    """``(tiles (N, 3, H, W) float normalised, labels, (mean, std))``: the first ``n`` labelled
    train tiles of ``data`` at its top magnification, or random ``px`` tiles without one."""
    import torch

    if data is None:
        g = torch.Generator().manual_seed(0)
        return (
            torch.randn(n, 3, px, px, generator=g),
            torch.arange(n) % 2,
            ((0.5,) * 3, (0.25,) * 3),
        )
    from resdistill.data import BatchPrep, Dataset, TileStream, shard_keys

    ds = Dataset.open(data)
    info, mag = ds.info, ds.info.highest
    keys = shard_keys(ds.manifest(), ["train"], labelled_only=True)
    stream = TileStream(info, keys, [mag], repeat=False)
    tiles, labels = [], []
    for images, label, _ in stream:
        tiles.append(images[0])
        labels.append(int(label))
        if len(tiles) == n:
            break
    x = BatchPrep(stream.norms(), owns=True).images([torch.stack(tiles)])[0]
    return x, torch.tensor(labels), info.mean_std(mag)


def _epoch(step: Callable[[Any, Any], None], batches: Any) -> float:
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return time.perf_counter() - t0


def fm_head_rows(
    data: str | None = None, *, row: Callable[..., dict[str, Any]] = default_row,
    quick: bool = False, batch: int = 32,
) -> list[dict[str, Any]]:  # fmt: skip
    import torch

    from resdistill.backbones import BackboneSpec
    from resdistill.models import build_model
    from resdistill.train.head import EmbeddingLoader

    arch = "timm:vit_tiny_patch16_224" if quick else "timm:vit_small_patch16_224"
    n = 64 if quick else 256
    x, y, (mean, std) = labelled_tiles(data, n, 224)
    n = len(y)
    torch.manual_seed(0)
    net = build_model(arch, 2, BackboneSpec(arch=arch, frozen=True).to_dict())
    net.set_input_normalization(mean, std)
    net.eval()
    head = net.classifier
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    ce = torch.nn.CrossEntropyLoss()

    def train(logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = ce(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def backbone_step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        train(net(xb)[0], yb)  # the frozen backbone runs, gradients reach the head only

    tiles = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    base = _epoch(backbone_step, tiles)
    t0 = time.perf_counter()
    with torch.inference_mode():
        emb = torch.cat([net.embed(xb) for xb, _ in tiles])
    cache_s = time.perf_counter() - t0
    loader = EmbeddingLoader(emb.clone(), y, batch_size=batch, steps=len(tiles))

    def head_step(eb: torch.Tensor, yb: torch.Tensor) -> None:
        train(head(eb), yb)

    def cached() -> Any:
        return ((b.images[0], b.labels) for b in loader.epoch())

    ours = min(_epoch(head_step, cached()) for _ in range(3))  # tiny: best of three
    return [
        row(f"frozen-FM head epoch, cached embeddings vs backbone ({arch[5:]}, {n} tiles)",
            "backbone each step", base, "cached embeddings", ours, "s/epoch", base / ours,
            ">= 10", f"embeddings once: {cache_s:.1f}s; {torch.get_num_threads()} threads"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="a dataset (default: random 224 px tiles)")
    ap.add_argument("--quick", action="store_true", help="vit_tiny, 64 tiles")
    args = ap.parse_args(argv)
    for r in fm_head_rows(args.data, quick=args.quick):
        print(f"{r['row']}: {r['baseline']} {r['baseline_value']:.3g} {r['unit']}, "
              f"{r['ours']} {r['ours_value']:.3g} {r['unit']}: {r['ratio']:.0f}x "
              f"(target {r['target']}); {r['note']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
