"""All benchmark rows in one run: each row a baseline and ours measured here, now, and their ratio.

    python benchmarks/run_all.py --quick          # ~ a few minutes on 2 cores
    python benchmarks/run_all.py --json out.json  # bigger samples; --only shard,compute,...
    python benchmarks/run_all.py --quick --markdown perf.md   # the README's table

Rows (``--only`` names in brackets):

* [shard] sharding (``bench_shard.shard_rows``): the naive per-tile ``read_region`` loop vs
  ``run_shard`` in one process; and ``run_shard`` vs the codec bound: the time to decode each
  region from the pyramid level ``run_shard`` reads and to encode its output tiles with its own
  encoder, alone (ratio ``codec / ours`` <= 1; 1.0 means sharding costs no more than its
  codecs), with ``run_shard``'s time split by phase in the note.
* [loader] loader samples/s (training mode, augmentation) vs the samples/s training consumes
  (``bench_loader.loader_rate`` / ``train_rates``), at the teacher's tile and the pair.
* [s3] the same loader from an S3 endpoint (a local ``moto_server``) vs the local folder.
* [compute] FLOPs and measured inference images/s of the student at each magnification vs the
  teacher at the highest (:func:`resdistill.measures.compute.compute_table`; paper: 4x/16x/64x FLOPs).
* [train] each stage's training loop (Ray Train, as the CLI runs it) vs a bare loop over
  in-memory tensors with the same model, batch and threads (``bench_train``; target >= 0.8):
  teacher at 10x, student at 2.5x supervised, distilled online and from cached targets; the
  cached vs online distillation epoch (target >= 5x) and the cached vs supervised student epoch
  (target <= 1.15x); Ray Train start-up and shutdown per run, split. The one-off cost of
  computing the cached targets is in the cached row's note.
* [profile] CPU per sample of each phase of a training step (``profile_step``: tar read,
  decode, collation, batch preparation, forward+backward, optimiser), one thread: the data
  path against the model step, for the student's tile, the teacher's and the online pair.
* [predict] whole-slide prediction (:mod:`bench_predict`): the 10x teacher vs students at 5x,
  2.5x and 1.25x with ``--read as-trained`` and ``native``, on the same slides: slides/hour in one
  process split into plan / read / replay / model, and end to end through ``resdistill predict``
  (the Ray Data engine) with ``--heatmap none`` and with the default heatmaps. Target: the 2.5x
  student with native reads at least 10x the teacher's slides/hour.
* [peer] ``resdistill predict`` vs the OpenSlide + DataLoader loop the peers' docs teach, same
  checkpoint and slides: slides/hour and peak memory (:mod:`bench_peer`).
* [remote] ``s3://`` slides by byte ranges vs whole copies on a local S3 endpoint: slides/hour
  and bytes fetched (:mod:`bench_remote`).
* [ddp] the same cached-target distillation epoch on Ray Train with 2 workers vs 1 (same global
  samples per epoch): ratio of train samples/s, plus where the time goes (start-up, train,
  validation+checkpoint).
* [fm] a frozen foundation-model teacher's head epoch on cached embeddings vs running the
  backbone each step (:mod:`bench_fm_head`, a timm ViT at 224 px; target >= 10x).

Every figure depends on the machine and its load: the table header prints the core count and the
load average; compare ratios, not absolute rates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import row, timed  # noqa: E402

if TYPE_CHECKING:
    from resdistill.config import TrainConfig

ROWS = ("shard", "loader", "s3", "compute", "profile", "predict", "peer", "remote", "train", "ddp",
        "fm")  # fmt: skip
MAGS = "10,5,2.5,1.25"
TILE_PX = 224


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def make_slides(work: Path, n: int, size_um: tuple[float, float]) -> Path:
    from sharding.synthetic import write_synthetic_slides

    out = work / "slides"
    write_synthetic_slides(out, n, seed=0, size_um=size_um)
    return out


def make_dataset(slides: Path, out: Path) -> str:
    """The slides sharded at 10x/5x/2.5x/1.25x (224/112/56/28 px), half the slides train, half val."""
    from sharding.pipeline import run_shard
    from sharding.synthetic import LABELS_CSV

    rep = run_shard(
        [slides], str(out), mags=MAGS, tile_px=TILE_PX, labels=slides / LABELS_CSV, workers=0,
        shard_size="1MB", progress=False, splits=(0.5, 0.5, 0.0), overwrite=True,
    )  # fmt: skip
    if not rep.ok:
        raise SystemExit(f"sharding the benchmark dataset failed: {rep}")
    return str(out)


def make_teacher(data: str, folder: Path) -> str:
    """A randomly initialised resnet18 teacher at the highest magnification, in the layout
    ``resdistill teacher`` writes (only speed is measured, not quality)."""
    import torch

    from resdistill import checkpoint as T
    from resdistill.data import DatasetInfo
    from resdistill.models import build_model

    info = DatasetInfo.load(data)
    mag = info.highest
    torch.manual_seed(0)
    net = build_model("resnet18", info.num_classes)
    mean, std = info.mean_std(mag)
    folder.mkdir(parents=True, exist_ok=True)
    card = T.ModelCard(
        stage="teacher", arch="resnet18", classes=tuple(info.classes), mag=mag,
        tile_px=int(info.tile_px[mag]), normalization={"mean": list(mean), "std": list(std)},
        dataset=data,
    )  # fmt: skip
    T.write_checkpoint(
        folder, card=card, state_dict=net.state_dict(), trainer={}, epoch=1, metrics={}
    )
    return str(folder)


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def bench_loader_rows(
    local: str, *, workers: int, batch: int, samples: int, steps: int, with_s3: bool, work: Path
) -> list[dict[str, Any]]:
    from bench_loader import loader_rate, moto_endpoint, train_rates, upload

    from resdistill.data import DatasetInfo

    info = DatasetInfo.load(local)
    high, low = info.magnifications[0], info.magnifications[-1]
    kw = {"workers": workers, "batch": batch, "samples": samples}
    hi_local = loader_rate(local, [high], **kw)
    pair_local = loader_rate(local, [high, low], **kw)
    teach, dist = train_rates(info.tile_px[high], info.tile_px[low], batch=batch, steps=steps)
    rows = [
        row(f"loader {high} vs teacher training", "teacher step", teach, "loader", hi_local,
            "samples/s", hi_local / teach, ">= 10", f"{workers} loader workers"),
        row(f"loader {high}+{low} vs distill training (online)", "distill step", dist, "loader",
            pair_local, "samples/s", pair_local / dist, ">= 10"),
    ]  # fmt: skip
    if with_s3:
        with moto_endpoint(work):
            s3 = "s3://bench/dataset"
            upload(local, s3)
            hi_s3 = loader_rate(s3, [high], **kw)
        rows.append(
            row(
                f"loader {high}: local vs S3 endpoint",
                "s3",
                hi_s3,
                "local",
                hi_local,
                "samples/s",
                hi_local / hi_s3,
                "<= 1.3",
                "moto_server on 127.0.0.1",
            )  # fmt: skip
        )
    return rows


def bench_compute_rows(data: str, *, seconds: float, batch: int) -> list[dict[str, Any]]:
    from resdistill.data import DatasetInfo
    from resdistill.measures.compute import compute_table
    from resdistill.models import build_model

    info = DatasetInfo.load(data)
    models = {m: (build_model("resnet18", 2), (3, info.tile_px[m], info.tile_px[m]))
              for m in info.magnifications}  # fmt: skip
    table = {r["name"]: r for r in compute_table(models, batch=batch, seconds=seconds, repeats=3)}
    t = table[info.highest]
    out = []
    for m in info.magnifications[1:]:
        s = table[m]
        out.append(
            row(
                f"compute: student {m} vs teacher {info.highest} (resnet18)",
                f"teacher {t['gflops']:.2f} GFLOPs",
                t["images_per_s"],
                f"student {s['gflops']:.3f} GFLOPs",
                s["images_per_s"],
                "images/s",
                s["images_per_s"] / t["images_per_s"],
                "",
                f"FLOPs ratio {t['flops'] / s['flops']:.1f}x",
            )  # fmt: skip
        )
    return out


def bench_predict_rows(
    data: str, work: Path, *, n_slides: int, size: tuple[float, float]
) -> list[dict[str, Any]]:
    """The [predict] rows: slides of their own (seed 1, larger than the training slides) read
    with the benchmark dataset's read chain, by random-weight models at every magnification."""
    from bench_predict import engine_rows, make_checkpoints, profile_rows

    from sharding.ray_cluster import ray_init
    from sharding.synthetic import write_synthetic_slides

    slides_dir = work / "slides"
    write_synthetic_slides(slides_dir, n_slides, seed=1, size_um=size)
    slides = sorted(p for p in slides_dir.iterdir() if p.suffix in (".svs", ".tiff"))
    ckpts = make_checkpoints(
        data, work, [m.strip().replace(".", "p") + "x" for m in MAGS.split(",")]
    )
    rows, _ = profile_rows(ckpts, slides, batch=64, row=row)
    ray_init(None, dashboard=False)
    rows += engine_rows(ckpts, slides, work, row=row, pictures=False)
    rows += engine_rows(ckpts, slides, work / "pictures", row=row, pictures=True)
    return rows


