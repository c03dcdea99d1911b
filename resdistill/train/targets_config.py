"""The options of ``resdistill teacher-targets``: one typed, validated :class:`TargetsConfig`.

The CLI is generated from these fields (:mod:`resdistill.commands.teacher_targets`); a config
built in Python (the demo, the benchmarks), a ``--config`` YAML file and the flags give the same
object, which :func:`resdistill.train.targets.write_targets` runs and writes as
``<targets root>/config.yaml`` with the dataset's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.fields import check, opt
from resdistill.option_values import MODEL_FORMS

__all__ = ["TargetsConfig"]


@dataclass(frozen=True)
class TargetsConfig:
    """Which teacher is run over which dataset, for which students, and where it is stored."""

    data: str = opt(help="dataset root: a folder or s3://bucket/prefix", required=True)
    teacher: str = opt(help=f"the teacher: {MODEL_FORMS}", required=True)
    out: str | None = opt(None, "targets root (default: <data>/_targets/<teacher sha256[:16]>)")
    splits: tuple[str, ...] | None = opt(None, "comma list of splits (default: every split)")
    student_mags: tuple[str, ...] | None = opt(
        None, "comma list of student magnifications to pool maps for (default: all below the "
        "teacher's)")  # fmt: skip
    teacher_mag: str | None = opt(None, "the teacher's magnification (default: its own)")
    batch_size: int = opt(64, "samples per teacher batch")
    local: bool = opt(False, "run in this process, without Ray")
    address: str | None = opt(None, "Ray cluster address (default: local)")

    def __post_init__(self) -> None:
        for name in ("splits", "student_mags"):  # a YAML list, a Python list: a tuple
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check(self.batch_size >= 1, "--batch-size", "must be at least 1")
