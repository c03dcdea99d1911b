"""The study's driver: dataset (given, or the embedded synthetic cohort), grid, then two phases,
each a tuning step and its cells: the arms that learn from labels (teachers, baselines, the
same-resolution teachers), then the arms that distil (distilled students and the controls, whose
teachers the first phase trained). In each phase every arm first runs its tuning trials (the same
recipes for every arm, :mod:`resdistill.study.recipes`) and keeps the recipe its validation rule
prefers, then its cells train with it at every seed; each cell is scored on the test split once,
after it was chosen. Then ``validation.csv`` and the report. A cell with a record in
``<out>/cells`` is done and an arm with a record in ``<out>/tuning`` is tuned: ``resume`` reruns
only the rest (and rewrites the report from every record). The resolved options are written to
``<out>/config.yaml`` with the dataset's fingerprint.
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
    ABLATION_KINDS,
    KD_KINDS,
    KIND_TEACHER,
    LABEL_FRACTIONS,
    SUPERVISED_KINDS,
    Arm,
    Cell,
    Grid,
    student_mags_below,
)
from resdistill.study.records import cell_of, load_records

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
    from resdistill.study.ablation import default_variant
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
                _given_teachers(cfg.teacher), cfg.controls, cfg.ablations,
                default_variant(cfg.student_args))  # fmt: skip


def _evaluate(
    cells: dict[str, Cell], results: dict[str, Any], recipes: dict[str, Any], cfg: StudyConfig,
    data: str, out: Path, console: Any,
) -> None:  # fmt: skip
    """Score each cell's chosen checkpoint on the test split once and write its record, with
    the validation metrics that chose it and its recipe. ``results``: cell id -> checkpoint URL
    (a given teacher) or :class:`~resdistill.study.tuning.CellResult`."""
    from resdistill.study.records import evaluation_records, write_record

    ckpts = {k: r if isinstance(r, str) else r.checkpoint for k, r in results.items()}
    good = {k: v for k, v in ckpts.items() if v}
    for k in sorted(set(ckpts) - set(good)):
        console.print(f"[red]cell {k} left no checkpoint: rerun with --resume[/]")
    if good:
        console.print(f"evaluating {len(good)} cell(s) on the test split")
    for record in evaluation_records(cells, good, data, loader_workers=cfg.loader_workers):
        cid = cell_of(record).id
        result = results[cid]
        record["validation"] = {} if isinstance(result, str) else result.to_dict()
        record["recipe"] = recipes.get(cid)
        write_record(out, record)


def _teacher_ckpt(cell: Cell, grid: Grid, records: dict[str, Any]) -> str | None:
    """The checkpoint that teaches ``cell`` (a given teacher, or its teacher cell's record);
    None when it has none yet."""
    t = grid.teacher_of(cell)
    if t is None:
        return grid.given.get(cell.label_fraction) if grid.variant(cell.kind) else None
    return records[t.id]["checkpoint"] if t.id in records else None


def _tune(arms: list[Arm], grid: Grid, cfg: StudyConfig, build: Any, run: Any,
          out: Path, console: Any) -> None:  # fmt: skip
    """Run the tuning trials of ``arms`` as one experiment; each arm's record to ``out``."""
    from resdistill.study.protocol import tuning_record, write_tuning
    from resdistill.study.recipes import draw_recipes

    recipes = draw_recipes(cfg.recipe_trials, cfg.tune_seed)
    records = load_records(out)
    configs, plan = {}, {}
    for arm in arms:
        trial_cells = grid.trial_cells(arm, len(recipes))
        teacher = _teacher_ckpt(trial_cells[0], grid, records)
        if arm.kind in KD_KINDS and teacher is None:
            console.print(f"[yellow]{arm.id}: its teacher of seed {grid.seeds[0]} failed, "
                          "not tuned[/]")  # fmt: skip
            continue
        plan[arm] = [c.id for c in trial_cells]
        for cell, recipe in zip(trial_cells, recipes, strict=True):
            configs[cell.id] = build(cell, teacher, recipe)
    if not configs:
        return
    console.rule(f"[bold]tuning: {len(plan)} arm(s) x {len(recipes)} recipes")
    results = run(configs, "tune")
    for arm, ids in plan.items():
        write_tuning(out, tuning_record(arm, recipes, [results.get(i) for i in ids]))


def run_study(cfg: StudyConfig) -> tuple[list[Any], list[Any]]:
    """Run (or resume) the study ``cfg`` describes; ``(rows, claims)`` of its report. The study
    holds the lease on its ``--out`` throughout (:mod:`resdistill.train.run_lease`): a second
    study there is refused in one line naming the first."""
    from resdistill.train.run_lease import output_lease

    out = Path(cfg.out).resolve()
    with output_lease(str(out), "resdistill study") as lease:
        return _study(cfg, out, lease)


def _study(cfg: StudyConfig, out: Path, lease: Any) -> tuple[list[Any], list[Any]]:
    """:func:`run_study` once ``out`` is leased."""
    from rich.console import Console

    from resdistill.config import resolve_device
    from resdistill.data import DatasetInfo
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from resdistill.study.ablation import ablation_markdown
    from resdistill.study.cells import CellOptions, cell_config, split_samples
    from resdistill.study.protocol import load_tuning, protocol_markdown, write_validation
    from resdistill.study.results_table import write_report
    from resdistill.study.shared_targets import share_targets
    from resdistill.study.tuning import TrialOptions, run_cells
    from resdistill.tracking import resolve
    from resdistill.train.run_lease import check_lease
    from resdistill.train.runner import run_url
    from sharding.magnification import display_mag
    from sharding.ray_cluster import cluster_gpus, ray_init

    console = Console(highlight=False)
    records = load_records(out)
    if records and not cfg.resume:
        raise UsageError(
            f"{out} holds a study already: pass --resume to continue it, or a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or str(out / "runs")
    tracking = resolve(cfg.tracking, storage=storage, name="", folder=None,
                       experiment=cfg.name)  # fmt: skip
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
                          gpu=resolve_device(cfg.device, cluster_gpus()) == "cuda",
                          tracking=cfg.tracking, study=cfg.name)  # fmt: skip
    todo = [c for c in grid.cells() if c.id not in records]
    console.print(
        f"[bold]study[/] on {info.url}: teacher {display_mag(grid.teacher_mag)}, students "
        f"{', '.join(map(display_mag, grid.student_mags))}, label fractions {grid.label_fractions}, unlabelled "
        f"shares {grid.unlabelled_shares}, seeds {list(grid.seeds)}, controls "
        f"{', '.join(grid.controls) or 'none'}, {cfg.recipe_trials} recipe(s) per arm: "
        f"{len(grid.cells())} cells, "
        f"{len(grid.cells()) - len(todo)} done, {len(todo)} to run -> {run_url(storage, cfg.name)}",
        soft_wrap=True,
    )
    console.print(f"tracking: {tracking.describe()}", soft_wrap=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    built: dict[str, tuple[Cell, str | None, Any]] = {}

    def build(cell: Cell, teacher: str | None, recipe: Any) -> Any:
        built[cell.id] = (cell, teacher, recipe)
        return cell_config(cell, cfg, opts, cfg.name, teacher, recipe)

    def rebuild(cid: str, targets: str) -> Any:  # the same run on its teacher's stored outputs
        cell, teacher, recipe = built[cid]
        return cell_config(cell, cfg, opts, cfg.name, teacher, recipe, targets)

    def run(configs: dict[str, Any], what: str) -> dict[str, Any]:
        configs = share_targets(configs, out, rebuild, cfg.address, console)
        return run_cells(configs, f"{cfg.name}-{what}-{stamp}", trials, console)

    given = {f: Cell(KIND_TEACHER, grid.teacher_mag, f, 0) for f in grid.given}
    new_given = {c.id: c for c in given.values() if c.id not in records}
    if new_given:  # a given teacher is scored like a trained one
        _evaluate(new_given, {k: grid.given[c.label_fraction] for k, c in new_given.items()},
                  {}, cfg, info.url, out, console)  # fmt: skip
    for phase, kinds in (("supervised", SUPERVISED_KINDS),
                         ("distilled", (*KD_KINDS, *ABLATION_KINDS))):  # fmt: skip
        tuned = load_tuning(out)
        if cfg.recipe_trials > 1:
            _tune([a for a in grid.arms() if a.kind in kinds and a.id not in tuned], grid, cfg,
                  build, lambda c, w, p=phase: run(c, f"{w}-{p}"), out, console)  # fmt: skip
            tuned = load_tuning(out)
        cells = {c.id: c for c in todo if c.kind in kinds}
        if not cells:
            continue
        records = load_records(out)
        configs, recipes = {}, {}
        for cid, cell in cells.items():
            teacher = _teacher_ckpt(cell, grid, records)
            if cell.kind in KD_KINDS and teacher is None:
                t = grid.teacher_of(cell)
                console.print(f"[yellow]{cid}: its teacher {t.id if t else '(given)'} failed, "
                              "skipped[/]")  # fmt: skip
                continue
            arm = grid.recipe_arm(cell)
            recipe = (tuned.get(arm.id) or {}).get("recipe") if cfg.recipe_trials > 1 else {}
            if recipe is None:
                console.print(f"[yellow]{cid}: no tuning trial of its arm finished, skipped[/]")
                continue
            configs[cid], recipes[cid] = build(cell, teacher, recipe), recipe
        console.rule(f"[bold]{phase}: {len(configs)} cell(s)")
        _evaluate(cells, run(configs, phase), recipes, cfg, info.url, out, console)
    records = load_records(out)
    missing = [c.id for c in grid.cells() if c.id not in records]
    minutes = (time.monotonic() - started) / 60
    header = (f"Dataset {info.url}; teacher at {display_mag(grid.teacher_mag)}; {len(records)} cells in "
              f"{minutes:.1f} min this run; run storage {run_url(storage, cfg.name)}.")  # fmt: skip
    if missing:
        header += f" Missing cells (rerun with --resume): {', '.join(missing)}."
    protocol = protocol_markdown(grid, cfg.recipe_trials, cfg.quick, load_tuning(out),
                                 (cfg.epochs, cfg.student_epochs),
                                 cfg.self_training_threshold)  # fmt: skip
    check_lease(lease)
    write_validation(records, out, grid)
    rows, claims = write_report(records, out, f"{header}\n\n{protocol}", console,
                                ablation_markdown(grid, records))  # fmt: skip
    console.print(f"study report in {out} ({minutes:.1f} min)")
    return rows, claims


__all__ = ["LABEL_FRACTIONS", "build_grid", "run_study", "synthetic_dataset"]