def ddp_config(
    data: str, teacher: str, targets: str, work: Path, *, mag: str, batch: int, steps: int,
    workers: int,
) -> TrainConfig:  # fmt: skip
    """The cached-target distillation run of the [ddp] rows with ``workers`` Ray Train workers:
    ``steps // workers`` batches per worker per epoch (the same samples per epoch), two epochs,
    no colour jitter, no teacher score (``tests/test_bench_configs.py`` checks it equals
    ``resdistill distill`` given the same options)."""
    from resdistill.config import (
        STAGE_DISTILL,
        DataConfig,
        ModelConfig,
        OptimConfig,
        RunOptions,
        TeacherRef,
        TrainConfig,
    )

    return TrainConfig(
        STAGE_DISTILL,
        DataConfig(url=data, targets=targets, batch_size=batch, loader_workers=1,
                   steps_per_epoch=max(1, steps // workers), jitter=(0.0, 0.0, 0.0, 0.0),
                   shuffle_buffer=64),
        ModelConfig(mag=mag),
        OptimConfig(epochs=2),
        run=RunOptions(name=f"ddp{workers}", storage=str(work / "runs"), workers=workers),
        teacher=TeacherRef(checkpoint=teacher, evaluate=False),
    )  # fmt: skip


def bench_ddp_rows(
    data: str, teacher: str, targets: Any, work: Path, *, mag: str, batch: int, steps: int
) -> list[dict[str, Any]]:
    """Ray Train cached-target distillation, 1 worker vs 2, the same samples per epoch."""
    from resdistill import checkpoint as T
    from resdistill.train.driver import train

    res = {}
    for workers in (1, 2):
        cfg = ddp_config(data, teacher, targets.url, work, mag=mag, batch=batch, steps=steps,
                         workers=workers)  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            summary, wall = timed(lambda c=cfg: train(c))
        hist = T.load_checkpoint(summary.latest_checkpoint, T.TRAINER_FILE)["state"]["history"]
        epochs_s = sum(h["epoch_s"] for h in hist)
        last = hist[-1]
        train_s = batch * max(1, steps // workers) * workers / last["train_samples_per_s"]
        res[workers] = {
            "rate": last["train_samples_per_s"], "wall": wall, "startup": wall - epochs_s,
            "train": train_s, "val_ckpt": last["epoch_s"] - train_s,
        }  # fmt: skip
    one, two = res[1], res[2]
    note = "; ".join(
        f"{w}w: start-up {r['startup']:.1f}s, train {r['train']:.1f}s, val+ckpt {r['val_ckpt']:.1f}s"
        for w, r in res.items()
    )
    return [
        row(
            f"DDP distill at {mag} (cached): 2 workers vs 1",
            "1 worker",
            one["rate"],
            "2 workers",
            two["rate"],
            "train samples/s",
            two["rate"] / one["rate"],
            "-> 2 (1 core each)",
            note,
        )  # fmt: skip
    ]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header)
    for col, just in (("row", "left"), ("baseline", "right"), ("ours", "right"),
                      ("ratio", "right"), ("target", "left"), ("note", "left")):  # fmt: skip
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r["row"],
            f"{r['baseline_value']:,.1f} {r['unit']}\n({r['baseline']})",
            f"{r['ours_value']:,.1f} {r['unit']}\n({r['ours']})",
            f"{r['ratio']:.2f}x",
            r["target"],
            r["note"],
        )
    Console(width=160).print(table)


