"""Write an exported model file, read it back, and check it against the checkpoint.

:func:`export_checkpoint` is the whole ``resdistill export``: load the checkpoint, wrap it
(:mod:`resdistill.export.model`), serialise it (:func:`to_torchscript` / :func:`to_onnx`), run
the serialised file on probe tiles and refuse it unless its logits match the checkpoint's within
:data:`~resdistill.export.PARITY_ATOL` (:class:`ParityError`), then write it to a local path or
``s3://`` URL.

TorchScript is traced (a ResNet has no data-dependent control flow; ``torch.jit`` is deprecated
upstream in favour of ``torch.export``, so its warnings are silenced here, but it still is the one
format a plain ``torch`` install loads without resdistill). ONNX uses ``torch.onnx.export``'s
current exporter (``dynamo=True``, which needs ``onnxscript``; the TorchScript-based one is
deprecated) into a single file, weights inside, with a dynamic batch axis.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from resdistill.errors import UsageError
from resdistill.export import (
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    ONNX_EXTRA,
    OUTPUT_NAMES,
    PARITY_ATOL,
)
from resdistill.export.config import ExportConfig
from resdistill.export.model import NormalizedClassifier, metadata, wrap

#: The modules ``--format onnx`` needs: the exporter's and the runtime that checks the file.
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


class ParityError(RuntimeError):
    """The serialised file does not reproduce the checkpoint's logits (nothing is written)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    url: str
    fmt: str
    size: int  # bytes
    meta: dict[str, Any]
    max_diff: float  # largest |logit| difference on the probe tiles


def check_format(fmt: str) -> None:
    """:class:`UsageError` for an unknown format or, for ``onnx``, a missing optional package."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"--format onnx needs {', '.join(missing)} (optional): {ONNX_EXTRA}")


def probe_tiles(tile_px: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 tiles ``(n, 3, tile_px, tile_px)``: the parity check's input (a batch
    size other than the one traced with, so the batch axis is seen to be dynamic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, tile_px, tile_px), generator=g, dtype=torch.uint8)


def to_torchscript(module: NormalizedClassifier, meta: dict[str, Any]) -> bytes:
    """The traced ``module`` with ``meta`` as the archive's extra file :data:`METADATA_KEY`."""
    example = probe_tiles(int(meta["tile_px"]), n=2, seed=1)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={METADATA_KEY: json.dumps(meta)})
    return buf.getvalue()


def to_onnx(module: NormalizedClassifier, meta: dict[str, Any]) -> bytes:
    """``module`` as one ONNX file (weights inside, batch axis ``N`` dynamic) with ``meta`` in
    ``metadata_props[METADATA_KEY]``."""
    import tempfile

    example = probe_tiles(int(meta["tile_px"]), n=2, seed=1)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        verbose=False,
        external_data=False,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=({0: torch.export.Dim("N")},),
    )
    program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    with tempfile.TemporaryDirectory(prefix="resdistill-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        program.save(path, external_data=False)
        with open(path, "rb") as fh:
            return fh.read()


def _onnx_session(data: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _torchscript(data: bytes, extra: dict[str, Any] | None = None) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra or {})


def run_file(data: bytes, fmt: str, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, probabilities)`` of the exported file ``data`` on uint8 ``tiles`` (NCHW)."""
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    if fmt == "onnx":
        logits, probs = _onnx_session(data).run(list(OUTPUT_NAMES), {INPUT_NAME: tiles})
        return np.asarray(logits), np.asarray(probs)
    with torch.inference_mode():
        logits, probs = _torchscript(data)(torch.from_numpy(tiles))
    return logits.numpy(), probs.numpy()


def read_metadata(data: bytes, fmt: str) -> dict[str, Any]:
    """The metadata document of the exported file ``data``."""
    if fmt == "onnx":
        text = _onnx_session(data).get_modelmeta().custom_metadata_map[METADATA_KEY]
    else:
        extra: dict[str, Any] = {METADATA_KEY: ""}
        _torchscript(data, extra)
        text = extra[METADATA_KEY]
    return json.loads(text)


def write_url(url: str, data: bytes) -> None:
    """``data`` to a local path or ``s3://bucket/key``, atomically (readers see the old file or
    the whole new one); local folders are created."""
    from sharding.storage import is_remote, open_storage

    if is_remote(url):
        parent, _, name = url.rstrip("/").rpartition("/")
    else:
        parent, name = os.path.split(os.path.abspath(os.path.expanduser(url)))
    if not name:
        raise UsageError(f"--out {url}: name a file, not a folder")
    open_storage(parent).write_bytes(name, data)


def default_out(meta: dict[str, Any], fmt: str) -> str:
    """``<stage>-<magnification>.<suffix>`` in the current folder, e.g. ``student-2.5x.onnx``."""
    return f"{meta.get('stage') or 'model'}-{meta['magnification']}{FORMATS[fmt]}"


def export_checkpoint(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.checkpoint`` (anything :func:`resdistill.checkpoint.load_model` reads) in
    ``cfg.format`` to ``cfg.out`` (default :func:`default_out`); see the module docstring.

    :class:`UsageError` (one line) for a missing onnx extra (checked before any model is loaded)
    or an unusable checkpoint; :class:`ParityError` when the file does not reproduce the
    checkpoint.
    """
    from resdistill.checkpoint import load_model

    fmt = cfg.format
    check_format(fmt)
    loaded = load_model(cfg.checkpoint)
    meta = metadata(loaded)
    module = wrap(loaded)
    data = (to_onnx if fmt == "onnx" else to_torchscript)(module, meta)
    probe = probe_tiles(int(meta["tile_px"]))
    with torch.inference_mode():
        want, _ = module(probe)
    got, _ = run_file(data, fmt, probe.numpy())
    diff = float(np.abs(got - want.numpy()).max())
    if not diff <= PARITY_ATOL:
        raise ParityError(
            f"the {fmt} file gives logits up to {diff:.2e} away from the checkpoint's "
            f"(allowed {PARITY_ATOL:g}); nothing written"
        )
    url = cfg.out or default_out(meta, fmt)
    write_url(url, data)
    return ExportResult(url=url, fmt=fmt, size=len(data), meta=meta, max_diff=diff)
