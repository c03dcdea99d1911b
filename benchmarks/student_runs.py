"""One student checkpoint on linked synthetic slides, and ``resdistill predict`` runs of it: the
set-up, options and metered runs that the single-checkpoint benchmarks (:mod:`bench_peer`,
:mod:`bench_remote`) share.

The slides are 40x synthetic SVS/TIFF, two rendered and hard-linked under the other names
(:func:`bench_predict_scale.linked_slides`); the student has random weights (only speed is
measured) and the read chain of :func:`bench_predict_scale.chain_dataset`.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    import argparse


def student_parser(doc: str, slides: int) -> argparse.ArgumentParser:
    """A script's options: ``--work`` (kept between runs), ``--slides`` (default ``slides``),
    ``--mag`` (the student's, default 2p5x) and ``--size-um`` (slide width,height in microns,
    default 8000,6000; parsed to a pair of floats). ``doc`` is the description ``--help`` prints
    as written."""
    import argparse

    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--work", required=True)
    ap.add_argument("--slides", type=int, default=slides)
    ap.add_argument("--mag", default="2p5x")
    ap.add_argument("--size-um", default="8000,6000",
                    type=lambda text: tuple(float(v) for v in text.split(",")))  # fmt: skip
    return ap


def student_on_slides(
    work: Path, n: int, size_um: tuple[float, float], mag: str = "2p5x"
) -> tuple[str, list[Path]]:
    """``(checkpoint, slides)``: the ``mag`` student (after its 10x teacher) and ``n`` linked
    40x slides of ``size_um``, all kept in ``work`` between runs."""
    from bench_predict import make_checkpoints
    from bench_predict_scale import chain_dataset, linked_slides

    slides = linked_slides(work, n, 2, size_um, 40.0)
    ckpt = make_checkpoints(chain_dataset(work / "dataset"), work, ["10x", mag])[mag]
    return ckpt, slides


def run_all_student(work: Path, *, quick: bool) -> tuple[str, list[Path]]:
    """:func:`student_on_slides` of ``run_all.py``'s sections: the 2.5x student on 4 (quick: 2)
    slides of 8 x 6 mm (quick: 4 x 3 mm)."""
    size = (4000.0, 3000.0) if quick else (8000.0, 6000.0)
    return student_on_slides(work, 2 if quick else 4, size)


def warm_up(ckpt: str, slides: Sequence[Path | str], out: Path) -> None:
    """The first slide through ``predict --read native`` into ``out`` (emptied first), so that
    the timed runs after it do not pay Ray Data's first dataset and the workers' imports."""
    from bench_predict import engine_run

    shutil.rmtree(out, ignore_errors=True)
    engine_run(ckpt, list(slides[:1]), out, "--read", "native")  # type: ignore[arg-type]


def metered_run(ckpt: str, slides: Sequence[Path | str], out: Path, *extra: str) -> dict[str, Any]:
    """:func:`bench_predict.engine_run` into ``out``, emptied first (a rerun would skip the
    slides done there), under :class:`bench_predict_scale.CpuMeter`: its result plus ``cpu_s``,
    the CPU seconds of this process and its descendants meanwhile."""
    from bench_predict import engine_run
    from bench_predict_scale import CpuMeter

    shutil.rmtree(out, ignore_errors=True)
    with CpuMeter() as cpu:
        got = engine_run(ckpt, list(slides), out, *extra)  # type: ignore[arg-type]
    return {**got, "cpu_s": cpu.cpu_s}


def print_rows(rows: list[dict[str, Any]]) -> None:
    """One line a row: its name, ratio and note."""
    for r in rows:
        print(f"{r['row']}: {r['ratio']:.2f}x; {r['note']}")
