"""``resdistill export``: a checkpoint as one self-contained TorchScript or ONNX file."""

from __future__ import annotations

import sys

from resdistill.commands.generate import CommandSpec
from resdistill.export.config import ExportConfig

SPEC = CommandSpec(
    name="export",
    config=ExportConfig,
    summary="write a checkpoint as one TorchScript or ONNX file with its normalisation and classes",
    description="""\
CKPT is a checkpoint folder, its model.pt, a run folder (its best checkpoint), a run summary
JSON (--summary-json) or a tune result JSON, local or s3://. The file holds the network and its
normalisation, and a metadata document (resdistill.json): class names, magnification, tile
size, mean/std, the dataset's read chain, the source checkpoint and the resdistill version.

Input contract: uint8 RGB tiles of shape (N, 3, tile_px, tile_px), values 0..255, read from the
slide as the metadata's read chain says (what `resdistill predict` feeds the model). Outputs:
logits (N, K) and probabilities (N, K) = softmax(logits), columns in the order of the classes.

Before writing, the file is run on probe tiles and must give the checkpoint's logits within
1e-4. --format onnx needs the optional packages: pip install 'resdistill[onnx]'. No config.yaml
is written beside the file: its metadata records the checkpoint and the resdistill version it
was made from, and the file is its format.

exit codes: 0 written; 1 the exported file did not reproduce the checkpoint (nothing written);
2 unusable checkpoint or options.""",
    examples=(
        "resdistill export runs/s2p5x/checkpoint_epoch0010 --out student-2.5x.torchscript",
        "resdistill export runs/s2p5x/checkpoint_epoch0010 --format onnx --out s3://models/s.onnx",
    ),
)


def run(cfg: ExportConfig) -> int:
    """Export, print what was written: 0 written, 1 parity failed, 2 unusable input."""
    from rich.console import Console
    from rich.markup import escape

    from resdistill.errors import UsageError
    from resdistill.export.files import ParityError, export_checkpoint
    from sharding.storage import StorageError

    try:
        result = export_checkpoint(cfg)
    except (UsageError, StorageError, FileNotFoundError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 1
    meta = result.meta
    px = meta["tile_px"]
    source = meta["tile_read"].get("source")
    read = "the dataset's read chain" if source == "checkpoint" else "the slide's pyramid"
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"wrote {escape(result.url)} ({result.fmt}, {result.size / 2**20:.1f} MiB)")
    console.print(
        f"input:   tiles uint8 RGB (N, 3, {px}, {px}), 0..255, at {meta['magnification']} "
        f"({read}; metadata 'read_chain', 'tile_read')"
    )
    k = len(meta["classes"])
    console.print(f"outputs: logits (N, {k}), probabilities (N, {k}) = softmax(logits)")
    console.print(f"classes: {escape(', '.join(meta['classes']))}")
    console.print(f"parity:  max |logit difference| {result.max_diff:.1e} on probe tiles")
    return 0