def markdown_table(rows: list[dict[str, Any]], header: str) -> str:
    """The rows as a Markdown table (what the README's performance section shows)."""
    lines = [f"*{header}*", "", "| row | baseline | ours | ratio | target | note |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['baseline_value']:,.1f} {r['unit']} ({r['baseline']}) | "
            f"{r['ours_value']:,.1f} {r['unit']} ({r['ours']}) | {r['ratio']:.2f}x | "
            f"{r['target']} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smallest sizes (a few minutes, 2 cores)")
    ap.add_argument("--only", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--markdown", help="also write the table here as Markdown (for the README)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - set(ROWS)
    if bad:
        ap.error(f"unknown row(s) {sorted(bad)}: choose from {', '.join(ROWS)}")
    q = args.quick
    size = (1600.0, 1280.0) if q else (3000.0, 2400.0)
    n_slides = 4
    batch = 16 if q else 32
    cores = os.cpu_count() or 1

    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rdbench-") as tmp:
        work = Path(args.work or tmp)
        slides, timings["slides_s"] = timed(lambda: make_slides(work, n_slides, size))
        data, timings["dataset_s"] = timed(lambda: make_dataset(slides, work / "dataset"))
        teacher = make_teacher(data, work / "teacher" / "checkpoint_epoch0001")
        print(f"dataset: {data} ({n_slides} synthetic slides, {MAGS} at {TILE_PX} px)", flush=True)

        def section(name: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
            if name not in only:
                return
            out, timings[f"{name}_s"] = timed(fn)
            rows.extend(out)
            print(f"[{name}] done in {timings[f'{name}_s']:.1f}s", flush=True)

        section("shard", lambda: __import__("bench_shard").shard_rows(
            slides, work / "shard", mags=MAGS, tile_px=TILE_PX, row=row))  # fmt: skip
        section("loader", lambda: bench_loader_rows(
            data, workers=cores, batch=batch, samples=96 if q else 600, steps=2 if q else 3,
            with_s3="s3" in only, work=work))  # fmt: skip
        if "s3" in only and "loader" not in only:
            section("s3", lambda: bench_loader_rows(
                data, workers=cores, batch=batch, samples=96, steps=1, with_s3=True,
                work=work)[2:])  # fmt: skip
        section("compute", lambda: bench_compute_rows(data, seconds=1.0 if q else 3.0, batch=batch))
        section("profile", lambda: __import__("profile_step").profile_rows(
            data, row=row, student_mag="2.5x", batch=64, samples=256 if q else 1024))  # fmt: skip
        section("predict", lambda: bench_predict_rows(
            data, work / "predict", n_slides=6 if q else 12,
            size=(3000.0, 2400.0) if q else (5000.0, 4000.0)))  # fmt: skip
        section("peer", lambda: __import__("bench_peer").run_all_rows(
            work / "peer", quick=q, row=row))  # fmt: skip
        section("remote", lambda: __import__("bench_remote").run_all_rows(
            work / "remote", quick=q, row=row))  # fmt: skip
        targets: list[Any] = []

        def cached_targets() -> Any:
            if not targets:
                from resdistill.train.targets import write_targets
                from resdistill.train.targets_config import TargetsConfig

                out, secs = timed(lambda: write_targets(TargetsConfig(
                    data=data, teacher=teacher, out=str(work / "targets"),
                    splits=("train", "val"), local=True)))  # fmt: skip
                targets.append(out)
                timings["targets_s"] = secs
            return targets[0]

        def train_rows() -> list[dict[str, Any]]:
            from bench_train import train_rows as rows_of

            tg = cached_targets()
            out = rows_of(data, teacher, tg.url, work / "train", row=row, student_mag="2.5x",
                          batch=64, steps=32, teacher_steps=8 if q else 32, cpus=cores,
                          log=lambda m: print(m, flush=True))  # fmt: skip
            note = f"; targets once: {tg.doc['samples']} samples in {timings['targets_s']:.1f}s"
            for r in out:
                if r["row"].startswith("distill epoch"):
                    r["note"] += note
            return out

        section("train", train_rows)
        section("fm", lambda: __import__("bench_fm_head").fm_head_rows(data, row=row, quick=q))
        if "ddp" in only:
            section("ddp", lambda: bench_ddp_rows(
                data, teacher, cached_targets(), work, mag="2p5x", batch=64,
                steps=16 if q else 32))  # fmt: skip
        if {"predict", "train", "ddp"} & only:
            import ray

            ray.shutdown()  # only this driver's local cluster; never `ray stop`
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    header = (
        f"resdistill benchmarks ({'quick' if q else 'full'}): {cores} cores, load average {load}"
    )
    print_table(rows, header)
    if args.json:
        doc = {"rows": rows, "cores": cores, "loadavg": os.getloadavg(), "quick": q,
               "timings_s": timings, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1))
    text = markdown_table(rows, header)
    if {"shard", "profile", "predict", "train"} <= only:
        from scale_model import Assumptions, markdown, model

        scale = markdown(model(rows, Assumptions(), cores), Assumptions())
        print(scale)
        text += "\n" + scale
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
