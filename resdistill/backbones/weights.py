"""Read a weights file and load it, strictly, into a backbone.

Formats: safetensors (``.safetensors``, read with ``safetensors.torch.load_file``), and torch
files (``.pth``, ``.pt``, ``.bin``, read with ``torch.load(weights_only=True)``: a file cannot
run code here) holding a state dict, possibly nested under ``state_dict``, ``model``,
``model_state_dict``, ``module``, ``teacher`` or ``net`` (as training scripts save them).

Key layouts real checkpoints come in, made to fit the network (:func:`fit_state_dict`):

1. prefixes every key shares: ``module.`` (DDP), ``model.``, ``backbone.``, ``encoder.``,
   ``_orig_mod.`` (torch.compile), stripped while all keys have one;
2. timm's own converter for the architecture (the ``checkpoint_filter_fn`` of the model's
   module: e.g. DINOv2 / BEiT-style names, positional embeddings resampled to the network's
   grid), when the module has one;
3. classifier keys (``head.``, ``fc.``, ``classifier.``, ``head_drop.``, ``last_linear.``) the
   network does not have, or has in another shape (another class count): dropped, and a
   network's own classifier missing from the file keeps its initialisation, since the head is
   trained here.

Then ``load_state_dict(strict=True)``: any key still missing or unexpected, or a shape that
differs, is a one-line :class:`~resdistill.backbones.spec.WeightsError` with the counts, a
first example of each, and the architecture.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resdistill.backbones.spec import WeightsError

#: containers that training scripts nest a state dict under, tried in this order
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "net")
#: prefixes stripped while every key carries one
PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
#: classifier parameters of a pretraining head, dropped when the network has none of that name
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.", "last_linear.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (module docstring), unnested; :class:`WeightsError` when
    the file is unreadable or holds no state dict."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            doc: Any = load_file(str(p), device="cpu")
        else:
            doc = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same one-line refusal
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{p}: not a readable weights file ({first})") from None
    for _ in range(3):
        if not isinstance(doc, Mapping):
            break
        nested = next((doc[k] for k in NESTED_KEYS if isinstance(doc.get(k), Mapping)), None)
        if nested is None or all(torch.is_tensor(v) for v in doc.values()):
            break
        doc = nested
    if not isinstance(doc, Mapping):
        raise WeightsError(f"{p}: holds a {type(doc).__name__}, not a state dict")
    tensors = {str(k): v for k, v in doc.items() if torch.is_tensor(v)}
    if not tensors:
        raise WeightsError(f"{p}: holds no tensors (keys: {', '.join(list(doc)[:5])})")
    return tensors


def strip_prefixes(state: Mapping[str, torch.Tensor], keep: set[str]) -> dict[str, torch.Tensor]:
    """Step 1 of the module docstring: strip a prefix all keys share, repeatedly, unless the
    keys already fit ``keep`` (the network's own names)."""
    out = dict(state)
    changed = True
    while changed and not (set(out) & keep):
        changed = False
        for prefix in PREFIXES:
            if out and all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def timm_filter(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Step 2: the timm model module's ``checkpoint_filter_fn(state, model)``, if it has one."""
    module = sys.modules.get(type(net).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None or not type(net).__module__.startswith("timm."):
        return state
    try:
        return dict(fn(state, net))
    except Exception:  # noqa: BLE001 - the converter does not know this layout: leave it as is
        return state


def fit_state_dict(
    state: Mapping[str, torch.Tensor], net: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict laid out for net, dropped head keys)`` (module docstring, steps 1-3)."""
    keep = set(net.state_dict())
    fitted = strip_prefixes(state, keep)
    fitted = timm_filter(fitted, net)
    dropped = [k for k in fitted if k not in keep and k.startswith(HEAD_PREFIXES)]
    for k in dropped:
        del fitted[k]
    return fitted, dropped


def load_weights(net: nn.Module, path: str | Path, arch: str) -> list[str]:
    """Load the weights file ``path`` into ``net`` (the backbone of ``arch``) strictly, after
    :func:`fit_state_dict`; the dropped head keys. :class:`WeightsError` (one line) otherwise."""
    fitted, dropped = fit_state_dict(read_state_dict(path), net)
    have = net.state_dict()
    for k in [k for k in fitted if k.startswith(HEAD_PREFIXES) and k in have
              and tuple(fitted[k].shape) != tuple(have[k].shape)]:  # fmt: skip
        dropped.append(k)  # a pretraining head over other classes: the network keeps its own
        del fitted[k]
    for k in [k for k in have if k not in fitted and k.startswith(HEAD_PREFIXES)]:
        fitted[k] = have[k]  # the classifier is trained here
    missing = [k for k in have if k not in fitted]
    unexpected = [k for k in fitted if k not in have]
    shapes = [k for k in fitted if k in have and tuple(fitted[k].shape) != tuple(have[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(fitted[k].shape)}, "
                f"network {tuple(have[k].shape)})"
            )
        raise WeightsError(
            f"{path}: the weights do not fit {arch}: {', '.join(parts)}; pass the --arch (and "
            "--backbone-args) the weights were saved from"
        )
    net.load_state_dict(fitted, strict=True)
    return dropped
