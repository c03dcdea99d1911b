"""``resdistill predict``'s driver: options -> models and read chains -> the engine -> outputs,
with rich progress and a final table (the command's help says what the user sees).

Everything that cannot work for any slide (checkpoint, options, an output holding predictions
made with other settings, a cascade whose two read chains do not share one region grid) is refused
before Ray starts, with exit code 2. A slide that fails is one ``skipped`` line and a status row in
``slides.parquet``; the run goes on (exit code 1 at the end).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from resdistill.errors import UsageError

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


def settle(args: argparse.Namespace) -> Setup:
    """Load the model(s) and settle the read chains; :class:`UsageError` (or a subclass) for
    anything that cannot work."""
    import matplotlib

    from resdistill.cascade.rules import DEFAULT_ESCALATE, check_threshold
    from resdistill.checkpoint import load_model
    from resdistill.predict.outputs import heatmap_classes
    from resdistill.read_chain import chain_of

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.heatmap_px < 16:
        raise UsageError(f"--heatmap-px must be at least 16, got {args.heatmap_px}")
    if args.device not in (None, "cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.actors is not None and args.actors < 1:
        raise UsageError("--actors must be at least 1")
    if args.cmap not in matplotlib.colormaps:
        raise UsageError(f"unknown colormap {args.cmap!r} (try viridis, magma, RdYlBu_r)")
    if args.escalate is not None and not args.cascade:
        raise UsageError("--escalate needs --cascade TEACHER_CKPT")
    try:
        threshold = check_threshold(DEFAULT_ESCALATE if args.escalate is None else args.escalate)
    except ValueError as exc:
        raise UsageError(f"--escalate: {exc}") from None
    model = load_model(args.checkpoint, device="cpu")
    chain = chain_of(model, min_tissue=args.min_tissue, mpp=args.mpp, read=args.read)
    which = heatmap_classes(args.heatmap, model.classes) or []
    teacher = teacher_chain = None
    if args.cascade:
        teacher = load_model(args.cascade, device="cpu")
        teacher_chain = chain_of(teacher, min_tissue=chain.opts.min_tissue, mpp=args.mpp)
        _check_cascade(model, chain, teacher, teacher_chain)
    flops = (
        _flops(model, chain.tile_px),
        _flops(teacher, teacher_chain.tile_px) if teacher is not None else None,
    )
    return Setup(
        model, chain, teacher, teacher_chain, threshold, flops, which, args.heatmap != "none"
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


def predict_command(args: argparse.Namespace) -> int:
    """The whole command; returns its exit code."""
    from rich.console import Console
    from rich.markup import escape

    from resdistill.predict.annotation_overlay import AnnotationOverlays
    from resdistill.predict.outputs import done_slides
    from sharding.annotation_set import AnnotationSetError
    from sharding.pipeline import find_slides
    from sharding.storage import StorageError, open_storage

    err = Console(stderr=True, highlight=False)
    try:
        setup = settle(args)
        found, problems = find_slides(args.slides)
        if not found and not problems:
            raise UsageError("no slide to predict (no file given, or the folders hold none)")
        store = open_storage(args.out)
        done = done_slides(store, list(found), setup.settings(args.read))
        annotations = None
        if args.annotations:
            try:
                annotations = AnnotationOverlays(
                    args.annotations, found,
                    lambda line: err.print(f"[yellow]annotations[/yellow] {escape(line)}", soft_wrap=True),
                )  # fmt: skip
            except (AnnotationSetError, StorageError) as exc:
                raise UsageError(f"--annotations: {exc}") from None
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        err.print(f"[red]skipped[/red] {escape(problem)}", soft_wrap=True)
    for note in (*setup.chain.notes, *(setup.teacher_chain.notes if setup.teacher else ())):
        err.print(f"[yellow]note[/yellow] {escape(note)}", soft_wrap=True)
    try:
        failed = _run(args, setup, store, found, done, annotations, err)
    except (UsageError, StorageError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    unusable = annotations is not None and annotations.problems > 0
    return 1 if problems or failed or unusable else 0


def _run(args, setup: Setup, store, found, done, annotations, err) -> int:  # noqa: ANN001
    """Run the engine over the slides not done, write and merge; returns the failures' count."""

    from rich.console import Console
    from rich.markup import escape

    from resdistill.predict.engine import run_engine
    from resdistill.predict.outputs import merge, write_slide
    from resdistill.predict.summary import Progress, summary_table
    from sharding.ray_cluster import ray_init

    model, chain = setup.model, setup.chain
    todo = {sid: path for sid, path in found.items() if sid not in done}
    records = dict(done)  # the done slides' records, read once by done_slides
    failures: dict[str, tuple[str, str]] = {}
    new: list[dict[str, Any]] = []
    record = {
        "model": model.name, "checkpoint": model.url, "mag": model.mag, "tile_px": chain.tile_px,
        "classes": list(model.classes), "min_tissue": float(chain.opts.min_tissue),
        "read_chain": chain.to_json(), "read": args.read, "settings": setup.settings(args.read),
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

        ray_init(args.address, dashboard=False)  # the command shows its own progress
        cfg = _engine_config(args, setup, ray.cluster_resources())
        with Progress(err, len(todo)) as progress:

            def on_slide(result: Any) -> None:
                if result.ok:
                    overlay = annotations.for_slide(result.sid) if annotations else None
                    records[result.sid] = doc = write_slide(
                        store, result, record, classes=model.classes, which=setup.which,
                        mag=model.mag, cmap=args.cmap, alpha=args.alpha, flops=setup.flops,
                        overlay=overlay, pictures=setup.pictures,
                    )  # fmt: skip
                    new.append(doc)
                else:
                    failures[result.sid] = (result.path, result.error)
                    progress.say(f"[red]skipped[/red] {escape(result.error)}")
                progress.slide_done()

            run_engine(todo, cfg, on_slide, on_tiles=progress.tiles, on_planned=progress.planned)
    merge(
        store, list(found), records, failures, classes=model.classes, read=args.read,
        cascade=setup.teacher is not None,
    )  # fmt: skip
    console = Console(highlight=False)
    if not console.is_terminal:  # a log file: room for whole slide ids and class names
        console.width = max(console.width, 160)
    console.print(summary_table(setup, new, len(done), failures, time.perf_counter() - started))
    console.print(f"output: {store.url}", soft_wrap=True)
    return len(failures)


def _engine_config(args: argparse.Namespace, setup: Setup, resources: dict) -> Any:
    """Device and actor pool sizes for the cluster's ``resources``: one actor per GPU on cuda;
    on CPU a quarter of the CPUs, each actor asking for less than a CPU when whole CPUs would
    leave none to reading."""
    from resdistill.predict.engine import Cascade, EngineConfig

    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    device = args.device or ("cuda" if gpus else "cpu")
    if device == "cuda" and not gpus:
        raise UsageError("--device cuda: the Ray cluster has no GPU (leave --device out for CPU)")
    stages = 2 if setup.teacher is not None else 1
    actors = args.actors or (max(1, gpus) if device == "cuda" else max(1, cpus // 4))
    actor_cpus = 1.0
    if device == "cpu" and actors * stages + 1 > cpus:
        actor_cpus = max(0.25, (cpus - 1) / (actors * stages))
    cascade = None
    if setup.teacher is not None:
        cascade = Cascade(setup.teacher.url, setup.teacher_chain, setup.threshold)
    return EngineConfig(
        checkpoint=setup.model.url, chain=setup.chain, classes=tuple(setup.model.classes),
        device=device, actors=actors, actor_cpus=actor_cpus, batch_size=args.batch_size,
        heatmap_px=args.heatmap_px if setup.pictures else 0, cascade=cascade,
    )  # fmt: skip
