"""The study's protocol on disk and in words: each arm's tuning record (the recipes it tried,
their validation scores, the one it kept), the validation table, and the report's protocol
section.

* ``<out>/tuning/<arm id>.json``: one per arm whose recipe was searched
  (:mod:`resdistill.study.recipes`), written once its trials ran; ``--resume`` keeps it.
* ``<out>/validation.csv``: one row per group of cells (the cell without its seed), the mean
  over seeds of the *validation* metrics at each cell's kept checkpoint, with the rule that
  chose it and the recipe. It holds no test metric: it is what a choice made after the study
  (``benchmarks/choose_defaults.py``) may read; ``study.csv`` holds the test scores, read once,
  for the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from resdistill.study.grid import (
    KD_KINDS,
    KIND_SAME_RES,
    KIND_SELF_TRAINING,
    TUNING_SEED,
    Arm,
    Grid,
)
from resdistill.study.recipes import best_trial, describe, space_text
from resdistill.study.records import cell_of, write_atomic

TUNING_DIR = "tuning"
VALIDATION_CSV = "validation.csv"
#: the validation metrics the table averages (those a run reported)
VAL_METRICS = ("val_accuracy", "val_macro_f1", "val_distill_loss", "val_agreement")


def load_tuning(out: Path) -> dict[str, dict[str, Any]]:
    """``{arm id: tuning record}`` of every arm searched so far."""
    folder = out / TUNING_DIR
    if not folder.is_dir():
        return {}
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return {Arm(**d["arm"]).id: d for d in docs}


def tuning_record(arm: Arm, recipes: Sequence[Mapping[str, Any]],
                  results: Sequence[Any]) -> dict[str, Any]:  # fmt: skip
    """The record of ``arm``'s trials: ``results[i]`` (a :class:`~resdistill.study.tuning.
    CellResult`, or None when the trial could not start) ran ``recipes[i]``; the kept recipe is
    the best validation score by the arm's rule (ties to the earlier trial: the defaults)."""
    scores = [r.score if r is not None and r.checkpoint else None for r in results]
    chosen = best_trial(scores)
    rule = next((r for r in results if r is not None), None)
    return {
        "arm": asdict(arm),
        "seed": TUNING_SEED,
        "trials": [
            {
                "recipe": dict(recipe),
                "checkpoint": r.checkpoint if r else None,
                "score": s,
                **(r.to_dict() if r else {}),
            }
            for recipe, r, s in zip(recipes, results, scores, strict=True)
        ],  # fmt: skip
        "chosen": chosen,
        "recipe": dict(recipes[chosen]) if chosen is not None else None,
        "rule": {k: v for k, v in rule.to_dict().items() if k != "val"} if rule else {},
    }


def write_tuning(out: Path, record: Mapping[str, Any]) -> None:
    arm = Arm(**record["arm"])
    write_atomic(out / TUNING_DIR / f"{arm.id}.json", json.dumps(record).encode())


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def validation_rows(
    records: Mapping[str, Mapping[str, Any]], grid: Grid | None = None
) -> list[dict[str, Any]]:
    """One row per group of cells: kind, magnification, label fraction, unlabelled share,
    seeds, the mean over seeds of each of :data:`VAL_METRICS`, the selection rule, the labelled
    validation slides that chose, the recipe, and (with ``grid``) ``feature_term``: the feature
    term's variant of the kinds that distil like ``distilled`` (:mod:`resdistill.study.
    ablation`; empty for the others). Read from the records' ``validation`` only."""
    from sharding.magnification import display_mag

    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records.values():
        groups.setdefault(cell_of(r).group, []).append(r)
    rows = []
    for (kind, mag, fraction, share), recs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        vals = [r.get("validation") or {} for r in recs]
        row: dict[str, Any] = {"kind": kind, "mag": display_mag(mag), "label_fraction": fraction,
                               "unlabelled_share": share, "seeds": len(recs)}  # fmt: skip
        for m in VAL_METRICS:
            row[m] = _mean([(v.get("val") or {}).get(m, math.nan) for v in vals])
        row["select"] = next((v["select"] for v in vals if v.get("select")), "given")
        row["labelled_val_slides"] = max((int(v.get("labelled_val_slides", 0)) for v in vals),
                                         default=0)  # fmt: skip
        recipe = recs[0].get("recipe")
        row["recipe"] = "given" if recipe is None else describe(recipe)
        if grid is not None:
            row["feature_term"] = grid.variant(kind) or ""
        rows.append(row)
    return rows


def write_validation(
    records: Mapping[str, Mapping[str, Any]], out: Path, grid: Grid | None = None
) -> Path:
    """``<out>/validation.csv`` (:func:`validation_rows`), written whole."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rows = validation_rows(records, grid)
    sink = pa.BufferOutputStream()
    if rows:
        pcsv.write_csv(pa.Table.from_pylist(rows), sink)
    write_atomic(out / VALIDATION_CSV, sink.getvalue().to_pybytes())
    return out / VALIDATION_CSV


def _arm_line(arm: Arm, doc: Mapping[str, Any] | None) -> str:
    from sharding.magnification import display_mag

    what = f"{arm.kind} {display_mag(arm.mag)}, {100 * arm.label_fraction:g}% labelled"
    if doc is None:
        return f"- {what}: its defaults (no search)"
    rule = doc.get("rule") or {}
    shown = ", ".join("-" if t["score"] is None else f"{abs(t['score']):.3f}"
                      for t in doc["trials"])  # fmt: skip
    if doc.get("chosen") is None:
        return f"- {what}: no trial finished ({shown})"
    labels = (f", {rule.get('labelled_val_slides', 0)} labelled validation slides"
              if rule.get("select") == "metric" else ", no label read")  # fmt: skip
    return (
        f"- {what}: trial {doc['chosen']} ({describe(doc['recipe'])}) by "
        f"{rule.get('metric', '?')} ({shown} over the trials{labels})"
    )


def protocol_markdown(grid: Grid, trials: int, quick: bool,
                      tuning: Mapping[str, Mapping[str, Any]], epochs: tuple[int, int],
                      threshold: float = 0.95) -> str:  # fmt: skip
    """The report's protocol section: what was chosen on what, the budget, the controls
    (``threshold``: the self-training control's confidence threshold)."""
    lines = []
    if quick:
        lines += ["**Smoke test, not evidence (`--quick`)**: one seed, one student "
                  "magnification, two unlabelled shares and no recipe search unless --trials "
                  "says otherwise. Its verdicts show the pipeline runs, not whether a claim "
                  "holds.", ""]  # fmt: skip
    lines += ["## Protocol", "",
              "Every choice is made on validation data; the test split is scored once per "
              "reported cell, after every choice, and read only for this report.", ""]  # fmt: skip
    if trials > 1:
        lines += [f"Equal search budget: every arm tried the same {trials} recipes ({space_text()}"
                  "; the first is the arm's own defaults, the others drawn once for all arms) "
                  f"in runs at seed {TUNING_SEED}, never a reported seed, of "
                  f"{epochs[0]} epochs (teachers) or {epochs[1]} (students) each, and kept the "
                  "recipe its own validation rule scored best: the labelled validation metric "
                  "for the arms that learn from labels (those labels count in their budget), "
                  "the label-free distillation loss on the validation images for the arms that "
                  "distil. Checkpoints are chosen by the same rules. Kept recipes:", ""]  # fmt: skip
        lines += [_arm_line(arm, tuning.get(arm.id)) for arm in grid.arms()]
    else:
        lines.append("No recipe search (one trial): every arm trained with its defaults; "
                     "checkpoints chosen by the labelled validation metric (arms that learn "
                     "from labels) or the label-free distillation loss (arms that distil).")  # fmt: skip
    lines += ["", "Shared work: a teacher cell teaches every run of its label fraction and seed "
              "(all unlabelled shares, and the first seed's also its arm's tuning trials; the "
              "baseline cell is its self-training's teacher), and runs without colour jitter read "
              "its outputs stored once (teacher targets) instead of running it every step.", ""]  # fmt: skip
    kinds = set(grid.kinds)
    if KIND_SAME_RES in kinds or KIND_SELF_TRAINING in kinds:
        lines += ["Controls (claim 4 compares the distilled student with each, paired):"]
        if KIND_SAME_RES in kinds:
            lines.append("- same-res-distilled: a teacher trained as the teacher is, on the "
                         "same labels, at the student's magnification (same-res-teacher), "
                         "distilled into the student with the same loss, unlabelled slides "
                         "and steps.")  # fmt: skip
        if KIND_SELF_TRAINING in kinds:
            lines.append("- self-training: teacher-free; the baseline of the same labels and "
                         "seed pseudo-labels the training slides at the student's "
                         "magnification and a fresh student learns its soft labels (the KD "
                         "term) and, on the same batches, the labels of its labelled tiles "
                         "(cross-entropy, as FixMatch and Noisy Student keep), with the same "
                         "unlabelled slides and steps; a tile's soft label teaches only where "
                         "the baseline's top probability reaches the confidence threshold "
                         "fixed before the study (FixMatch's rule; `--self-training-threshold`"
                         f", {threshold:g}).")  # fmt: skip
        lines.append("")
        lines.append(f"Controls run at the largest unlabelled share; tuned like every arm "
                     f"({', '.join(k for k in KD_KINDS if k in kinds)} distil).")  # fmt: skip
        lines.append("")
    return "\n".join(lines)
