"""The whole pipeline end to end on the embedded default: synthetic slides, local Ray, a local
folder as storage (``resdistill demo``). Each stage is the library code the individual commands
run, with configs built here, and a rerun resumes: slides, shards and trained runs under
``out`` are kept.

Stages: synthetic slides; shards at the teacher's and the student's magnification; the teacher;
the supervised baseline and the distilled student at the low magnification; the teacher's
targets cached once and a student distilled from them (``cached``); the teacher, baseline and
distilled student again with labels on only ``label_fraction`` of the training slides; all of
them evaluated on the test split (``out/eval``). The resolved options go to
``out/config.yaml``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from resdistill.config import (
    ARCH_CHOICES,
    DEFAULT_EPOCHS,
    STAGE_DISTILL,
    STAGE_SUPERVISED,
    STAGE_TEACHER,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunOptions,
    TeacherRef,
    TrainConfig,
)
from resdistill.fields import ConfigError, check, check_choice, opt


def _size(text: str) -> tuple[float, float]:
    """``"1600x1500"`` -> ``(1600.0, 1500.0)``; ValueError otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}")
    w, h = (float(v) for v in parts)
    if w <= 0 or h <= 0:
        raise ValueError(f"expected positive sizes, got {text!r}")
    return w, h


@dataclass(frozen=True)
class DemoConfig:
    """The demo's options; validated on construction (messages name the flag)."""

    out: str = opt("demo", "working folder (a rerun resumes there)")
    slides: int = opt(32, "synthetic slides")
    seed: int = opt(0, "seed of slides, splits and training")
    size_um: str = opt("1600x1500", "slide size in micrometres", metavar="WxH")
    teacher_mag: str = opt("10x", "teacher magnification")
    student_mag: str = opt("2.5x", "student magnification")
    tile_px: int = opt(128, "tile edge at the teacher's magnification")
    arch: str = opt("resnet-small", "architecture of teacher and students (the paper's "
                    "reference)", choices=ARCH_CHOICES)  # fmt: skip
    epochs: int = opt(DEFAULT_EPOCHS, "epochs of the teacher")
    student_epochs: int = opt(DEFAULT_EPOCHS, "epochs of each student")
    batch_size: int = opt(32, "batch size of every run")
    label_fraction: float = opt(0.1, "labelled share of training slides in the label-scarce "
                                "comparison (0 skips it)")  # fmt: skip
    cached: bool = opt(True, "also distil a student from cached teacher targets "
                       "(--no-cached skips it)")  # fmt: skip
    address: str | None = opt(None, "Ray cluster address (default: a local Ray on 127.0.0.1)")

    def __post_init__(self) -> None:
        from sharding.magnification import Magnification

        check(self.slides >= 1, "--slides", "must be at least 1")
        check(self.tile_px >= 1, "--tile-px", "must be at least 1")
        check(self.batch_size >= 1, "--batch-size", "must be at least 1")
        check(self.epochs >= 1, "--epochs", "must be at least 1")
        check(self.student_epochs >= 1, "--student-epochs", "must be at least 1")
        check(0 <= self.label_fraction <= 1, "--label-fraction", "must be in [0, 1]")
        check_choice(DemoConfig, self, "arch")
        for flag, value, parse in (("--size-um", self.size_um, _size),
                                   ("--teacher-mag", self.teacher_mag, Magnification.parse),
                                   ("--student-mag", self.student_mag, Magnification.parse)):  # fmt: skip
            try:
                parse(value)
            except ValueError as exc:
                raise ConfigError(f"{flag}: {exc}") from None

    @property
    def size(self) -> tuple[float, float]:
        """The slides' ``(width, height)`` in micrometres."""
        return _size(self.size_um)


def stage_config(cfg: DemoConfig, stage: str, name: str, dataset: str, storage: str,
                 **data: Any) -> TrainConfig:  # fmt: skip
    """The unplanned config of one of the demo's training runs: ``stage`` at its magnification
    (the teacher's or the student's) with the demo's network, batch and epochs, one Ray Train
    worker holding every CPU; ``data`` sets more :class:`DataConfig` fields."""
    import os

    from sharding.magnification import Magnification

    teacher = stage == STAGE_TEACHER
    mag = str(Magnification.parse(cfg.teacher_mag if teacher else cfg.student_mag))
    return TrainConfig(
        stage,
        DataConfig(url=dataset, batch_size=cfg.batch_size, loader_workers=1, **data),
        ModelConfig(arch=cfg.arch, mag=mag),
        OptimConfig(epochs=cfg.epochs if teacher else cfg.student_epochs, seed=cfg.seed),
        run=RunOptions(
            name=name,
            storage=storage,
            workers=1,
            cpus_per_worker=float(os.cpu_count() or 1),
            address=cfg.address,
        ),  # fmt: skip
    )


