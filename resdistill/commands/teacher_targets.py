"""``resdistill teacher-targets``: run the frozen teacher once and cache its targets."""

from __future__ import annotations

import sys

from resdistill.commands.generate import CommandSpec
from resdistill.train.targets_config import TargetsConfig

SPEC = CommandSpec(
    name="teacher-targets",
    config=TargetsConfig,
    summary="run the frozen teacher once and cache its targets for distillation",
    description="""\
Reads every sample of the chosen splits at the teacher's magnification, un-augmented, and stores
per sample the teacher's logits and, for every student magnification, its last feature map
max-pooled to the student's feature size (float16, one .npz per shard). Distillation with
--targets then reads only the student tile and pays for the student alone; it refuses targets of
another teacher or of a re-sharded dataset.

The targets root holds targets.json (teacher and dataset identity, written last, so a killed run
leaves no usable half-written set), <split>/shard-NNNNNN.npz and config.yaml (the resolved
options and the dataset's fingerprint; --config on it repeats the run). One Ray task per shard,
or in this process with --local.

exit codes: 0 done; 2 unusable input (dataset, teacher, splits or magnifications).""",
    examples=(
        "resdistill teacher-targets --data s3://bucket/ds --teacher s3://bucket/runs/t1/ckpt",
        "resdistill teacher-targets --data ds/ --teacher runs/t1 --local",
        "resdistill teacher-targets --config ds/_targets/TEACHER_SHA/config.yaml --splits train",
    ),
)


def run(cfg: TargetsConfig) -> int:
    """Compute the targets; print where they are. 0 ok, 2 unusable input."""
    from resdistill.errors import UsageError
    from resdistill.train.targets import write_targets
    from sharding.magnification import display_mag

    try:
        index = write_targets(cfg, log=print)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"teacher-targets: error: {exc}", file=sys.stderr)
        return 2
    d = index.doc
    maps = ", ".join(display_mag(m) for m in d["sizes"])
    print(
        f"{d['samples']} samples in {len(d['shards'])} shards, teacher {d['teacher']['arch']} at "
        f"{display_mag(d['teacher_mag'])}, maps for {maps}, {d['seconds']:.1f} s -> {index.url}"
    )
    print(f"distill with: --teacher {d['teacher']['checkpoint']} --targets {index.url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.teacher_targets``; returns the exit status."""
    from resdistill.commands.generate import main as generated_main

    return generated_main(SPEC, run, argv, prog="python -m resdistill.teacher_targets")
