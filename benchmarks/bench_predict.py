"""Prediction speed per slide: the teacher vs students at lower magnifications, with each read mode.

:func:`profile_rows` predicts the same slides, one after another in this process, with a model per
magnification (random weights: only speed is measured) and splits each slide's time into

* ``plan``: open the slide, detect tissue, lay the region grid (:func:`resdistill.read_chain.plan_tiles`);
* ``read``: the pyramid reads alone (``read_region`` at the level the read mode uses, which
  includes OpenSlide's decode of the slide's own JPEG tiles);
* ``replay``: the rest of :func:`resdistill.read_chain.read_tiles` (reduction to the model's
  size and, for an encoded read chain, the dataset's JPEG encode and the loader's decode);
* ``model``: the forward pass and softmax of every tile, in batches.

``slides/hour = 3600 * slides / (plan + read + replay + model)``. The end-to-end figure of the
Ray Data pipeline (``resdistill predict``) is measured by :func:`engine_rows`, and at cohort
scale by :mod:`bench_predict_scale`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_checkpoints(data: str, work: Path, mags: list[str]) -> dict[str, str]:
    """A randomly initialised resnet18 checkpoint per magnification of ``mags`` (``2p5x`` form),
    each with the dataset's read chain, as training writes them. ``{mag: folder}``."""
    import torch

    from resdistill import checkpoint as T
    from resdistill.models import build_model

    desc = json.loads((Path(data) / "dataset.json").read_text())
    classes = list(desc["classes"])
    out: dict[str, str] = {}
    for i, mag in enumerate(mags):
        torch.manual_seed(i)
        net = build_model("resnet18", len(classes))
        folder = work / f"model-{mag}" / "checkpoint_epoch0001"
        folder.mkdir(parents=True, exist_ok=True)
        norm = desc["normalization"][mag]
        card = T.ModelCard(
            stage="teacher" if i == 0 else "student", arch="resnet18", classes=tuple(classes),
            mag=mag, tile_px=int(desc["tile_px"][mag]),
            normalization={"mean": norm["mean"], "std": norm["std"]}, dataset=data,
            read_chain=T.read_chain(desc),
        )  # fmt: skip
        T.write_checkpoint(
            folder, card=card, state_dict=net.state_dict(), trainer={}, epoch=1, metrics={}
        )
        out[mag] = str(folder)
    return out


def profile_one(ckpt: str, slides: list[Path], read: str, batch: int) -> dict[str, Any]:
    """Seconds per phase (module docstring) of predicting ``slides`` with ``ckpt`` and ``read``,
    and the tile probabilities per slide (``probs``: ``{slide stem: (tiles, K)}``)."""
    import torch

    from resdistill.checkpoint import load_model, normalization_of
    from resdistill.read_chain import chain_of, plan_tiles, read_tiles
    from sharding.slide import open_slide, read_region_at

    model = load_model(ckpt)
    chain = chain_of(model, read=read)
    mean, std = normalization_of(model)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    top_px = chain.opts.sizes[chain.opts.mags[0].name]
    direct = read == "native" or chain.mag == chain.opts.mags[0].name
    read_px = chain.tile_px if direct else top_px
    t = {"plan": 0.0, "read": 0.0, "replay": 0.0, "model": 0.0}
    tiles = 0
    probs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        model.model(torch.zeros(batch, 3, chain.tile_px, chain.tile_px))  # warm-up, not timed
        for path in slides:
            t0 = time.perf_counter()
            slide = open_slide(str(path))
            plan = plan_tiles(slide, str(path), chain)
            t["plan"] += time.perf_counter() - t0
            cells = np.flatnonzero(plan.keep)
            tiles += int(cells.size)
            out = []
            for start in range(0, cells.size, batch):
                part = cells[start : start + batch]
                t0 = time.perf_counter()
                for i in part:  # the pyramid reads alone
                    read_region_at(slide, plan.info, int(plan.xs[i]), int(plan.ys[i]),
                                   plan.size0, read_px)  # fmt: skip
                t_read = time.perf_counter() - t0
                t0 = time.perf_counter()
                x = read_tiles(slide, plan, chain, part)
                t_all = time.perf_counter() - t0
                t["read"] += t_read
                t["replay"] += max(0.0, t_all - t_read)
                t0 = time.perf_counter()
                xb = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - m) / s
                logits, _ = model.model(xb)
                out.append(torch.softmax(logits, dim=1).numpy())
                t["model"] += time.perf_counter() - t0
            slide.close()
            probs[path.stem] = np.concatenate(out)
    total = sum(t.values())
    return {"mag": model.mag, "read": read, "slides": len(slides), "tiles": tiles,
            "seconds": t, "total_s": total, "slides_per_hour": 3600.0 * len(slides) / total,
            "classes": model.classes, "probs": probs}  # fmt: skip


