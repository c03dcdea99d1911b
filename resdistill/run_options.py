"""The sections of a :class:`~resdistill.config.TrainConfig` that say how a run executes rather
than what it learns: :class:`SpeedConfig` (how a worker runs the model) and :class:`RunOptions`
(where the Ray Train run lives, its workers, which checkpoint it keeps, what it reports).

Declared here to keep :mod:`resdistill.config` small; import them from there, the one place
every config is imported from.
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.fields import check, check_choice, opt
from resdistill.option_values import (
    AMP_MODES,
    DEFAULT_METRIC,
    DEVICES,
    TRACKING_HELP,
    TRACKING_KINDS,
    tracking_ok,
)


@dataclass(frozen=True)
class SpeedConfig:
    """How the worker runs the model; none of it changes what is learnt."""

    amp: str = opt("auto", "bf16 autocast: auto (on GPU only), bf16 (also on CPU), off",
                   choices=AMP_MODES)  # fmt: skip
    channels_last: bool = opt(False, "NHWC weights and inputs (GPUs, oneDNN)")
    compile: str = opt("", "torch.compile the model (inductor unless a backend is named; "
                       "default: off)", const="inductor", metavar="BACKEND")  # fmt: skip

    def __post_init__(self) -> None:
        check_choice(SpeedConfig, self, "amp")


#: ``--select``: how a run picks its checkpoint (resolved by :mod:`resdistill.train.selection`)
SELECT_RULES = ("auto", "metric", "distill-loss", "last")


@dataclass(frozen=True)
class RunOptions:
    """Where and how the Ray Train run executes."""

    name: str = opt("", "run name; rerun with the same name to resume (default: a new one)")
    storage: str = opt("runs", "run storage: a folder or s3://bucket/prefix; the run lives in "
                       "<storage>/<name>")  # fmt: skip
    workers: int = opt(2, "Ray Train workers (DDP ranks)")
    cpus_per_worker: float = opt(1.0, "Ray CPUs per worker")
    device: str = opt(
        "auto",
        "where the workers run: cuda is one GPU per worker, NCCL and bf16 "
        "autocast; auto is cuda when the Ray cluster has GPUs",
        choices=DEVICES,
    )
    max_failures: int = opt(2, "worker failures to recover from")
    keep: int = opt(1, "best checkpoints kept (plus the latest)")
    address: str | None = opt(None, "Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    select: str = opt(
        "auto", "how the kept checkpoint is chosen: metric (--metric on the labelled "
        "--val-split; its slides count in the label budget), distill-loss (distillation: the "
        "KD + feature loss against the teacher on --val-split's images, labels unread), last "
        "(the last epoch), auto (distill-loss when distilling, else metric)",
        choices=SELECT_RULES)  # fmt: skip
    metric: str = opt(DEFAULT_METRIC, "validation metric that picks the checkpoint under "
                      "--select metric")  # fmt: skip
    mode: str = opt("max", "whether --metric is better high or low", choices=("max", "min"))
    log_every: int = opt(0, "print every N steps (0: once per epoch)")
    trace_dir: str | None = opt(None, "local folder for a JSON-lines trace of worker starts and "
                                "epochs (debugging)")  # fmt: skip
    summary_json: str | None = opt(
        None, "also write the final summary to this JSON file (a local path or s3://)"
    )
    resume_from: str | None = opt(
        None, "continue from this checkpoint folder, taking its weights, optimiser state and "
        "epoch count under this run's options, even where its dataset or settings differ (a "
        "rerun of --name refuses its own checkpoint when they differ, unless named here)")  # fmt: skip
    tracking: str = opt("tensorboard", TRACKING_HELP, metavar="KIND[:TARGET]")

    def __post_init__(self) -> None:
        check(tracking_ok(self.tracking), "--tracking", f"must be one of "
              f"{', '.join(TRACKING_KINDS)} (with :TARGET), got {self.tracking!r}")  # fmt: skip
        check(self.workers >= 1, "--workers", "must be at least 1")
        check(self.cpus_per_worker > 0, "--cpus-per-worker", "must be positive")
        check(self.max_failures >= 0, "--max-failures", "must be 0 or more")
        check(self.keep >= 1, "--keep", "must be at least 1")
        check_choice(RunOptions, self, "mode")
        check_choice(RunOptions, self, "select")
        check_choice(RunOptions, self, "device")