def run_demo(cfg: DemoConfig) -> dict[str, Any] | None:
    """Run (or resume) every stage; ``{"models": {name: best checkpoint}, "timings_s": ...,
    "total_s": ...}`` (also written to ``out/eval/demo.json``), or None when sharding failed
    (its summary printed)."""
    from rich.console import Console

    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from resdistill.train.driver import train
    from sharding.ray_cluster import ray_init

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:  # a log file: room for the whole results table
        console.width = 160
    out = Path(cfg.out).resolve()
    dataset, runs = str(out / "dataset"), str(out / "runs")
    timings: dict[str, float] = {}
    started = time.monotonic()

    def timed(name: str, work: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{name}")
        t0 = time.monotonic()
        result = work()
        timings[name] = time.monotonic() - t0
        return result

    timed("synth", lambda: _synth(cfg, out / "slides", console))
    ray_init(cfg.address)
    info = timed("shard", lambda: _shard(cfg, out / "slides", dataset, console))
    if info is None:
        return None
    write_run_config(str(out), "demo", to_plain(replace(cfg, out=str(out))),
                     dataset=(info.url, info.raw))  # fmt: skip

    def fit(stage: str, name: str, **kw: Any) -> str:
        teacher = kw.pop("teacher", None)
        run_cfg = stage_config(cfg, stage, name, dataset, runs, **kw)
        if teacher is not None:
            run_cfg = replace(run_cfg, teacher=TeacherRef(checkpoint=teacher))
        return timed(name, lambda: train(run_cfg).best_checkpoint)

    def targets(name: str, teacher: str) -> str:
        return timed(name, lambda: _cache_targets(cfg, dataset, teacher))

    models: dict[str, str] = {}
    models["teacher"] = fit(STAGE_TEACHER, "teacher")
    models["baseline"] = fit(STAGE_SUPERVISED, "baseline")
    models["distilled"] = fit(STAGE_DISTILL, "distilled", teacher=models["teacher"])
    if cfg.cached:
        models["distilled-cached"] = fit(
            STAGE_DISTILL, "distilled-cached", teacher=models["teacher"],
            targets=targets("teacher-targets", models["teacher"]),
        )  # fmt: skip
    if 0 < cfg.label_fraction < 1:
        pct = f"{100 * cfg.label_fraction:g}pct"
        # As many optimizer steps as the full-label runs (the labelled subset is cycled), so
        # neither the teacher nor the baseline is short of training for having fewer labels.
        scarce = {"label_fraction": cfg.label_fraction,
                  "steps_per_epoch": max(1, _train_samples(dataset) // cfg.batch_size)}  # fmt: skip
        teacher = models[f"teacher-{pct}"] = fit(STAGE_TEACHER, f"teacher-{pct}", **scarce)
        models[f"baseline-{pct}"] = fit(STAGE_SUPERVISED, f"baseline-{pct}", **scarce)
        cached = targets(f"teacher-targets-{pct}", teacher) if cfg.cached else None
        models[f"distilled-{pct}"] = fit(STAGE_DISTILL, f"distilled-{pct}", teacher=teacher,
                                         targets=cached)  # fmt: skip

    report = timed("evaluate", lambda: _evaluate(cfg, models, dataset, str(out / "eval")))
    from resdistill.eval.report_files import format_table

    console.print(format_table(report))
    total = time.monotonic() - started
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    console.print(f"demo finished in {total / 60:.1f} min ({timing}); results in {out / 'eval'}")
    summary = {"models": models, "timings_s": timings, "total_s": total}
    (out / "eval" / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


def _synth(cfg: DemoConfig, slides: Path, console: Any) -> None:
    import os

    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    if (slides / LABELS_CSV).exists():
        console.print(f"kept the slides in {slides}")
        return
    written = write_synthetic_slides(
        slides, cfg.slides, seed=cfg.seed, size_um=cfg.size, base_mags=(20,),
        slides_per_patient=1, workers=os.cpu_count() or 1,
    )  # fmt: skip
    console.print(f"{len(written)} slides in {slides}")


def _shard(cfg: DemoConfig, slides: Path, dataset: str, console: Any) -> Any:
    """Shard the slides at both magnifications; the dataset's info, or None when it failed."""
    from resdistill.data import DatasetInfo
    from sharding.magnification import Magnification
    from sharding.pipeline import run_shard
    from sharding.progress import print_summary
    from sharding.synthetic import LABELS_CSV

    mags = (Magnification.parse(cfg.teacher_mag), Magnification.parse(cfg.student_mag))
    report = run_shard(
        [slides], dataset, mags=",".join(dict.fromkeys(f"{m.power:g}" for m in mags)),
        tile_px=cfg.tile_px, labels=str(slides / LABELS_CSV), splits=(0.6, 0.2, 0.2),
        address=cfg.address, seed=cfg.seed, shard_size="64MB", progress=console.is_terminal,
    )  # fmt: skip
    print_summary(report)
    return DatasetInfo.load(dataset) if report.ok else None


def _train_samples(dataset: str) -> int:
    from resdistill.data import read_manifest

    return read_manifest(dataset, columns=["split"]).column("split").to_pylist().count("train")


def _cache_targets(cfg: DemoConfig, dataset: str, teacher: str) -> str:
    from resdistill.train.targets import write_targets
    from resdistill.train.targets_config import TargetsConfig
    from sharding.magnification import Magnification

    mags = (str(Magnification.parse(cfg.student_mag)),)
    targets = TargetsConfig(data=dataset, teacher=teacher, student_mags=mags, address=cfg.address)
    return write_targets(targets).url


def _evaluate(cfg: DemoConfig, models: dict[str, str], dataset: str, out: str) -> Any:
    from resdistill.eval.config import EvaluateConfig
    from resdistill.eval.evaluation_run import run_evaluation

    report, _ = run_evaluation(EvaluateConfig(
        checkpoints=tuple(models.values()), data=dataset, out=out, names=tuple(models),
        seed=cfg.seed, loader_workers=1,
    ))  # fmt: skip
    return report
