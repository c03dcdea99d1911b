"""Run the whole pipeline end to end on the embedded default: synthetic slides, local Ray, a local
folder as storage. Each stage is the code the individual commands run, and a rerun resumes
(finished stages are skipped: slides, shards and trained runs are kept under --out).

Stages:
  1. synth     synthetic slides (4 classes whose cues live at different scales)
  2. shard     every region at the teacher's and the student's magnification
  3. teacher   supervised, at the highest magnification
  4. baseline  the student architecture at the low magnification, trained on labels only
  5. distill   the student at the low magnification, taught by the frozen teacher, no labels
  6. cached   the teacher's outputs stored once (teacher-targets), and the same student
     distilled from them without running the teacher (--no-cached skips it)
  7. the teacher, baseline and distilled student again with labels on only --label-fraction of
     the training slides (the teacher and baseline see those labels, cycled for as many steps
     as the full-label runs take; distillation sees every slide, unlabelled, from cached
     targets of that teacher unless --no-cached)
  8. evaluate  all of them on the test split: one table, JSON and plots under OUT/eval
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from resdistill.config import DEFAULT_EPOCHS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="working folder (default: %(default)s)")
    p.add_argument("--slides", type=int, default=32, help="synthetic slides (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of slides, splits and training")
    p.add_argument(
        "--size-um", default="1600x1500", help="slide size in micrometres (default: %(default)s)"
    )
    p.add_argument(
        "--teacher-mag", default="10x", help="teacher magnification (default: %(default)s)"
    )
    p.add_argument(
        "--student-mag", default="2.5x", help="student magnification (default: %(default)s)"
    )
    p.add_argument(
        "--tile-px", type=int, default=128, help="tile edge at the teacher's magnification"
    )
    p.add_argument(
        "--arch",
        default="resnet-small",
        help="architecture of teacher and students (default: %(default)s, the paper's reference)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help="epochs of the teacher (default: %(default)s)",
    )
    p.add_argument(
        "--student-epochs", type=int, default=DEFAULT_EPOCHS, help="epochs of each student"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--label-fraction",
        type=float,
        default=0.1,
        help="labelled share of training slides in the label-scarce comparison (0 skips it)",
    )
    p.add_argument(
        "--no-cached",
        dest="cached",
        action="store_false",
        help="skip the student distilled from cached teacher targets (stage 6)",
    )
    p.add_argument("--address", help="Ray cluster address; default starts a local Ray on 127.0.0.1")


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import os

    from rich.console import Console

    from resdistill.commands import distill, teacher
    from sharding.magnification import Magnification
    from sharding.pipeline import run_shard
    from sharding.progress import print_summary
    from sharding.ray_cluster import ray_init
    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:  # a log file: room for the whole results table
        console.width = 160
    out = Path(args.out).resolve()
    slides_dir, dataset, runs = out / "slides", out / "dataset", out / "runs"
    w, h = (float(v) for v in args.size_um.lower().split("x"))
    t_mag, s_mag = Magnification.parse(args.teacher_mag), Magnification.parse(args.student_mag)
    mags = ",".join(dict.fromkeys(f"{m.power:g}" for m in (t_mag, s_mag)))
    timings: dict[str, float] = {}
    started = time.monotonic()

    def stage(name: str) -> None:
        timings[name] = time.monotonic()
        console.rule(f"[bold]{name}")

    def done(name: str) -> None:
        timings[name] = time.monotonic() - timings[name]

    stage("synth")
    if not (slides_dir / LABELS_CSV).exists():
        written = write_synthetic_slides(
            slides_dir, args.slides, seed=args.seed, size_um=(w, h), base_mags=(20,),
            slides_per_patient=1, workers=os.cpu_count() or 1,
        )  # fmt: skip
        console.print(f"{len(written)} slides in {slides_dir}")
    else:
        console.print(f"kept the slides in {slides_dir}")
    done("synth")

    ray_init(args.address)
    stage("shard")
    report = run_shard(
        [slides_dir], str(dataset), mags=mags, tile_px=args.tile_px,
        labels=slides_dir / LABELS_CSV, splits=(0.6, 0.2, 0.2), address=args.address,
        seed=args.seed, shard_size="64MB", progress=console.is_terminal,
    )  # fmt: skip
    print_summary(report)
    if not report.ok:
        return 1
    done("shard")

    common = ["--data", str(dataset), "--storage", str(runs), "--batch-size", str(args.batch_size),
              "--workers", "1", "--cpus-per-worker", str(os.cpu_count() or 1),
              "--loader-workers", "1", "--seed", str(args.seed)]  # fmt: skip
    if args.address:
        common += ["--address", args.address]

    def train_teacher(name: str, extra: list[str]) -> str:
        stage(name)
        summary = teacher.train(_parse(teacher, [
            *common, "--name", name, "--mag", str(t_mag), "--arch", args.arch,
            "--epochs", str(args.epochs), *extra,
        ]))  # fmt: skip
        done(name)
        return summary.best_checkpoint

    def train_student(name: str, extra: list[str]) -> str:
        stage(name)
        summary = distill.train(_parse(distill, [
            *common, "--name", name, "--student-mag", str(s_mag), "--arch", args.arch,
            "--epochs", str(args.student_epochs), *extra,
        ]))  # fmt: skip
        done(name)
        return summary.best_checkpoint

    models: dict[str, str] = {}
    models["teacher"] = train_teacher("teacher", [])
    models["baseline"] = train_student("baseline", ["--supervised"])
    models["distilled"] = train_student("distilled", ["--teacher", models["teacher"]])

    def cached_targets(name: str, teacher_checkpoint: str) -> str:
        from resdistill.train.targets import write_targets

        stage(name)
        index = write_targets(
            str(dataset), teacher_checkpoint, student_mags=[str(s_mag)], address=args.address
        )
        done(name)
        return index.url

    if args.cached:
        targets = cached_targets("teacher-targets", models["teacher"])
        models["distilled-cached"] = train_student(
            "distilled-cached", ["--teacher", models["teacher"], "--targets", targets]
        )
    if args.label_fraction and args.label_fraction < 1:
        from resdistill.data import read_manifest

        frac = ["--label-fraction", str(args.label_fraction)]
        pct = f"{100 * args.label_fraction:g}pct"
        # As many optimizer steps as the full-label runs (the labelled subset is cycled), so
        # neither the teacher nor the baseline is short of training for having fewer labels.
        splits = read_manifest(str(dataset), columns=["split"]).column("split")
        n_train = splits.to_pylist().count("train")
        steps = ["--steps-per-epoch", str(max(1, n_train // args.batch_size))]
        teacher_pct = models[f"teacher-{pct}"] = train_teacher(f"teacher-{pct}", [*frac, *steps])
        models[f"baseline-{pct}"] = train_student(
            f"baseline-{pct}", ["--supervised", *frac, *steps]
        )
        student = ["--teacher", teacher_pct]
        if args.cached:  # the fast path: this student is distilled from cached targets
            student += ["--targets", cached_targets(f"teacher-targets-{pct}", teacher_pct)]
        models[f"distilled-{pct}"] = train_student(f"distilled-{pct}", student)

    from resdistill.eval.evaluate import evaluate_models
    from resdistill.eval.report_files import format_table

    stage("evaluate")
    report = evaluate_models(
        list(models.values()), str(dataset), "test", out=str(out / "eval"), names=list(models),
        seed=args.seed, num_workers=1,
    )  # fmt: skip
    done("evaluate")
    console.print(format_table(report))
    total = time.monotonic() - started
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    console.print(f"demo finished in {total / 60:.1f} min ({timing}); results in {out / 'eval'}")
    (out / "eval" / "demo.json").write_text(
        json.dumps({"models": models, "timings_s": timings, "total_s": total}, indent=1)
    )
    return 0
