"""What a foundation-model teacher costs per mm^2 of tissue beside low-magnification students.

A frozen foundation model reads tissue at its training magnification (20x, 0.5 um/px) through
inputs of its own edge (224 px: a region of 112 um); a student reads the same region at 5x, 2.5x
or 1.25x, i.e. ``224 * m / 20`` px (56, 28, 14), the tile ``resdistill shard --mags
20,5,2.5,1.25 --tile-px 224`` writes (``--student-tile-px 0,224`` adds students that read
224 px tiles at their magnification, each covering many teacher regions). Per model, with
``mpp = 10 / m`` um/px and an input of ``px`` pixels::

    tiles per mm^2  = 1e6 / (px * mpp)^2
    FLOPs per mm^2  = FLOPs per tile * tiles per mm^2

FLOPs per tile are counted by :func:`resdistill.measures.compute.count_flops` (2 per
multiply-accumulate) on the networks resdistill builds: the teacher is the
``timm:<arch>`` :class:`~resdistill.backbones.timm_net.TimmClassifier` with a linear head (the
input geometry inside its forward), the students ``build_model(arch)``. Weights are random: no
foundation model can be downloaded here, and neither count nor speed depends on the weights.

Speed is measured in this process, same threads, models interleaved: every round times one
teacher batch and about ``--student-seconds`` of each student's batches
(:func:`resdistill.measures.compute.measure_throughput`), after one untimed warm-up round;
tiles/s divided by tiles per mm^2 is mm^2/s. The speed ratio is the median over rounds of
(student mm^2/s / teacher mm^2/s in that round), with its range: the slides/hour ratio of the
networks alone (reading and decoding the slide are not in it). Absolute numbers depend on the
machine and its load, printed with the table; compare ratios.

    python benchmarks/bench_fm_cost.py [--fm uni|uni2-h] [--student-tile-px 0,224] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rows import row as default_row  # noqa: E402

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class Teacher:
    """A foundation model's architecture as its model card gives it (docs/foundation-models.md)."""

    label: str
    arch: str
    args: dict[str, Any]
    mag: float = 20.0
    input_px: int = 224


FMS = {
    "uni": Teacher("UNI (ViT-L/16)", "timm:vit_large_patch16_224",
                   {"img_size": 224, "patch_size": 16, "init_values": 1e-5, **IMAGENET}),
    "uni2-h": Teacher("UNI2-h (ViT-H/14, 8 registers)", "timm:vit_giant_patch14_224",
                      {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                       "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 5.33334,
                       "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
                       "reg_tokens": 8, **IMAGENET}),
}  # fmt: skip


def mpp(mag: float) -> float:
    """Microns per pixel at ``mag`` (the project's convention: 10x is 1 um/px)."""
    from sharding.magnification import MPP_AT_1X

    return MPP_AT_1X / mag


def tiles_per_mm2(px: int, mag: float) -> float:
    """Square tiles of ``px`` pixels at ``mag`` that cover one mm^2: ``1e6 / (px * mpp)^2``."""
    return 1e6 / (px * mpp(mag)) ** 2


def student_px(teacher: Teacher, mag: float, tile_px: int = 0) -> int:
    """A student's tile edge at ``mag``: ``tile_px``, or (0) the teacher's region at ``mag``,
    ``input_px * mag / teacher.mag``, which must be whole."""
    if tile_px:
        return tile_px
    px = teacher.input_px * mag / teacher.mag
    if abs(px - round(px)) > 1e-6 or px < 1:
        raise ValueError(f"{mag:g}x: the teacher's region is {px:g} px there, not a whole tile")
    return int(round(px))


