"""The feature-term ablation: does the feature term earn its place, and on which map?

Three variants of the distilled student that differ in the feature term alone (same teacher,
recipe, unlabelled slides, steps and seeds), :data:`VARIANTS`:

* ``off``: KD alone (``feature_weight 0``);
* ``global``: the paper's rule on the student's last map (``feature_grid 0``); with 128 px
  teacher tiles that map is one cell at 2.5x and 1.25x, so the term matches the teacher's
  per-channel global maximum;
* ``spatial``: a :data:`SPATIAL_GRID` x :data:`SPATIAL_GRID` grid (``feature_grid``; the
  deepest student stage with that many cells, :mod:`resdistill.train.feature_tap`).

The distilled cells run the variant of the study's defaults (:func:`default_variant`); the
ablation adds the two others. The report (:func:`ablation_markdown`) gives, per magnification
and label fraction, each variant's test accuracy and the paired differences (global - off),
(spatial - off) and (spatial - global): the same two-level paired bootstrap as the claims. These
are reported, not chosen on: a default follows from the variants' *validation* accuracy
(``validation.csv``, ``benchmarks/choose_defaults.py``), never from this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from resdistill.study.grid import FEATURE_KINDS, KIND_DISTILLED, Grid, variant_of

#: the grid of the ``spatial`` variant: 2 x 2 keeps the deepest student stage under the term
#: (stage 3 at 2.5x, stage 2 at 1.25x on 32/16 px tiles)
SPATIAL_GRID = 2
#: variant -> the loss settings that make it (the rest as the study's defaults)
VARIANTS: dict[str, dict[str, Any]] = {
    "off": {"feature_weight": 0.0, "feature_grid": 0},
    "global": {"feature_weight": 1.0, "feature_grid": 0},
    "spatial": {"feature_weight": 1.0, "feature_grid": SPATIAL_GRID},
}
#: the settings an ablation varies: a study with the ablation may not fix them
VARIED = ("feature_weight", "feature_grid")


def default_variant(student_args: Mapping[str, Any] | None) -> str:
    """The variant of the distilled cells: the loss defaults with ``student_args``' loss."""
    return variant_of((student_args or {}).get("loss") or {})


def variant_overrides(kind: str) -> dict[str, Any] | None:
    """The config override (:mod:`resdistill.study.overrides`) of an ablation ``kind``'s cells;
    None for the other kinds."""
    if kind not in FEATURE_KINDS:
        return None
    return {"loss": dict(VARIANTS[kind.removeprefix("feature-")])}


def ablation_markdown(grid: Grid, records: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's ablation section ("" when the grid has none or no cell of it finished)."""
    from resdistill.measures.paired import points
    from resdistill.study.results_table import compare, group_records, interval_of
    from sharding.magnification import display_mag

    groups = group_records(records)
    kind_of = {grid.variant(k): k for k in (KIND_DISTILLED, *FEATURE_KINDS)
               if k in grid.kinds}  # fmt: skip
    if len(kind_of) < 2:
        return ""
    lines = ["## Ablation: the feature term", "",
             f"The distilled student with the feature term off (KD alone), on its last map (the "
             f"paper's rule: one cell, the teacher's global maximum, on small student tiles) and "
             f"on a {SPATIAL_GRID}x{SPATIAL_GRID} grid; everything else as the distilled cells, "
             f"which run `{grid.feature_default}`. Test accuracy (mean over seeds) and paired "
             "differences in points with 95% intervals: reported, not chosen on (a default "
             "follows the variants' validation accuracy, validation.csv).", ""]  # fmt: skip
    pairs = (("global", "off"), ("spatial", "off"), ("spatial", "global"))
    found = False
    for kind, mag, fraction, share in sorted(groups, key=str):
        if kind != KIND_DISTILLED or share != grid.top_share:
            continue
        arms = {v: groups.get((k, mag, fraction, share)) for v, k in kind_of.items()}
        arms = {v: r for v, r in arms.items() if r}
        if len(arms) < 2:
            continue
        found = True
        accs = ", ".join(f"{v} {interval_of(r).value:.3f}" for v, r in arms.items())
        diffs = []
        for a, b in pairs:
            if a in arms and b in arms:
                d = compare(arms[a], arms[b])
                ci = f"[{points(d.low)}, {points(d.high)}]" if d.defined else "no interval"
                diffs.append(f"{a} - {b} {points(d.value)} {ci}")
        lines.append(f"- {display_mag(mag)}, {100 * fraction:g}% labelled: accuracy {accs}; "
                     f"{'; '.join(diffs)}")  # fmt: skip
    return "\n".join(lines) + "\n" if found else ""
