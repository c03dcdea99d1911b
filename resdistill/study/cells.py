"""One cell of the study -> its planned :class:`~resdistill.config.TrainConfig`, built by the
``teacher`` and ``distill`` commands' own parsers and builders (so a cell is exactly the run
those commands would make from the same options, their checks included).

Every student cell of a magnification takes the same number of optimiser steps per epoch, that
of reading every training sample once (``train`` and ``unlabeled``): a smaller label fraction or
unlabelled share cycles fewer slides for as long, so only the data differs between cells, not the
compute. Teachers take ``train``'s steps whatever their label fraction (as the demo does).
Options in ``teacher_args`` / ``student_args`` (the commands' own) come last and win.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from resdistill.config import TrainConfig
from resdistill.study.grid import KIND_BASELINE, KIND_TEACHER, Cell


@dataclass(frozen=True)
class CellOptions:
    """What every cell shares: the dataset, the run storage, the network and its schedule."""

    data: str
    storage: str
    arch: str
    batch_size: int
    epochs: int
    student_epochs: int
    cpus_per_worker: float
    loader_workers: int
    teacher_steps: int
    student_steps: int
    teacher_args: str = ""
    student_args: str = ""


def _parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"study cell ({module.__name__})")  # type: ignore[attr-defined]
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def cell_config(
    cell: Cell, opts: CellOptions, experiment: str, teacher_checkpoint: str | None = None
) -> TrainConfig:
    """The planned config of ``cell`` (:func:`resdistill.train.preflight.prepare`); distilled cells
    need their teacher's checkpoint. Raises the commands' :class:`UsageError` on bad options."""
    from resdistill.commands import distill, teacher
    from resdistill.train.preflight import prepare

    common = ["--data", opts.data, "--storage", opts.storage, "--name", f"{experiment}-{cell.id}",
              "--arch", opts.arch, "--batch-size", str(opts.batch_size), "--workers", "1",
              "--cpus-per-worker", f"{opts.cpus_per_worker:g}", "--loader-workers",
              str(opts.loader_workers), "--seed", str(cell.seed)]  # fmt: skip
    fraction = ["--label-fraction", f"{cell.label_fraction:g}"]
    if cell.kind == KIND_TEACHER:
        argv = [*common, "--mag", cell.mag, "--epochs", str(opts.epochs), *fraction,
                "--steps-per-epoch", str(opts.teacher_steps), *shlex.split(opts.teacher_args)]  # fmt: skip
        return prepare(teacher.build_config(_parse(teacher, argv)))
    student = [*common, "--student-mag", cell.mag, "--epochs", str(opts.student_epochs),
               "--steps-per-epoch", str(opts.student_steps)]  # fmt: skip
    extra = shlex.split(opts.student_args)
    if cell.kind == KIND_BASELINE:
        return prepare(
            distill.build_config(_parse(distill, [*student, "--supervised", *fraction, *extra]))
        )
    if teacher_checkpoint is None:
        raise ValueError(f"{cell.id}: a distilled cell needs its teacher's checkpoint")
    share = 1.0 if cell.unlabelled_share is None else cell.unlabelled_share
    if share < 1:  # the teacher's labelled slides stay; a share of the others is added
        student += [*fraction, "--unlabelled-share", f"{share:g}"]
    argv = [*student, "--teacher", teacher_checkpoint, "--no-teacher-eval", *extra]
    return prepare(distill.build_config(_parse(distill, argv)))


def split_samples(data: str, splits: tuple[str, ...], labelled_only: bool = False) -> int:
    """Samples of ``splits`` in the dataset's manifest (labelled ones only if asked)."""
    from resdistill.data import read_manifest

    cols = read_manifest(data, columns=["split", "label"]).to_pydict()
    return sum(
        1
        for split, label in zip(cols["split"], cols["label"], strict=True)
        if split in splits and not (labelled_only and label is None)
    )