def build_networks(
    teacher: Teacher, student_arch: str, mags: Sequence[float],
    tile_px: Sequence[int] = (0,), num_classes: int = 2,
) -> list[dict[str, Any]]:  # fmt: skip
    """``[{"name", "arch", "mag", "px", "net"}]``: the teacher first, then one student per tile
    edge of ``tile_px`` (:func:`student_px`) and mag (one network object for all students: the
    weights change neither FLOPs nor speed)."""
    from resdistill.backbones import BackboneSpec
    from resdistill.models import build_model

    args = {k: v for k, v in teacher.args.items() if k not in ("mean", "std")}
    spec = BackboneSpec(arch=teacher.arch, args=args, frozen=True, input_px=teacher.input_px,
                        mean=tuple(teacher.args["mean"]), std=tuple(teacher.args["std"]))  # fmt: skip
    out = [{"name": f"teacher {teacher.label}", "arch": teacher.arch, "mag": teacher.mag,
            "px": teacher.input_px, "net": build_model(teacher.arch, num_classes, spec.to_dict())}]  # fmt: skip
    student = build_model(student_arch, num_classes)
    for px in tile_px:
        for m in mags:
            out.append({"name": f"student {student_arch}", "arch": student_arch, "mag": m,
                        "px": student_px(teacher, m, px), "net": student})  # fmt: skip
    return out


def measure(
    nets: list[dict[str, Any]], *, rounds: int, teacher_batch: int, student_batch: int,
    student_seconds: float, log: Callable[[str], None] = print,
) -> None:  # fmt: skip
    """Add ``"rounds"`` (tiles/s of each round) and ``"tiles_per_s"`` (their median) to every
    entry of ``nets``, measuring all models in each round (the teacher first) so that a change
    of the machine's load hits them alike; the first, untimed, round warms them up."""
    from resdistill.measures.compute import measure_throughput

    rates: list[list[float]] = [[] for _ in nets]
    for r in range(rounds + 1):
        for i, n in enumerate(nets):
            teacher = i == 0
            rate = measure_throughput(
                n["net"], (3, n["px"], n["px"]), teacher_batch if teacher else student_batch,
                0.0 if teacher else student_seconds, repeats=1, warmup=0,
            )  # fmt: skip
            if r:
                rates[i].append(rate)
        if r:
            log(f"round {r}/{rounds}: " + ", ".join(f"{rates[i][-1]:.3g}" for i in range(len(nets)))
                + " tiles/s")  # fmt: skip
        else:
            log("warm-up round done")
    for n, rs in zip(nets, rates, strict=True):
        n["rounds"] = rs
        n["tiles_per_s"] = statistics.median(rs)


