"""One JSON record per finished cell in ``<out>/cells/<cell id>.json``: what it trained and how it
scored on the test split. A record is written only once the cell is trained and evaluated
(atomically), so ``--resume`` skips exactly the cells that have one."""

from __future__ import annotations

import json
import os
import uuid
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


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temp file in the same folder and ``os.replace``: a reader
    (or a study killed mid-write) sees the previous file or the whole new one, never a part.
    Every file of the study folder is written this way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as fh:  # the umask's mode, like a plain write
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_record(out: Path, record: dict[str, Any]) -> None:
    write_atomic(out / CELLS_DIR / f"{cell_of(record).id}.json", json.dumps(record).encode())


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
    """``{slide: patient}`` from the dataset's manifest (:func:`resdistill.data.slide_patients`)."""
    from resdistill.data import read_manifest
    from resdistill.data import slide_patients as of_manifest

    return of_manifest(read_manifest(data, columns=["slide", "patient"]))


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
