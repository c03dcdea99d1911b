"""The study's driver: dataset (given, or the embedded synthetic cohort), grid, the teachers'
phase, the students' phase, evaluation, report. A cell with a record in ``<out>/cells`` is done;
``resume`` reruns only the others (and rewrites the report from every record). The resolved
options are written to ``<out>/config.yaml`` with the dataset's fingerprint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from resdistill.errors import UsageError
from resdistill.study.config import StudyConfig
from resdistill.study.grid import (
    KIND_DISTILLED,
    KIND_TEACHER,
    LABEL_FRACTIONS,
    Cell,
    Grid,
    student_mags_below,
)

#: the embedded cohort: 32 synthetic 20x slides, a quarter without a label (the unlabelled pool),
#: sharded at the teacher's 10x and students 4x/16x/64x cheaper (5x, 2.5x, 1.25x)
SYNTH_SLIDES, SYNTH_LABELLED, SYNTH_MAGS, SYNTH_TILE_PX = 32, 0.75, "10,5,2.5,1.25", 128
#: ``--quick``: one student magnification (the one 16x cheaper than the teacher when present)
QUICK_RATIO = 4.0


def cohort_size(cohort: str) -> tuple[int, float]:
    """``(slides, labelled share)`` of the embedded ``cohort`` (``resdistill synth --cohort``):
    :data:`SYNTH_SLIDES` at :data:`SYNTH_LABELLED`, or, for a cohort with a smaller labelled
    share (``unlabeled``), as many labelled slides plus more unlabelled ones."""
    from sharding.synthetic import cohort_named

    try:
        share = cohort_named(cohort).labeled_fraction
    except ValueError as exc:
        raise UsageError(f"--cohort: {exc}") from None
    if share >= SYNTH_LABELLED:
        return SYNTH_SLIDES, SYNTH_LABELLED
    return round(SYNTH_SLIDES * SYNTH_LABELLED / share), share


def synthetic_dataset(
    out: Path, seed: int, address: str | None, console: Any, cohort: str = "default"
) -> str:
    """Write (or keep) the embedded ``cohort``'s slides and shards under ``out``; its dataset
    URL. ``out/cohort.json`` names the cohort and seed, so a resumed study cannot mix cohorts."""
    from resdistill.study.records import write_atomic
    from sharding.pipeline import run_shard
    from sharding.progress import print_summary
    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    slides, dataset, marker = out / "slides", out / "dataset", out / "cohort.json"
    made = {"cohort": cohort, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) != made:
        raise UsageError(f"{out} holds the synthetic cohort {marker.read_text().strip()}, "
                         f"not {json.dumps(made)}: use a new --out")  # fmt: skip
    if not (slides / LABELS_CSV).exists():
        n, share = cohort_size(cohort)
        write_synthetic_slides(slides, n, seed=seed, size_um=(1600.0, 1500.0),
                               base_mags=(20,), slides_per_patient=1, cohort=cohort,
                               labeled_fraction=share, workers=os.cpu_count() or 1)  # fmt: skip
        write_atomic(marker, (json.dumps(made) + "\n").encode())
    report = run_shard([slides], str(dataset), mags=SYNTH_MAGS, tile_px=SYNTH_TILE_PX,
                       labels=slides / LABELS_CSV, splits=(0.6, 0.2, 0.2), address=address,
                       seed=seed, shard_size="64MB", progress=console.is_terminal)  # fmt: skip
    print_summary(report)
    if not report.ok:
        raise UsageError(f"sharding the synthetic cohort into {dataset} failed")
    return str(dataset)


def _given_teachers(values: tuple[str, ...]) -> dict[float, str]:
    """``--teacher CKPT`` (label fraction 1) or ``--teacher F=CKPT``."""
    out: dict[float, str] = {}
    for v in values:
        head, sep, tail = v.partition("=")
        try:
            fraction = float(head) if sep else 1.0
        except ValueError:
            fraction, tail = 1.0, v
        out[fraction] = tail if sep and tail else v
    return out


def build_grid(cfg: StudyConfig, info: Any) -> Grid:
    """The grid of ``cfg`` on the dataset ``info`` (:class:`resdistill.data.DatasetInfo`)."""
    from sharding.magnification import Magnification

    teacher_mag = info.resolve_mag(cfg.teacher_mag or info.highest)
    if cfg.student_mags:
        mags = tuple(info.resolve_mag(m) for m in cfg.student_mags)
    else:
        mags = student_mags_below(info.magnifications, teacher_mag)
    if not mags:
        raise UsageError(f"{info.url}: no magnification below the teacher's {teacher_mag}")
    top = Magnification.parse(teacher_mag).power
    for m in mags:
        if Magnification.parse(m).power >= top:
            raise UsageError(f"--student-mags: {m} is not below the teacher's {teacher_mag}")
    fractions = tuple(dict.fromkeys(cfg.label_fractions))
    shares = tuple(dict.fromkeys(cfg.shares))
    if cfg.quick and not cfg.student_mags:
        mags = (min(mags, key=lambda m: abs(top / Magnification.parse(m).power - QUICK_RATIO)),)
    return Grid(teacher_mag, mags, fractions, shares, tuple(range(cfg.grid_seeds)),
                _given_teachers(cfg.teacher))  # fmt: skip


def _evaluate(
    cells: dict[str, Cell], ckpts: dict[str, str | None], cfg: StudyConfig,
    data: str, out: Path, console: Any,
) -> None:  # fmt: skip
    from resdistill.study.records import evaluation_records, write_record

    good = {k: v for k, v in ckpts.items() if v}
    for k in sorted(set(ckpts) - set(good)):
        console.print(f"[red]cell {k} left no checkpoint: rerun with --resume[/]")
    if good:
        console.print(f"evaluating {len(good)} cell(s) on the test split")
    for record in evaluation_records(cells, good, data, loader_workers=cfg.loader_workers):
        write_record(out, record)


def run_study(cfg: StudyConfig) -> tuple[list[Any], list[Any]]:
    """Run (or resume) the study ``cfg`` describes; ``(rows, claims)`` of its report."""
    from rich.console import Console

    from resdistill.config import resolve_device
    from resdistill.data import DatasetInfo
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from resdistill.study.cells import CellOptions, cell_config, split_samples
    from resdistill.study.records import load_records
    from resdistill.study.results_table import write_report
    from resdistill.study.tuning import TrialOptions, run_cells
    from resdistill.train.runner import run_url
    from sharding.magnification import display_mag
    from sharding.ray_cluster import cluster_gpus, ray_init

    console = Console(highlight=False)
    out = Path(cfg.out).resolve()
    records = load_records(out)
    if records and not cfg.resume:
        raise UsageError(
            f"{out} holds a study already: pass --resume to continue it, or a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or str(out / "runs")
    started = time.monotonic()
    ray_init(cfg.address)
    data = cfg.data or synthetic_dataset(out, cfg.seed, cfg.address, console, cfg.cohort)
    info = DatasetInfo.load(data)
    grid = build_grid(cfg, info)
    write_run_config(str(out), "study", to_plain(replace(cfg, out=str(out), storage=storage)),
                     dataset=(info.url, info.raw))  # fmt: skip
    bs = cfg.batch_size
    opts = CellOptions(
        data=info.url, storage=storage,
        teacher_steps=max(1, split_samples(info.url, ("train",), labelled_only=True) // bs),
        student_steps=max(1, split_samples(info.url, ("train", "unlabeled")) // bs),
    )  # fmt: skip
    trials = TrialOptions(storage=storage, cpus_per_worker=cfg.cpus_per_worker,
                          trial_cpus=cfg.trial_cpus,
                          gpu=resolve_device(cfg.device, cluster_gpus()) == "cuda")  # fmt: skip
    todo = [c for c in grid.cells() if c.id not in records]
    console.print(
        f"[bold]study[/] on {info.url}: teacher {display_mag(grid.teacher_mag)}, students "
        f"{', '.join(map(display_mag, grid.student_mags))}, label fractions {grid.label_fractions}, unlabelled "
        f"shares {grid.unlabelled_shares}, seeds {list(grid.seeds)}: {len(grid.cells())} cells, "
        f"{len(grid.cells()) - len(todo)} done, {len(todo)} to run -> {run_url(storage, cfg.name)}",
        soft_wrap=True,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    given = {f: Cell(KIND_TEACHER, grid.teacher_mag, f, 0) for f in grid.given}
    new_given = {c.id: c for c in given.values() if c.id not in records}
    if new_given:  # a given teacher is scored like a trained one
        _evaluate(new_given, {k: grid.given[c.label_fraction] for k, c in new_given.items()},
                  cfg, info.url, out, console)  # fmt: skip
    for phase in ("teachers", "students"):
        cells = {c.id: c for c in todo if (c.kind == KIND_TEACHER) == (phase == "teachers")}
        if not cells:
            continue
        records = load_records(out)
        configs = {}
        for cid, cell in cells.items():
            teacher = None
            if cell.kind == KIND_DISTILLED:
                t = grid.teacher_of(cell)
                teacher = grid.given[cell.label_fraction] if t is None else (
                    records[t.id]["checkpoint"] if t.id in records else None)  # fmt: skip
                if teacher is None:
                    console.print(f"[yellow]{cid}: its teacher {t and t.id} failed, skipped[/]")
                    continue
            configs[cid] = cell_config(cell, cfg, opts, cfg.name, teacher)
        console.rule(f"[bold]{phase}: {len(configs)} cell(s)")
        ckpts = run_cells(configs, f"{cfg.name}-{phase}-{stamp}", trials, console)
        _evaluate(cells, ckpts, cfg, info.url, out, console)
    records = load_records(out)
    missing = [c.id for c in grid.cells() if c.id not in records]
    minutes = (time.monotonic() - started) / 60
    header = (f"Dataset {info.url}; teacher at {display_mag(grid.teacher_mag)}; {len(records)} cells in "
              f"{minutes:.1f} min this run; run storage {run_url(storage, cfg.name)}.")  # fmt: skip
    if missing:
        header += f" Missing cells (rerun with --resume): {', '.join(missing)}."
    rows, claims = write_report(records, out, header, console)
    console.print(f"study report in {out} ({minutes:.1f} min)")
    return rows, claims


__all__ = ["LABEL_FRACTIONS", "build_grid", "run_study", "synthetic_dataset"]
