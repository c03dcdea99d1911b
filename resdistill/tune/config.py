"""Typed options of a tuning run: the fixed part of every trial (a :class:`TrainConfig`) and how
the trials are searched, scheduled and sized.

    TuneConfig(train: TrainConfig, mag, space, space_file, default_space, scheduler, ...)

``train.stage`` is the trials' stage: ``distill``, ``supervised`` (the low-magnification
baseline) or ``teacher``; the stage's presets (training splits, colour jitter) fill the fields
left None, as for ``resdistill teacher`` / ``distill``. Trials are ranked by the rule their own
stage keeps its checkpoint by (``train.run.select``, :mod:`resdistill.train.selection`):
distillation trials by ``val_distill_loss`` with no label read unless ``--select metric`` says
otherwise, so a search over label-free students stays label-free; ``train.run.metric`` /
``mode`` rank only under that rule. :meth:`TuneConfig.trial_config` is the (unplanned) config
every trial starts from. Imports nothing heavy: ``resdistill --help`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from resdistill.config import DEFAULT_METRIC, STAGE_TEACHER, TrainConfig
from resdistill.fields import check, check_choice, opt
from resdistill.train.selection import RULE_METRIC, resolve_rule

SCHEDULERS = ("asha", "pbt", "fifo")


@dataclass(frozen=True)
class TuneConfig:
    """One tuning run; validated on construction (messages name the flag)."""

    train: TrainConfig = opt()
    mag: str = opt("", "teacher mode: the teacher's magnification (default: the dataset's "
                   "highest); a student's is --student-mag")  # fmt: skip
    space: tuple[str, ...] = opt(
        (), "search space entries NAME=DOMAIN[,NAME=DOMAIN...], e.g. "
        "lr=loguniform:1e-4:1e-2,batch_size=choice:16,32 (repeatable)", repeat=True,
        metavar="NAME=DOMAIN")  # fmt: skip
    space_file: str | None = opt(None, "JSON or YAML {name: domain} read before --space")
    default_space: bool = opt(True, "start from the stage's default space (--no-default-space: "
                              "tune only what --space/--space-file say)")  # fmt: skip
    scheduler: str = opt("asha", "asha (successive halving), pbt (population based training) or "
                         "fifo (every trial to --epochs)", choices=SCHEDULERS)  # fmt: skip
    num_samples: int = opt(8, "trials (per grid point)")
    grace_period: int = opt(1, "asha: epochs before a stop")
    reduction_factor: float = opt(2.0, "asha: keep the top 1/this at each rung")
    perturbation_interval: int = opt(1, "pbt: epochs between exploits")
    pbt_quantile: float = opt(0.25, "pbt: bottom/top share exploited/copied")
    pbt_synch: bool = opt(False, "pbt: rank and exploit only when every trial has reached the "
                          "interval")  # fmt: skip
    trial_cpus: float = opt(1.0, "CPUs of each trial's own actor (it only waits and forwards)")
    max_concurrent: int | None = opt(
        None, "trials running at once (default: what the cluster's CPUs/GPUs hold now)"
    )
    time_budget_s: float | None = opt(None, "stop tuning after this many seconds")
    trial_retries: int = opt(0, "restarts of a failed trial on top of --max-failures (a worker "
                             "failure restarts its trial from the trial's latest checkpoint)")  # fmt: skip
    keep_trial_checkpoints: int | None = opt(
        None, "Tune checkpoints kept per trial (default 2; with pbt 2 x interval + 2, so a "
        "donor's checkpoint outlives the exploit)")  # fmt: skip
    resume: bool = opt(False, "continue the interrupted run --name (Tuner.restore). Tune "
                       "unpickles the run folder's state: whoever can write there could run code "
                       "here, so a file this user's runs did not write is refused")  # fmt: skip
    trust_resume: bool = opt(False, "with --resume: skip that check (a run started on another "
                             "machine or before seals; only a folder you trust)")  # fmt: skip
    best_json: str | None = opt(None, "write the best checkpoint and config here (local or s3://)")
    tune_seed: int | None = opt(None, "seed of the search's sampling (default: unseeded)")
    verbose: int = opt(1, "Tune's own output", choices=(0, 1, 2))

    def __post_init__(self) -> None:
        teacher = self.train.stage == STAGE_TEACHER
        check(teacher or bool(self.train.model.mag), "--student-mag",
              "is required (the trials' default; --space student_mag=... tunes it)")  # fmt: skip
        check(teacher or not self.mag, "--mag",
              "is the teacher's magnification (with --teacher-mode); use --student-mag")  # fmt: skip
        check(not teacher or not self.train.model.mag, "--student-mag",
              "is a student's magnification; with --teacher-mode use --mag")  # fmt: skip
        for name in ("num_samples", "grace_period", "perturbation_interval"):
            check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be at least 1")
        check(self.reduction_factor > 1, "--reduction-factor", "must be above 1")
        check(0 < self.pbt_quantile <= 0.5, "--pbt-quantile", "must be in (0, 0.5]")
        check(self.trial_cpus > 0, "--trial-cpus", "must be above 0 (e.g. 0.1)")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "--max-concurrent",
              "must be at least 1")  # fmt: skip
        check(self.trial_retries >= 0, "--trial-retries", "must be 0 or more")
        check(self.time_budget_s is None or self.time_budget_s > 0, "--time-budget-s",
              "must be positive")  # fmt: skip
        check(not self.resume or bool(self.train.run.name), "--resume",
              "needs the --name of the run to continue")  # fmt: skip
        check(self.resume or not self.trust_resume, "--trust-resume", "only applies with --resume")
        rule = resolve_rule(self.train)
        check(rule != "last", "--select", "last ranks no trials (they all end at the same epoch): "
              "tune with distill-loss (label-free) or metric")  # fmt: skip
        run = self.train.run
        check(rule == "metric" or (run.metric, run.mode) == (DEFAULT_METRIC, "max"), "--metric",
              f"(and --mode) rank trials only with --select metric; {self.stage} trials rank by "
              f"{RULE_METRIC.get(rule, ('',))[0]} here, no label read")  # fmt: skip
        check_choice(TuneConfig, self, "scheduler")
        check_choice(TuneConfig, self, "verbose")

    @property
    def stage(self) -> str:
        """The trials' stage (``teacher``, ``supervised`` or ``distill``)."""
        return self.train.stage

    def trial_config(self) -> TrainConfig:
        """The unplanned config every trial starts from: ``train``, with ``mag`` as the
        teacher's magnification in teacher mode."""
        if self.stage == STAGE_TEACHER and self.mag:
            return replace(self.train, model=replace(self.train.model, mag=self.mag))
        return self.train
