"""What an evaluation produces: per-model tile predictions and metrics, the report of a run, and
their plain JSON / CSV forms.

Produced by :mod:`resdistill.eval.evaluate`; written by :mod:`resdistill.eval.report_files` and
drawn by :mod:`resdistill.eval.plots`, which both read these records and nothing else.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdistill.checkpoint import LoadedModel

__all__ = ["EvaluationReport", "ModelEvaluation", "TilePredictions"]


@dataclass
class TilePredictions:
    """Softmax outputs of one model on the labelled tiles of a split (manifest order of shards)."""

    keys: list[str]
    slides: np.ndarray  # (N,) slide id of each tile
    labels: np.ndarray  # (N,) class index
    probs: np.ndarray  # (N, K) float64
    seconds: float = 0.0  # wall time of the pass (decode + inference)

    def __len__(self) -> int:
        return len(self.keys)

    def to_csv(self, classes: Sequence[str]) -> str:
        """``key,slide,label,prob_<class>...`` one row per tile (probabilities with 8 digits)."""
        out = io.StringIO()
        out.write(",".join(["key", "slide", "label", *[f"prob_{c}" for c in classes]]) + "\n")
        for key, slide, label, p in zip(
            self.keys, self.slides, self.labels, self.probs, strict=True
        ):
            probs = ",".join(f"{v:.8f}" for v in p)
            out.write(f"{key},{slide},{classes[int(label)]},{probs}\n")
        return out.getvalue()


@dataclass
class ModelEvaluation:
    """One model's results on the split."""

    name: str
    model: LoadedModel
    predictions: TilePredictions
    tile: dict[str, Any]  # score_predictions: tiles, slides resampled
    slide: dict[str, Any]  # score_predictions: slides, plus "slides": [ids]
    compute: dict[str, Any]  # a compute_table row

    def to_json(self) -> dict[str, Any]:
        from sharding.magnification import Magnification

        m = self.model
        mag = Magnification.parse(m.mag)
        return {
            "name": self.name,
            "checkpoint": m.url,
            "stage": m.stage,
            "arch": m.meta.get("arch"),
            "mag": m.mag,
            "magnification": mag.power,
            "mpp": mag.mpp,
            "tile_px": self.compute["input_shape"][-1],
            "classes": m.classes,
            "trained_on": m.meta.get("dataset"),
            "config": m.config,
            "n_tiles": len(self.predictions),
            "n_slides": self.tile.get("n_slides"),
            "resample": self.tile.get("resample"),
            "eval_seconds": self.predictions.seconds,
            "tile": self.tile,
            "slide": self.slide,
            "compute": self.compute,
        }


@dataclass
class EvaluationReport:
    """All models evaluated on one split of one dataset, and where the output went."""

    data: str
    split: str
    models: list[ModelEvaluation]
    n_boot: int
    alpha: float
    seed: int
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``evaluation.json``: the tool, the run's settings, one entry per model, the files."""
        import torch

        from resdistill import __version__

        return {
            "tool": f"resdistill {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": self.data,
            "split": self.split,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "seed": self.seed,
            "resample": "slide",
            "torch_threads": torch.get_num_threads(),
            "models": [m.to_json() for m in self.models],
            "files": self.files,
        }
