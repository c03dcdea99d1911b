"""The options of ``resdistill evaluate``: one typed, validated :class:`EvaluateConfig`.

The CLI is generated from these fields (:mod:`resdistill.commands.evaluate`); a config built in
Python (the demo, the study), a ``--config`` YAML file and the flags give the same object, which
:func:`resdistill.eval.evaluation_run.run_evaluation` runs and writes as ``<out>/config.yaml`` with the
dataset's fingerprint. ``out`` may be None in Python (nothing written); the CLI requires it.
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.cascade.curve import DEFAULT_THRESHOLDS, parse_thresholds
from resdistill.cascade.rules import check_threshold
from resdistill.config import DEVICES, MODEL_FORMS
from resdistill.fields import ConfigError, check, check_choice, opt

__all__ = ["SPLITS", "EvaluateConfig"]

#: ``--split`` choices: the labelled splits of a dataset.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EvaluateConfig:
    """Which models are scored on which split, the bootstrap, the speed measurement, a cascade."""

    checkpoints: tuple[str, ...] = opt(
        help=f"the models, one or more: {MODEL_FORMS}", positional=True,
        required=True, metavar="CKPT")  # fmt: skip
    data: str = opt(help="dataset root: a folder or s3://bucket/prefix", required=True)
    split: str = opt("test", "split to score", choices=SPLITS)
    out: str | None = opt(None, "output folder or s3://bucket/prefix", required=True)
    names: tuple[str, ...] | None = opt(
        None, "comma list of display names, one per CKPT (default: the checkpoint's stage)"
    )
    batch_size: int = opt(64, "inference batch size")
    loader_workers: int = opt(2, "DataLoader processes")
    device: str = opt(
        "auto", "where the models run: auto is cuda when this machine has a GPU", choices=DEVICES
    )
    n_boot: int = opt(1000, "bootstrap resamples")
    alpha: float = opt(0.05, "1 - confidence level")
    seed: int = opt(0, "bootstrap seed")
    bench_batch: int = opt(32, "batch of the images/s measurement")
    bench_seconds: float = opt(2.0, "time spent measuring images/s per model")
    bench_repeats: int = opt(5, "timed rounds of the images/s measurement (median reported)")
    plots: bool = opt(True, "write the PNG plots")
    cascade: str | None = opt(
        None, "also compute each CKPT's cascade with this teacher: accuracy vs compute over "
        "--thresholds (cascade.json, cascade.png)", metavar="TEACHER_CKPT")  # fmt: skip
    thresholds: tuple[float, ...] | None = opt(
        None, "comma list in [0, 1] of escalation thresholds on the student's top probability "
        f"(default: {','.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)}; every tile escalated is "
        "always added)",
        parse=parse_thresholds, metavar="LIST")  # fmt: skip

    def __post_init__(self) -> None:
        check_choice(EvaluateConfig, self, "device")
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        check_choice(EvaluateConfig, self, "split")
        for name in ("batch_size", "bench_batch", "n_boot", "bench_repeats"):
            check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be at least 1")
        check(self.loader_workers >= 0, "--loader-workers", "must be 0 or more")
        check(self.bench_seconds >= 0, "--bench-seconds", "must be 0 or more")
        check(0 < self.alpha < 1, "--alpha", "must be between 0 and 1")
        check(self.names is None or len(self.names) == len(self.checkpoints), "--names",
              f"gives {len(self.names or ())} names for {len(self.checkpoints)} CKPTs")  # fmt: skip
        if self.thresholds is not None:
            check(bool(self.cascade), "--thresholds", "needs --cascade TEACHER_CKPT")
            try:
                values = sorted({check_threshold(t) for t in self.thresholds})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"--thresholds: {exc}") from None
            check(bool(values), "--thresholds", "gives no threshold: use e.g. 0,0.5,0.8,0.9")
            object.__setattr__(self, "thresholds", tuple(values))

    @property
    def grid(self) -> tuple[float, ...]:
        """The cascade's thresholds: ``thresholds``, else the default grid."""
        return DEFAULT_THRESHOLDS if self.thresholds is None else self.thresholds
