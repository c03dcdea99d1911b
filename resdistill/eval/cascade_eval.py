"""``evaluate --cascade TEACHER_CKPT``: each student's cascade curve beside its evaluation.

Pipeline (:func:`evaluate_cascade`)::

    prepare_cascade(...)       load the teacher and the students, check them against each other
                               and the dataset (one-line errors before any long work)
    evaluate_models(...)       the usual evaluation of every CKPT (evaluation.json, plots...)
    predict_split(teacher)     the teacher's tile probabilities at its magnification (reused when
                               the teacher is one of the CKPTs)
    cascade_curve(...)         per student, the points over the thresholds
                               (:mod:`resdistill.cascade.curve`)
    write_cascade(...)         cascade.json and cascade.png (:mod:`resdistill.cascade.plot`)

:func:`format_cascade_tables` gives the terminal summary: one table per student and a line naming
the cheapest threshold within 1 point of the teacher's tile accuracy, or saying none is.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from resdistill.cascade.curve import WITHIN, cascade_curve
from resdistill.checkpoint import CheckpointError, LoadedModel, load_model
from resdistill.eval.config import EvaluateConfig
from resdistill.eval.evaluate import (
    EvaluationError,
    MismatchError,
    check_compatible,
    evaluate_models,
    predict_split,
)
from resdistill.eval.results import EvaluationReport
from sharding.magnification import display_mag

__all__ = [
    "CASCADE_JSON",
    "CASCADE_PNG",
    "evaluate_cascade",
    "format_cascade_tables",
    "prepare_cascade",
    "write_cascade",
]

CASCADE_JSON = "cascade.json"
CASCADE_PNG = "cascade.png"


def prepare_cascade(
    teacher_spec: str | os.PathLike[str] | LoadedModel,
    specs: Sequence[str | os.PathLike[str] | LoadedModel],
    data: str,
) -> tuple[LoadedModel, list[LoadedModel]]:
    """Load the teacher and every CKPT; check that a cascade of them can run on ``data``.

    Raises a one-line :class:`~resdistill.errors.UsageError` when the teacher cannot be loaded,
    predicts other classes than a student, or does not fit the dataset (a magnification it lacks,
    another tile size), or when every CKPT is the teacher itself (no student to cascade)."""
    from resdistill.data import DatasetInfo

    if isinstance(teacher_spec, LoadedModel):
        teacher = teacher_spec
    else:
        try:
            teacher = load_model(teacher_spec)
        except CheckpointError as exc:
            raise CheckpointError(f"--cascade: {exc}") from None
    models = [s if isinstance(s, LoadedModel) else load_model(s) for s in specs]
    for m in models:
        if m.classes != teacher.classes:
            raise MismatchError(
                f"--cascade {teacher.url}: the teacher predicts {teacher.classes} but {m.url} "
                f"predicts {m.classes}: a cascade needs one class list"
            )
    if all(m.url == teacher.url for m in models):
        raise EvaluationError(
            f"--cascade {teacher.url}: every CKPT is the teacher itself: pass a student checkpoint"
        )
    try:
        info = DatasetInfo.load(data)
    except FileNotFoundError as exc:
        raise EvaluationError(str(exc)) from None
    try:
        check_compatible(teacher, info)
    except MismatchError as exc:
        raise MismatchError(f"--cascade {exc}") from None
    return teacher, models


def evaluate_cascade(
    cfg: EvaluateConfig,
    *,
    within: float = WITHIN,
    log: Callable[[str], None] | None = None,
) -> tuple[EvaluationReport, dict[str, Any]]:
    """Evaluate ``cfg.checkpoints`` (:func:`evaluate_models`) and, for each student (every CKPT
    but the teacher ``cfg.cascade``), its cascade with the teacher over ``cfg.grid``.

    Returns the evaluation report and the ``cascade.json`` document; with ``cfg.out`` both are
    written there (and ``report.files`` gains ``cascade`` and ``cascade_plot``)."""
    from resdistill.data import DatasetInfo, read_manifest
    from resdistill.measures.compute import count_flops

    if cfg.cascade is None:
        raise EvaluationError("a cascade needs a teacher: --cascade TEACHER_CKPT")
    say = log or (lambda _msg: None)
    data, split, out, thresholds = cfg.data, cfg.split, cfg.out, cfg.grid
    teacher, models = prepare_cascade(cfg.cascade, cfg.checkpoints, data)
    report = evaluate_models(cfg, models=models, log=log)
    info = DatasetInfo.load(data)
    opts = {"n_boot": cfg.n_boot, "alpha": cfg.alpha, "seed": cfg.seed}
    mixed = bool(info.raw.get("annotations"))
    same = [ev for ev in report.models if ev.model.url == teacher.url]
    t_px = int(teacher.tile_px or info.tile_px[teacher.mag])
    if same:
        t_preds, t_flops = same[0].predictions, int(same[0].compute["flops"])
    else:
        say(
            f"cascade teacher: {teacher.meta.get('arch')} at {display_mag(teacher.mag)} on {info.url} [{split}]"
        )
        manifest = read_manifest(info.url, columns=("key", "slide", "split", "label", "shard"))
        t_preds = predict_split(
            teacher, info, split, manifest=manifest, batch_size=cfg.batch_size,
            num_workers=cfg.loader_workers, device=cfg.device,
        )  # fmt: skip
        t_flops = count_flops(teacher.model, (3, t_px, t_px))
    curves = []
    for ev in report.models:
        if ev.model.url == teacher.url:
            continue
        say(f"cascade {ev.name} -> teacher over {len(thresholds)} thresholds")
        try:
            curve = cascade_curve(
                ev.predictions, t_preds, int(ev.compute["flops"]), t_flops, thresholds,
                within=within, mixed=mixed, **opts,
            )  # fmt: skip
        except ValueError as exc:
            raise EvaluationError(f"--cascade {teacher.url} with {ev.model.url}: {exc}") from None
        curves.append(
            {
                "student": ev.name,
                "checkpoint": ev.model.url,
                "mag": ev.model.mag,
                "tile_px": ev.compute["input_shape"][-1],
                **curve,
            }
        )
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": report.data,
        "split": split,
        "n_boot": report.n_boot,
        "alpha": report.alpha,
        "seed": report.seed,
        "resample": "slide",
        "within": within,
        "teacher": {
            "name": teacher.stage or "teacher",
            "checkpoint": teacher.url,
            "mag": teacher.mag,
            "tile_px": t_px,
            "flops": int(t_flops),
        },
        "curves": curves,
    }
    if out is not None:
        _add_files(report, write_cascade(doc, out, plots=cfg.plots), out)
    return report, doc


def _add_files(report: EvaluationReport, files: dict[str, str], out: str) -> None:
    """List the cascade's files in ``report.files`` and in the ``evaluation.json`` already
    written to ``out``, so that one index names every file of the run."""
    from resdistill.eval.report_files import REPORT_JSON
    from sharding.storage import open_storage

    report.files.update(files)
    open_storage(out).write_bytes(REPORT_JSON, json.dumps(report.to_json(), indent=1).encode())


def write_cascade(doc: dict[str, Any], out: str, *, plots: bool = True) -> dict[str, str]:
    """Write ``cascade.json`` (``doc`` with its ``files``) and, with ``plots``, ``cascade.png``
    to the folder or ``s3://`` prefix ``out``; returns ``{kind: url}``."""
    from resdistill import __version__
    from sharding.storage import open_storage

    store = open_storage(out)
    files: dict[str, str] = {}
    if plots:
        from resdistill.cascade.plot import plot_cascade

        store.write_bytes(CASCADE_PNG, plot_cascade(doc))
        files["cascade_plot"] = store.child_url(CASCADE_PNG)
    files["cascade"] = store.child_url(CASCADE_JSON)
    doc["files"] = files
    body = {"tool": f"resdistill {__version__}", **doc}
    store.write_bytes(CASCADE_JSON, json.dumps(body, indent=1).encode())
    return files


