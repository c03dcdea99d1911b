"""Export a checkpoint as one self-contained TorchScript or ONNX file.

CKPT is a checkpoint folder (local or s3://), its model.pt, a tune result JSON or a run summary
JSON. The file holds the network and its normalisation, and a metadata document
(resdistill.json): class names, magnification, tile size, mean/std, the dataset's read chain,
the source checkpoint and the resdistill version.

Input contract: uint8 RGB tiles of shape (N, 3, tile_px, tile_px), values 0..255, read from the
slide as the metadata's read chain says (what `resdistill predict` feeds the model). Outputs:
logits (N, K) and probabilities (N, K) = softmax(logits), columns in the order of the classes.

Before writing, the file is run on probe tiles and must give the checkpoint's logits within
1e-4. --format onnx needs the optional packages: pip install 'resdistill[onnx]'.

exit codes: 0 written; 1 the exported file did not reproduce the checkpoint (nothing written);
2 unusable checkpoint or options.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from resdistill.export import FORMATS

    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint folder, model.pt or tune result JSON"
    )
    p.add_argument(
        "--format",
        default="torchscript",
        metavar="|".join(FORMATS),
        help="file format (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        help="output file: a path or s3://bucket/key (default: <stage>-<magnification>"
        f"{FORMATS['torchscript']} or {FORMATS['onnx']} in the current folder)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from resdistill.errors import UsageError
    from resdistill.export.files import ParityError, check_format, export_checkpoint
    from sharding.storage import StorageError

    try:
        check_format(args.format)  # before loading torch models: the cheap mistakes first
        result = export_checkpoint(args.checkpoint, args.format, args.out)
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
