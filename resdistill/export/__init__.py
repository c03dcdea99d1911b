"""A student (or any checkpoint) as one self-contained file: TorchScript or ONNX.

The file holds the network and its normalisation, so a consumer feeds it the pixels and gets
scores back, without resdistill. Contract of every exported file:

* input ``tiles``: ``uint8`` RGB, ``(N, 3, tile_px, tile_px)`` (NCHW), values 0..255, any batch
  ``N >= 1``: the tiles exactly as ``resdistill predict`` decodes them (the TorchScript file also
  takes ``float32`` tiles in 0..255);
* inside: ``x = (tiles / 255 - mean) / std`` per channel (the checkpoint's normalisation, as
  :func:`resdistill.checkpoint.normalization_of` gives it to evaluate and predict), then the
  network;
* outputs: ``logits`` ``(N, K)`` and ``probabilities`` ``(N, K)`` = ``softmax(logits)``, columns
  in the order of ``classes``.

The metadata document :data:`METADATA_KEY` (JSON; see :func:`resdistill.export.model.metadata`)
names the classes, the magnification as users write it (``2.5x``), ``tile_px``, mean/std, the
dataset's read chain and how ``predict`` makes tiles from a slide with it, the source checkpoint
and the resdistill version. TorchScript stores it as an extra file of the archive, ONNX as a
``metadata_props`` entry, under the same name.

This module holds only the names (the CLI's ``--help`` imports it); the work is in
:mod:`resdistill.export.model` (the wrapped network, its metadata) and
:mod:`resdistill.export.files` (writing, reading back and checking the files).
"""

from __future__ import annotations

#: ``--format`` choices and the file suffix each gets by default.
FORMATS: dict[str, str] = {"torchscript": ".torchscript", "onnx": ".onnx"}
#: Name of the metadata document in both formats.
METADATA_KEY = "resdistill.json"
#: Version of the exported-file contract (bumped when the input, outputs or metadata change).
EXPORT_FORMAT = 1
INPUT_NAME = "tiles"
OUTPUT_NAMES = ("logits", "probabilities")
#: The optional dependencies of ``--format onnx``.
ONNX_EXTRA = "pip install 'resdistill[onnx]'"
#: Largest |logit| difference allowed between an exported file and the checkpoint's model.
PARITY_ATOL = 1e-4