def profile_rows(
    ckpts: dict[str, str], slides: list[Path], *, batch: int, row: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows: each student and read mode vs the teacher (as-trained), slides/hour, in one process;
    and the raw profiles."""

    mags = list(ckpts)
    teacher = profile_one(ckpts[mags[0]], slides, "as-trained", batch)
    profiles = [teacher]

    def measure(mag: str, read: str) -> tuple[dict[str, Any], str]:
        p = profile_one(ckpts[mag], slides, read, batch)
        profiles.append(p)
        share = " ".join(f"{k} {v / p['total_s']:.0%}" for k, v in p["seconds"].items())
        return p, f"{p['tiles']} tiles; {share}"

    rows = rows_vs_teacher("1 process", mags, teacher, measure, row)
    return rows, profiles


def rows_vs_teacher(
    how: str, mags: list[str], teacher: dict[str, Any], measure: Any, row: Any
) -> list[dict[str, Any]]:
    """One row per student magnification (``mags[1:]``) and read mode: ``measure(mag, read)``
    gives ``({"slides_per_hour": ...}, note)``, compared with ``teacher``'s slides/hour."""
    from sharding.magnification import display_mag

    rows = []
    for mag in mags[1:]:
        for read in ("as-trained", "native"):
            got, note = measure(mag, read)
            rows.append(
                row(
                    f"predict ({how}): student {display_mag(mag)} {read} vs teacher "
                    f"{display_mag(mags[0])}",
                    "teacher",
                    teacher["slides_per_hour"],
                    f"student {read}",
                    got["slides_per_hour"],
                    "slides/h",
                    got["slides_per_hour"] / teacher["slides_per_hour"],
                    ">= 10x (2.5x native)" if mag == "2p5x" and read == "native" else "",
                    note,
                )  # fmt: skip
            )
    return rows


def engine_run(ckpt: str, slides: list[Path], out: Path, *extra: str) -> dict[str, Any]:
    """``resdistill predict`` (the Ray Data engine) on ``slides`` in this process, on the Ray
    session already started; wall seconds and the slides.parquet rows."""
    import pyarrow.parquet as pq

    from resdistill.commands import predict as predict_cmd
    from resdistill.commands.generate import parse
    from resdistill.predict.driver import predict_command

    cfg = parse(predict_cmd.SPEC, [ckpt, *map(str, slides), "--out", str(out), *extra])
    t0 = time.perf_counter()
    rc = predict_command(cfg)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"predict {ckpt} failed (exit {rc})")
    table = pq.read_table(out / "slides.parquet").to_pylist()
    return {"wall_s": wall, "slides": len(table), "tiles": sum(r["tiles"] for r in table),
            "slides_per_hour": 3600.0 * len(table) / wall}  # fmt: skip


def engine_rows(
    ckpts: dict[str, str], slides: list[Path], work: Path, *, row: Any, pictures: bool
) -> list[dict[str, Any]]:
    """End-to-end ``resdistill predict`` runs (plan, read, decode, infer, aggregate, write) of the
    teacher and each student and read mode on the same slides; slides/hour ratios against the
    teacher. ``pictures=False`` passes ``--heatmap none`` (tables only)."""

    extra = () if pictures else ("--heatmap", "none")
    mags = list(ckpts)
    what = "with heatmaps" if pictures else "--heatmap none"
    n = 0

    def run(mag: str, read: str) -> dict[str, Any]:
        nonlocal n
        n += 1
        return engine_run(ckpts[mag], slides, work / f"predict-{n}", "--read", read, *extra)

    run(mags[-1], "native")  # warm-up: Ray Data's first dataset and the workers' imports
    teacher = run(mags[0], "as-trained")

    def measure(mag: str, read: str) -> tuple[dict[str, Any], str]:
        r = run(mag, read)
        return r, (
            f"{r['slides']} slides, {r['tiles']} tiles; teacher {teacher['wall_s']:.1f}s, "
            f"student {r['wall_s']:.1f}s"
        )

    rows = rows_vs_teacher(f"Ray Data, {what}", mags, teacher, measure, row)
    return rows
