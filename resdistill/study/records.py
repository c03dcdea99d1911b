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
    tile's key, slide and correctness (what the report pools over seeds)."""
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
        })  # fmt: skip
    return out
