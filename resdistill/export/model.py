"""The exported network (:class:`NormalizedClassifier`) and its metadata document.

See :mod:`resdistill.export` for the contract both implement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from resdistill.checkpoint import CheckpointError, LoadedModel, normalization_of
from resdistill.export import EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAMES


class NormalizedClassifier(nn.Module):
    """``tiles (N, 3, H, W)`` in 0..255 (uint8 or float) -> ``(logits, softmax(logits))``.

    The normalisation ``(tiles / 255 - mean) / std`` is the one ``predict`` and evaluation apply
    (same operations in the same order), so the exported logits equal the checkpoint's to float
    rounding. ``net`` is a :class:`resdistill.models.ResNetClassifier` (its feature map is
    dropped).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (tiles.to(torch.float32) / 255.0 - self.mean) / self.std
        logits, _ = self.net(x)
        return logits, torch.softmax(logits, dim=1)


def export_normalization(model: LoadedModel) -> tuple[list[float], list[float]]:
    """The mean/std the exported file applies: :func:`resdistill.checkpoint.normalization_of`,
    the policy evaluate and predict apply too (so the file scores as they do).
    :class:`CheckpointError` when the model was trained on stain-normalised tiles (the exported
    files do not carry that step)."""
    stain = model.card.stain_reference()
    if stain:
        raise CheckpointError(
            f"{model.url}: the model was trained on stain-normalised tiles "
            f"({stain.get('method')}), a step exported files do not include; use resdistill "
            "predict, which applies it"
        )
    return normalization_of(model)


def wrap(model: LoadedModel) -> NormalizedClassifier:
    """``model``'s network behind its normalisation, on the CPU, in eval mode."""
    mean, std = export_normalization(model)
    return NormalizedClassifier(model.model.cpu(), mean, std).eval()


def metadata(model: LoadedModel) -> dict[str, Any]:
    """The metadata document of an export of ``model`` (plain JSON values).

    ``read_chain`` is the checkpoint's record of its dataset (dataset.json's read-chain keys, as
    training stored it; ``{}`` for checkpoints written before they recorded one); ``tile_read``
    is how ``resdistill predict`` makes this model's input tiles from a slide with it
    (:meth:`resdistill.read_chain.ReadChain.to_json`: source, magnifications, tile sizes,
    ``min_tissue``, image format and quality); ``normalization.recorded`` false when the mean/std
    are :func:`resdistill.checkpoint.normalization_of`'s fallback. :class:`CheckpointError` for
    a checkpoint without ``tile_px``, or with a read chain that cannot make its tiles.
    """
    import platform

    from resdistill import __version__
    from resdistill.checkpoint import absolute_url
    from resdistill.read_chain import chain_of
    from sharding.magnification import display_mag

    mean, std = export_normalization(model)
    chain = chain_of(model)
    px = chain.tile_px
    card = model.card
    return {
        "format": EXPORT_FORMAT,
        "classes": model.classes,
        "magnification": display_mag(model.mag),
        "tile_px": px,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "channels": "RGB",
            "shape": ["N", 3, px, px],
            "range": [0, 255],
        },
        "outputs": {name: ["N", len(model.classes)] for name in OUTPUT_NAMES},
        "normalization": {
            "mean": mean,
            "std": std,
            "formula": "(tiles / 255 - mean) / std",
            "recorded": card.mean_std() is not None,
        },
        "read_chain": dict(card.read_chain or {}),
        "tile_read": chain.to_json(),
        "arch": card.arch,
        "stage": card.stage,
        "source_checkpoint": absolute_url(model.url),
        "resdistill_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "python_version": platform.python_version(),
    }
