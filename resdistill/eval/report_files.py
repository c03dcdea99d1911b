"""An evaluation's output: the files it writes and the table it prints.

:func:`write_report` writes, to a local folder or ``s3://`` (each file published atomically):
``evaluation.json`` (:meth:`EvaluationReport.to_json`), ``predictions-<model>.csv`` (key, slide,
label, one probability column per class), ``roc.png`` and ``accuracy_vs_flops.png``
(:mod:`resdistill.eval.plots`). :func:`format_table` is the one-table summary for the terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from resdistill.eval.plots import plot_accuracy_vs_flops, plot_roc
from resdistill.eval.results import EvaluationReport
from resdistill.measures.compute import human_flops
from sharding.magnification import display_mag

__all__ = ["format_table", "safe_name", "write_report"]

REPORT_JSON = "evaluation.json"
ROC_PNG = "roc.png"
ACC_FLOPS_PNG = "accuracy_vs_flops.png"


def safe_name(name: str) -> str:
    """A file-name-safe form of a model name (letters, digits, ``.``, ``_``, ``-``, ``@``)."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", name).strip("-") or "model"


def write_report(report: EvaluationReport, out: str, *, plots: bool = True) -> dict[str, str]:
    """Write ``evaluation.json``, one predictions CSV per model and the plots to ``out``.

    ``out`` is a local folder or ``s3://bucket/prefix``; each file is published atomically.
    Returns ``{kind: url}`` (also stored in the JSON under ``files``).
    """
    from sharding.storage import open_storage

    store = open_storage(out)
    files: dict[str, str] = {}
    for ev in report.models:
        rel = f"predictions-{safe_name(ev.name)}.csv"
        store.write_bytes(rel, ev.predictions.to_csv(ev.model.classes).encode())
        files[f"predictions:{ev.name}"] = store.child_url(rel)
    if plots:
        store.write_bytes(ROC_PNG, plot_roc(report))
        files["roc"] = store.child_url(ROC_PNG)
        store.write_bytes(ACC_FLOPS_PNG, plot_accuracy_vs_flops(report))
        files["accuracy_vs_flops"] = store.child_url(ACC_FLOPS_PNG)
    files["report"] = store.child_url(REPORT_JSON)
    report.files = files
    store.write_bytes(REPORT_JSON, json.dumps(report.to_json(), indent=1).encode())
    return files


def _ci(d: Mapping[str, Any], digits: int = 3) -> str:
    """``value [low, high]``, or ``value`` without an interval, or ``-`` without a value."""
    v = d.get("value")
    if v is None:
        return "-"
    lo, hi = d.get("low"), d.get("high")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(report: EvaluationReport) -> Any:
    """One rich table: model, magnification, tiles (slides), accuracy [CI], macro F1 [CI], macro
    AUC, slide accuracy (slides), FLOPs per tile, params, images/s; the title states the CI level
    and that the bootstrap resamples slides."""
    from rich.table import Table

    pct = int(round(100 * (1 - report.alpha)))
    table = Table(
        title=f"{report.split} split of {report.data} ({pct}% CI: {report.n_boot} bootstrap "
        "resamples of slides)",
        header_style="bold",
    )
    for col, just in (
        ("model", "left"), ("mag", "right"), ("tiles (slides)", "right"), (f"accuracy [{pct}% CI]", "left"),
        (f"macro F1 [{pct}% CI]", "left"), ("AUC", "right"), ("slide acc (n)", "left"),
        ("FLOPs/tile", "right"), ("params", "right"), ("images/s", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for ev in report.models:
        s = ev.slide["accuracy"]["value"]
        table.add_row(
            ev.name,
            display_mag(ev.model.mag),
            f"{len(ev.predictions)} ({ev.tile.get('n_slides', '-')})",
            _ci(ev.tile["accuracy"]),
            _ci(ev.tile["macro_f1"]),
            _ci({"value": ev.tile["macro_auc"]["value"]}),
            f"{s:.3f} ({ev.slide['n']})" if s is not None else "-",
            human_flops(ev.compute["flops"]),
            f"{ev.compute['params'] / 1e6:.2f} M",
            f"{ev.compute['images_per_s']:.0f}",
        )
    return table
