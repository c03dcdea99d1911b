"""``resdistill predict``'s driver: a :class:`~resdistill.predict.config.PredictConfig` ->
models and read chains -> the engine -> outputs, with rich progress and a final table (the
command's help says what the user sees).

Everything that cannot work for any slide (checkpoint, options, an output holding predictions
made with other settings, a cascade whose two read chains do not share one region grid) is refused
before Ray starts, with exit code 2, and so is a slide whose id another slide holds, in the run or
in ``--out`` (:mod:`resdistill.predict.slide_set`); then the resolved config is written as
``<out>/config.yaml``. A slide that fails (unreadable, or its reads crash their worker past the
bounded retries, :mod:`resdistill.predict.engine`) is one ``skipped`` line and a status row in
``slides.parquet``; the run goes on (exit code 1 at the end).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from resdistill.config import resolve_device
from resdistill.errors import UsageError
from resdistill.predict.config import PredictConfig

__all__ = ["predict_command"]


@dataclass(frozen=True)
class Setup:
    """The options settled once, before any slide."""

    model: Any  # LoadedModel
    chain: Any  # ReadChain
    teacher: Any | None
    teacher_chain: Any | None
    threshold: float
    flops: tuple[int, int | None]  # counted per tile: student (or the only model), teacher
    which: list[str]  # heatmap classes; empty: each slide's own class
    pictures: bool = True  # False for --heatmap none: no PNG, no slide picture read

    def settings(self, read: str) -> dict[str, Any]:
        """What a slide's record must match for a rerun to skip it."""
        cascade = None
        if self.teacher is not None:
            cascade = {"teacher": self.teacher.url, "escalate": self.threshold}
        return {
            "checkpoint": self.model.url, "read": read,
            "min_tissue": float(self.chain.opts.min_tissue), "cascade": cascade,
        }  # fmt: skip


def _flops(model: Any, px: int) -> int:
    from resdistill.measures.compute import count_flops

    return int(count_flops(model.model, (3, px, px)))


def settle(cfg: PredictConfig) -> Setup:
    """Load the model(s) and settle the read chains; :class:`UsageError` (or a subclass) for
    anything that cannot work (the config has checked the rest)."""
    import matplotlib

    from resdistill.checkpoint import load_model
    from resdistill.predict.outputs import heatmap_classes
    from resdistill.read_chain import chain_of

    if cfg.cmap not in matplotlib.colormaps:
        raise UsageError(f"unknown colormap {cfg.cmap!r} (try viridis, magma, RdYlBu_r)")
    model = load_model(cfg.checkpoint, device="cpu")
    chain = chain_of(model, min_tissue=cfg.min_tissue, mpp=cfg.mpp, read=cfg.read)
    which = heatmap_classes(cfg.heatmap, model.classes) or []
    teacher = teacher_chain = None
    if cfg.cascade:
        teacher = load_model(cfg.cascade, device="cpu")
        teacher_chain = chain_of(teacher, min_tissue=chain.opts.min_tissue, mpp=cfg.mpp)
        _check_cascade(model, chain, teacher, teacher_chain)
    flops = (
        _flops(model, chain.tile_px),
        _flops(teacher, teacher_chain.tile_px) if teacher is not None else None,
    )
    return Setup(
        model, chain, teacher, teacher_chain, cfg.threshold, flops, which, cfg.heatmap != "none"
    )


def _check_cascade(model: Any, chain: Any, teacher: Any, tchain: Any) -> None:
    """The teacher re-reads the student's regions: both chains must plan the same grid (top
    magnification and tile size), and the classes must be the same."""
    from sharding.magnification import display_mag

    s_top, t_top = chain.opts.mags[0], tchain.opts.mags[0]
    s_px, t_px = chain.opts.sizes[s_top.name], tchain.opts.sizes[t_top.name]
    if (s_top.name, s_px) != (t_top.name, t_px):
        raise UsageError(
            f"--cascade: the student reads regions of {s_px} px at {display_mag(s_top)} but the "
            f"teacher {teacher.url} regions of {t_px} px at {display_mag(t_top)}: a cascade needs "
            "both models trained on one dataset (the same region grid)"
        )
    if list(model.classes) != list(teacher.classes):
        raise UsageError(
            f"--cascade: the student's classes {list(model.classes)} differ from the teacher's "
            f"{list(teacher.classes)}"
        )