def _pct(d: dict[str, Any]) -> str:
    """``91.7% [85.0, 97.9]`` (percent, interval in points), or ``-`` without a value."""
    v = d.get("value")
    if v is None:
        return "-"
    if d.get("low") is None or d.get("high") is None:
        return f"{100 * v:.1f}%"
    return f"{100 * v:.1f}% [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"


def best_line(curve: dict[str, Any], teacher_name: str = "teacher") -> str:
    """The sentence naming the cheapest threshold within ``within`` of the teacher, or none."""
    pts = round(100 * curve["within"], 2)
    t_acc = curve["teacher"]["tile_accuracy"]["value"]
    best = curve["best"]
    if best is None:
        return (
            f"no threshold keeps tile accuracy within {pts:g} point of the {teacher_name}'s "
            f"({100 * t_acc:.1f}%)"
        )
    ratio = best["compute_ratio"]
    cost = f"{1 / ratio:.1f}x cheaper than" if ratio < 1 else f"{ratio:.2f}x the compute of"
    return (
        f"cheapest within {pts:g} point of the {teacher_name} ({100 * t_acc:.1f}%): threshold "
        f"{best['label']}, {100 * best['share']:.1f}% of tiles escalated, tile accuracy "
        f"{100 * best['tile_accuracy']['value']:.1f}%, {cost} the {teacher_name}"
    )


def format_cascade_tables(doc: dict[str, Any]) -> list[Any]:
    """Per student a rich table (threshold, share escalated, tile and slide accuracy with their
    intervals, FLOPs per tile, ratio to the teacher; the best row in bold green, the teacher
    alone last) followed by :func:`best_line`."""
    from rich.table import Table
    from rich.text import Text

    from resdistill.measures.compute import human_flops
    from sharding.magnification import display_mag

    pct = int(round(100 * (1 - doc["alpha"])))
    t = doc["teacher"]
    out: list[Any] = []
    for c in doc["curves"]:
        table = Table(
            title=(
                f"cascade {c['student']} ({display_mag(c['mag'])}) -> {t['name']} "
                f"({display_mag(t['mag'])}) on the {doc['split']} split: {c['n_tiles']} tiles, "
                f"{c['n_slides']} slides ({pct}% CI: {doc['n_boot']} resamples of slides)"
            ),
            header_style="bold",
        )
        for col, just in (
            ("threshold", "left"), ("escalated", "right"), (f"tile acc [{pct}% CI]", "left"),
            (f"slide acc [{pct}% CI]", "left"), ("FLOPs/tile", "right"), ("x teacher", "right"),
        ):  # fmt: skip
            table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        names = {"student": f" ({c['student']} alone)", "all": " (every tile)"}
        for p in c["points"]:
            best = c["best"] is not None and p["threshold"] == c["best"]["threshold"]
            style = "bold green" if best else None
            table.add_row(
                p["label"] + names.get(p["kind"], ""),
                f"{100 * p['share']:.1f}%",
                _pct(p["tile_accuracy"]),
                _pct(p["slide_accuracy"]),
                human_flops(p["flops_per_tile"]),
                f"{p['compute_ratio']:.3f}",
                style=style,
            )
        tp = c["teacher"]
        table.add_row(
            f"{t['name']} alone", "-", _pct(tp["tile_accuracy"]), _pct(tp["slide_accuracy"]),
            human_flops(tp["flops_per_tile"]), "1.000", style="dim",
        )  # fmt: skip
        out.append(table)
        out.append(Text(best_line(c, t["name"])))
    return out
