"""How a tile becomes a backbone's input, as the checkpoint's read chain records it.

A timm network maps the region the read chain cut (``tile_px`` at the model's magnification) to
its own input inside ``forward`` (:mod:`resdistill.backbones.timm_net`): renormalised to the
backbone's statistics, then resized to ``px`` (bilinear, antialiased when shrinking), one input
per region. ``evaluate``, ``predict``, ``export`` and cached targets therefore replay it by
running the model; the record (``read_chain["model_input"]``) says what they replay, so a reader
of the checkpoint or of an exported file's metadata knows the pixel size the backbone saw.
"""

from __future__ import annotations

from typing import Any

#: the read-chain key of the record
MODEL_INPUT = "model_input"


def input_geometry(net: Any) -> dict[str, Any]:
    """``{"model_input": {"backbone", "px", "resize", "mean", "std"}}`` for a timm network
    (``px`` 0 and resize ``none``: the tile as cut), ``{}`` for a ResNet (its input is the tile)."""
    if not hasattr(net, "input_px") or not hasattr(net, "fm_mean"):
        return {}
    px = int(net.input_px)
    return {
        MODEL_INPUT: {
            "backbone": str(net.arch),
            "px": px,
            "resize": "bilinear, antialiased when shrinking, the whole region" if px else "none",
            "mean": [float(v) for v in net.fm_mean],
            "std": [float(v) for v in net.fm_std],
        }
    }