def predict_command(cfg: PredictConfig) -> int:
    """The whole command; returns its exit code (0 all done, 1 some slides failed, 2 unusable
    checkpoint, options or output). It holds the lease on ``--out`` throughout
    (:mod:`resdistill.train.run_lease`): a second run on that output is refused in one line
    naming the first (exit 2), and a run that lost its lease stops before the merge."""
    from resdistill.train.run_lease import output_lease
    from sharding.storage import StorageError

    try:  # the models and their read chains first: a refused run leaves no output folder
        setup = settle(cfg)
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    try:
        lease = output_lease(
            cfg.out, "resdistill predict", lambda line: print(f"note: {line}", file=sys.stderr)
        )
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    with lease:
        return _predict(cfg, lease, setup)


def _predict(cfg: PredictConfig, lease: Any, setup: Setup) -> int:
    """:func:`predict_command` once the models are loaded and ``--out`` is leased."""
    from rich.console import Console
    from rich.markup import escape

    from resdistill.fields import to_plain
    from resdistill.predict.annotation_overlay import AnnotationOverlays
    from resdistill.predict.slide_set import settle_slides
    from resdistill.run_config import write_run_config
    from sharding.annotation_set import AnnotationSetError
    from sharding.storage import StorageError, open_storage

    err = Console(stderr=True, highlight=False)
    try:
        store = open_storage(cfg.out)
        slides = settle_slides(
            cfg.slides, store, setup.settings(cfg.read), cfg.on_conflict, bool(cfg.annotations)
        )
        annotations = None
        if cfg.annotations:
            try:
                annotations = AnnotationOverlays(
                    cfg.annotations, slides.slides,
                    lambda line: err.print(f"[yellow]annotations[/yellow] {escape(line)}", soft_wrap=True),
                )  # fmt: skip
            except (AnnotationSetError, StorageError) as exc:
                raise UsageError(f"--annotations: {exc}") from None
        write_run_config(store.url, "predict", to_plain(_portable(cfg)))
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    for problem in (*slides.problems, *(line for _, line in slides.failures.values())):
        err.print(f"[red]skipped[/red] {escape(problem)}", soft_wrap=True)
    chain_notes = (*setup.chain.notes, *(setup.teacher_chain.notes if setup.teacher else ()))
    for note in (*slides.notes, *chain_notes):
        err.print(f"[yellow]note[/yellow] {escape(note)}", soft_wrap=True)
    try:
        failed = _run(cfg, setup, store, slides, annotations, err, lease)
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    unusable = annotations is not None and annotations.problems > 0
    return 1 if slides.problems or failed or unusable else 0


def _portable(cfg: PredictConfig) -> PredictConfig:
    """``cfg`` with local paths made absolute, so its ``config.yaml`` repeats the run from any
    folder."""
    from dataclasses import replace

    from resdistill.checkpoint import absolute_url

    def absolute(url: str | None) -> str | None:
        return None if url is None else absolute_url(url)

    return replace(
        cfg, checkpoint=absolute_url(cfg.checkpoint), out=absolute_url(cfg.out),
        slides=tuple(absolute_url(s) for s in cfg.slides), cascade=absolute(cfg.cascade),
        annotations=absolute(cfg.annotations),
    )  # fmt: skip


