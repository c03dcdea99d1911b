"""The study's recipe search: every arm gets the same budget over the same space.

A *recipe* is an override of a cell's :class:`~resdistill.config.TrainConfig` (nested as the
config, :mod:`resdistill.study.overrides`) over the settings of :data:`SPACE`:

    optim.lr            log-uniform in [3e-4, 3e-3]
    optim.weight_decay  log-uniform in [1e-6, 1e-3]
    data.jitter         one of: off, light (0.2,0.2,0.2,0.05), the paper's (0.5,0.5,0.5,0.2)

The space holds only settings every arm has (a temperature would favour the arms that distil),
and the augmentation is in it: a baseline's colour jitter is searched like the distilled
student's, never inherited from it. :func:`draw_recipes` makes ``n`` recipes: the first is
``{}`` (the arm's own defaults, so a search never loses them), the others drawn from ``SPACE``
with one seeded generator, and *every arm tries the same list* (common random numbers: no arm
draws luckier recipes). Each arm runs its ``n`` trials (:meth:`~resdistill.study.grid.Grid.
trial_cells`) and keeps the recipe whose trial scores best on the arm's own validation rule
(:func:`best_trial`): the metric its checkpoints are chosen by (:mod:`resdistill.train.selection`),
labelled validation accuracy for the arms that learn from labels, the label-free distillation
loss for the arms that distil. The test split is never read here. The chosen recipe then trains
the arm's reported cells at every seed (and every unlabelled share). Random search with an equal
budget per arm follows Bergstra & Bengio 2012 (JMLR 13:281); equal tuning for a semi-supervised
method and its baselines follows Oliver et al. 2018 (NeurIPS, "Realistic Evaluation of Deep
Semi-Supervised Learning Algorithms").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from resdistill.config import DEFAULT_JITTER, STUDENT_JITTER

PAPER_JITTER = (0.5, 0.5, 0.5, 0.2)
#: setting path -> ("loguniform", low, high) or ("choice", values)
SPACE: dict[str, tuple[Any, ...]] = {
    "optim.lr": ("loguniform", 3e-4, 3e-3),
    "optim.weight_decay": ("loguniform", 1e-6, 1e-3),
    "data.jitter": ("choice", (STUDENT_JITTER, DEFAULT_JITTER, PAPER_JITTER)),
}
#: recipes each arm tries unless told (``--trials``)
DEFAULT_TRIALS = 4

Recipe = Mapping[str, Any]


def _draw(rng: Any, domain: tuple[Any, ...]) -> Any:
    if domain[0] == "loguniform":
        low, high = math.log(domain[1]), math.log(domain[2])
        return float(f"{math.exp(rng.uniform(low, high)):.3g}")
    value = domain[1][int(rng.integers(len(domain[1])))]
    return list(value) if isinstance(value, tuple) else value  # as JSON holds it


def draw_recipes(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` recipes: ``{}`` (the arm's defaults), then ``n - 1`` draws from :data:`SPACE`
    (seeded by ``seed``), plain JSON values; the same list for every arm of a study."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = [{}]
    for _ in range(n - 1):
        recipe: dict[str, Any] = {}
        for path, domain in SPACE.items():
            section, name = path.split(".")
            recipe.setdefault(section, {})[name] = _draw(rng, domain)
        out.append(recipe)
    return out


def searched(overrides: Mapping[str, Any] | None) -> list[str]:
    """The :data:`SPACE` settings ``overrides`` (a ``--teacher-args`` / ``--student-args``
    mapping) would fix: a search over them would not search."""
    out = []
    for path in SPACE:
        section, name = path.split(".")
        if name in ((overrides or {}).get(section) or {}):
            out.append(path)
    return out


def describe(recipe: Recipe) -> str:
    """``lr 0.001, weight_decay 1e-05, jitter 0.2,0.2,0.2,0.05``; ``defaults`` for ``{}``."""
    parts = []
    for section in sorted(recipe):
        for name, value in sorted(recipe[section].items()):
            shown = ",".join(f"{v:g}" for v in value) if isinstance(value, list | tuple) else (
                f"{value:g}" if isinstance(value, float) else str(value))  # fmt: skip
            parts.append(f"{name} {shown}")
    return ", ".join(parts) or "defaults"


def score_of(val: Mapping[str, float], metric: str, mode: str) -> float | None:
    """``val[metric]`` signed so that higher is better (None when missing or NaN)."""
    value = val.get(metric)
    if not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value) if mode == "max" else -float(value)


def best_trial(scores: Sequence[float | None]) -> int | None:
    """Index of the best score (higher is better, ties to the earlier trial, so the defaults
    win a tie); None when no trial scored."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    return best


def space_text() -> str:
    """:data:`SPACE` in words, for the report."""
    parts = []
    for path, domain in SPACE.items():
        name = path.split(".")[1]
        if domain[0] == "loguniform":
            parts.append(f"{name} log-uniform [{domain[1]:g}, {domain[2]:g}]")
        else:
            shown = " | ".join(",".join(f"{v:g}" for v in value) for value in domain[1])
            parts.append(f"{name} one of {shown}")
    return "; ".join(parts)
