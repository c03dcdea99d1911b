"""One JSON record per finished cell in ``<out>/cells/<cell id>.json``: what it trained and how it
scored on the test split. A record is written only once the cell is trained and evaluated
(atomically), so ``--resume`` skips exactly the cells that have one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from resdistill.study.grid import Cell

CELLS_DIR = "cells"


def cell_of(record: dict[str, Any]) -> Cell:
    return Cell(**record["cell"])


def load_records(out: Path) -> dict[str, dict[str, Any]]:
    """``{cell id: record}`` of every record under ``out/cells``."""
    folder = out / CELLS_DIR
    if not folder.is_dir():
        return {}
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return {cell_of(r).id: r for r in records}


def write_record(out: Path, record: dict[str, Any]) -> None:
    folder = out / CELLS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell_of(record).id}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def evaluation_records(
    cells: dict[str, Cell], checkpoints: dict[str, str], data: str, *, loader_workers: int
) -> list[dict[str, Any]]:
    """Score each cell's checkpoint on the test split (:func:`resdistill.eval.evaluate.
    evaluate_models`: slide-clustered bootstrap CIs) and return its record: the cell, the
    checkpoint, tile accuracy and macro F1 with their intervals, FLOPs per tile, and each test
    tile's key, slide and correctness, with the :func:`prediction_fields` the report's paired
    intervals read."""
    from dataclasses import asdict

    from resdistill.eval.config import EvaluateConfig
    from resdistill.eval.evaluate import evaluate_models

    ids = sorted(checkpoints)
    if not ids:
        return []
    report = evaluate_models(EvaluateConfig(
        checkpoints=tuple(checkpoints[i] for i in ids), data=data, split="test", names=tuple(ids),
        loader_workers=loader_workers, plots=False, bench_seconds=0.3, bench_repeats=1,
    ))  # fmt: skip
    patients = slide_patients(data)
    out = []
    for cell_id, ev in zip(ids, report.models, strict=True):
        preds = ev.predictions
        correct = (preds.probs.argmax(axis=1) == preds.labels).astype(int)
        out.append({
            "cell": asdict(cells[cell_id]),
            "checkpoint": checkpoints[cell_id],
            "accuracy": ev.tile["accuracy"],
            "macro_f1": ev.tile["macro_f1"],
            "slide_accuracy": ev.slide["accuracy"]["value"],
            "flops": int(ev.compute["flops"]),
            "keys": list(preds.keys),
            "slides": [str(s) for s in preds.slides],
            "correct": correct.tolist(),
            **prediction_fields(preds, patients),
        })  # fmt: skip
    return out


def slide_patients(data: str) -> dict[str, str]:
    """``{slide: patient}`` from the dataset's manifest, for the slides that name a patient."""
    from resdistill.data import read_manifest

    cols = read_manifest(data, columns=["slide", "patient"]).to_pydict()
    return {str(s): str(p) for s, p in zip(cols["slide"], cols["patient"], strict=True) if p}


def prediction_fields(preds: Any, patients: dict[str, str]) -> dict[str, Any]:
    """What a record keeps of one model's test predictions for the report's paired bootstrap
    (:mod:`resdistill.study.results_table`): per tile its class, predicted class and resampling
    unit (its slide's patient, else its slide), and per slide its label (its tiles' predominant
    one), its prediction (argmax of its tiles' mean probability) and its unit."""
    from resdistill.measures.metrics import aggregate_slides

    def unit(slide: str) -> str:
        return patients.get(slide, f"slide:{slide}")

    agg = aggregate_slides(preds.slides, preds.probs, preds.labels, mixed_labels=True)
    return {
        "labels": [int(v) for v in preds.labels],
        "preds": preds.probs.argmax(axis=1).tolist(),
        "units": [unit(str(s)) for s in preds.slides],
        "unit": "patient" if patients else "slide",
        "slide_level": {
            "slides": [str(s) for s in agg.slide_ids],
            "labels": agg.y_true.tolist(),
            "preds": agg.y_prob.argmax(axis=1).tolist(),
            "units": [unit(str(s)) for s in agg.slide_ids],
        },
    }