def cost_table(
    teacher: Teacher, student_arch: str, mags: Sequence[float], *, tile_px: Sequence[int] = (0,),
    rounds: int = 3, teacher_batch: int = 2, student_batch: int = 64,
    student_seconds: float = 1.0, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per model (teacher first): geometry, FLOPs per tile and per mm^2, and with
    ``rounds`` > 0 measured tiles/s, mm^2/s and the speed ratio to the teacher: the median over
    rounds of (this model's mm^2/s / the teacher's in the same round), with its range."""
    from resdistill.measures.compute import count_flops, count_params

    nets = build_networks(teacher, student_arch, mags, tile_px)
    log(f"built {teacher.arch} ({count_params(nets[0]['net']) / 1e6:.0f} M parameters)")
    for n in nets:
        n["flops"] = count_flops(n["net"], (3, n["px"], n["px"]))
    log("FLOPs counted")
    if rounds:
        measure(nets, rounds=rounds, teacher_batch=teacher_batch, student_batch=student_batch,
                student_seconds=student_seconds, log=log)  # fmt: skip
    rows = []
    for n in nets:
        per_mm2 = tiles_per_mm2(n["px"], n["mag"])
        row = {"name": n["name"], "arch": n["arch"], "mag": n["mag"], "mpp": mpp(n["mag"]),
               "px": n["px"], "tile_um": n["px"] * mpp(n["mag"]), "params": count_params(n["net"]),
               "tiles_per_mm2": per_mm2, "flops_per_tile": n["flops"],
               "flops_per_mm2": n["flops"] * per_mm2}  # fmt: skip
        if "tiles_per_s" in n:
            row.update(tiles_per_s=n["tiles_per_s"], rounds=n["rounds"],
                       mm2_per_s=n["tiles_per_s"] / per_mm2)  # fmt: skip
        rows.append(row)
    t = rows[0]
    for r in rows:
        r["flops_ratio"] = t["flops_per_mm2"] / r["flops_per_mm2"]
        if "rounds" in r:
            scale = t["tiles_per_mm2"] / r["tiles_per_mm2"]
            ratios = [a / b * scale for a, b in zip(r["rounds"], t["rounds"], strict=True)]
            r.update(speed_ratio=statistics.median(ratios), speed_range=[min(ratios), max(ratios)])
    return rows


def _g(x: float) -> str:
    """Three significant digits, whole numbers from 100 up: ``0.0685``, ``20.6``, ``1,740``."""
    return f"{x:.3g}" if x < 100 else f"{float(f'{x:.3g}'):,.0f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as the Markdown table of docs/foundation-models.md."""
    measured = "speed_ratio" in rows[0]
    head = ["model", "mag (um/px)", "input px (um)", "tiles per mm^2", "GFLOPs per tile",
            "GFLOPs per mm^2", "FLOPs: teacher / this"]  # fmt: skip
    if measured:
        head.append("measured mm^2/s: this / teacher (range over rounds)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, r in enumerate(rows):
        cells = [r["name"], f"{r['mag']:g}x ({r['mpp']:g})", f"{r['px']} ({r['tile_um']:g})",
                 _g(r["tiles_per_mm2"]), _g(r["flops_per_tile"] / 1e9),
                 _g(r["flops_per_mm2"] / 1e9), f"{_g(r['flops_ratio'])}x"]  # fmt: skip
        if measured:
            lo, hi = r["speed_range"]
            cells.append(f"{_g(r['speed_ratio'])}x ({_g(lo)}-{_g(hi)})" if i else "1x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fm_cost_rows(
    *, row: Callable[..., dict[str, Any]] = default_row, fm: str = "uni", rounds: int = 2,
) -> list[dict[str, Any]]:  # fmt: skip
    """The table as benchmark rows (:func:`bench_rows.row`): per student, the teacher's mm^2/s
    as the baseline, the student's as ours, their ratio; the FLOPs ratio in the note."""
    from resdistill.models import DEFAULT_ARCH

    rows = cost_table(FMS[fm], DEFAULT_ARCH, (5.0, 2.5, 1.25), rounds=rounds, log=lambda _: None)
    t = rows[0]
    return [
        row(
            f"fm cost: {r['name']} {r['mag']:g}x vs {t['name']} {t['mag']:g}x",
            "teacher",
            t["mm2_per_s"],
            "student",
            r["mm2_per_s"],
            "mm^2/s",
            r["speed_ratio"],
            "",
            f"FLOPs per mm^2 {r['flops_ratio']:.0f}x fewer; random weights",
        )  # fmt: skip
        for r in rows[1:]
    ]


def main(argv: list[str] | None = None) -> int:
    import torch

    from resdistill.models import DEFAULT_ARCH

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fm", choices=sorted(FMS), default="uni", help="the teacher's architecture")
    ap.add_argument("--student-arch", default=DEFAULT_ARCH, help="the students' --arch")
    ap.add_argument("--mags", default="5,2.5,1.25", help="comma list of student magnifications")
    ap.add_argument("--student-tile-px", default="0",
                    help="comma list of students' tile edges, 0: the teacher's region at their "
                    "mag (default)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (0: FLOPs only)")
    ap.add_argument("--teacher-batch", type=int, default=2)
    ap.add_argument("--student-batch", type=int, default=64)
    ap.add_argument("--student-seconds", type=float, default=1.0,
                    help="time spent on each student per round")  # fmt: skip
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    mags = [float(m.strip().rstrip("x")) for m in a.mags.split(",") if m.strip()]
    load0 = os.getloadavg()
    tile_px = [int(p) for p in a.student_tile_px.split(",") if p.strip()]
    rows = cost_table(FMS[a.fm], a.student_arch, mags, tile_px=tile_px,
                      rounds=a.rounds, teacher_batch=a.teacher_batch,
                      student_batch=a.student_batch, student_seconds=a.student_seconds,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))  # fmt: skip
    load1 = os.getloadavg()
    header = (f"{FMS[a.fm].label} at random initialisation vs {a.student_arch} students; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads on "
              f"{os.cpu_count()} cores, load average {load0[0]:.1f} -> {load1[0]:.1f}")  # fmt: skip
    if a.rounds:
        header += (f"; batches: teacher {a.teacher_batch}, students {a.student_batch}; "
                   f"median of {a.rounds} interleaved rounds")  # fmt: skip
    print(header + "\n")
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