def _run(cfg: PredictConfig, setup: Setup, store, slides, annotations, err, lease) -> int:  # noqa: ANN001
    """Run the engine over the slides not done, write and merge; returns the failures' count
    (the unreadable slides of ``slides`` included)."""

    from rich.console import Console
    from rich.markup import escape

    from resdistill.predict.engine import run_engine
    from resdistill.predict.outputs import merge, write_slide
    from resdistill.predict.summary import Progress, summary_table
    from resdistill.train.run_lease import check_lease
    from sharding.ray_cluster import ray_init

    model, chain = setup.model, setup.chain
    done = slides.done
    todo = {sid: path for sid, path in slides.slides.items() if sid not in done}
    records = dict(done)  # the done slides' records, read once by settle_slides
    failures: dict[str, tuple[str, str]] = dict(slides.failures)
    new: list[dict[str, Any]] = []
    record = {
        "model": model.name, "checkpoint": model.url, "mag": model.mag, "tile_px": chain.tile_px,
        "classes": list(model.classes), "min_tissue": float(chain.opts.min_tissue),
        "read_chain": chain.to_json(), "read": cfg.read, "settings": setup.settings(cfg.read),
    }  # fmt: skip
    if setup.teacher is not None:
        record["cascade"] = {
            "teacher": setup.teacher.url, "teacher_mag": setup.teacher.mag,
            "escalate": setup.threshold, "student_flops": setup.flops[0],
            "teacher_flops": setup.flops[1],
        }  # fmt: skip
    started = time.perf_counter()
    if todo:
        import ray

        ray_init(cfg.address, dashboard=False)  # the command shows its own progress
        engine = _engine_config(cfg, setup, ray.cluster_resources())
        with Progress(err, len(todo)) as progress:

            def on_slide(result: Any) -> None:
                if result.ok:
                    origin = result.plan.info.origin
                    overlay = annotations.for_slide(result.sid, origin) if annotations else None
                    source = {"source": slides.identity[result.sid].to_record()}
                    records[result.sid] = doc = write_slide(
                        store, result, {**record, **source}, classes=model.classes, which=setup.which,
                        mag=model.mag, cmap=cfg.cmap, alpha=cfg.alpha, flops=setup.flops,
                        overlay=overlay, pictures=setup.pictures, geojson=cfg.geojson_options,
                    )  # fmt: skip
                    new.append(doc)
                else:
                    failures[result.sid] = (result.path, result.error)
                    progress.say(f"[red]skipped[/red] {escape(result.error)}")
                progress.slide_done()

            run_engine(todo, engine, on_slide, on_tiles=progress.tiles, on_planned=progress.planned)
    if cfg.geojson_options is not None and done:  # the skipped slides' files, as asked now
        from resdistill.predict.geojson import rewrite_geojson
        from resdistill.predict.outputs import PARTS

        parts = {sid: f"{PARTS}/{sid}.tiles.parquet" for sid in done}
        rewrite_geojson(store, done, parts, model.classes, cfg.geojson_options)
    check_lease(lease)  # the merge rewrites the tables: only while --out is still ours
    merge(
        store, [*slides.slides, *slides.failures], records, failures, classes=model.classes,
        read=cfg.read, cascade=setup.teacher is not None, sources=slides.identity,
    )  # fmt: skip
    console = Console(highlight=False)
    if not console.is_terminal:  # a log file: room for whole slide ids and class names
        console.width = max(console.width, 160)
    console.print(summary_table(setup, new, len(done), failures, time.perf_counter() - started))
    console.print(f"output: {store.url}", soft_wrap=True)
    return len(failures)


def auto_batch(tile_px: int, device: str = "cpu") -> int:
    """``--batch-size``'s default: as many pixels as 64 tiles of 56 px, between 4 and 1024 tiles
    (256 at 28 px, 16 at 112 px, 4 at 224 px); on a GPU at least 64 tiles. A CPU core's caches
    favour a fixed number of pixels per call (resnet18 scores 28 px tiles a third faster in
    batches of 256 than of 64, 224 px tiles a third faster in batches of 4 than of 64); a GPU
    needs many tiles per call to fill it."""
    tiles = 64 * (56 / max(1, tile_px)) ** 2
    return int(min(1024, max(64 if device == "cuda" else 4, tiles)))


def _engine_config(cfg: PredictConfig, setup: Setup, resources: dict) -> Any:
    """Device and actor pool sizes for the cluster's ``resources``: one actor per GPU on cuda;
    on CPU without the cascade one actor per CPU that reads and scores (``fused``); with the
    cascade a quarter of the CPUs per model, each actor asking for less than a CPU when whole
    CPUs would leave none to reading."""
    from resdistill.predict.engine import Cascade, EngineConfig, chunk_limit

    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    device = resolve_device(cfg.device, gpus)
    stages = 2 if setup.teacher is not None else 1
    fused = device == "cpu" and setup.teacher is None
    actors = cfg.actors or (
        max(1, gpus) if device == "cuda" else cpus if fused else max(1, cpus // 4)
    )
    actor_cpus = 1.0
    if device == "cpu" and not fused and actors * stages + 1 > cpus:
        actor_cpus = max(0.25, (cpus - 1) / (actors * stages))
    batch = cfg.batch_size or auto_batch(setup.chain.tile_px, device)
    cascade = None
    if setup.teacher is not None:
        cascade = Cascade(setup.teacher.url, setup.teacher_chain, setup.threshold)
    return EngineConfig(
        checkpoint=setup.model.url, chain=setup.chain, classes=tuple(setup.model.classes),
        device=device, actors=actors, actor_cpus=actor_cpus, batch_size=batch,
        heatmap_px=cfg.heatmap_px if setup.pictures else 0, cascade=cascade, fused=fused,
        chunk_tiles=chunk_limit(setup.chain.tile_px, batch), s3_reads=cfg.s3_reads,
        readers=actors if fused else cpus,
    )  # fmt: skip
