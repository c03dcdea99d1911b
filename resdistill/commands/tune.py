"""Hyperparameter tuning of distillation (or, with ``--teacher-mode``, of the teacher) on Ray Tune.

``python -m resdistill.tune --data s3://bucket/ds --teacher s3://bucket/runs/t1/checkpoint_epoch0010
--student-mag 2.5x --scheduler asha --num-samples 16 --storage s3://bucket/tune --name sweep1
--best-json best.json`` (or ``resdistill tune ...``, or through ``ray job submit``).

Every option of ``resdistill distill`` (data, teacher, model, run) sets the fixed part of each
trial; the search space sets the rest. Tunable names: ``lr``, ``weight_decay``, ``optimizer``,
``warmup_epochs``, ``batch_size``, ``mag`` (the trained model's magnification; ``student_mag``
names it too when training a student); when distilling ``temperature``, ``kd_weight``,
``feature_weight``; with ``--teacher-mode`` or ``--supervised`` ``label_smoothing``. A domain is
written ``loguniform:LOW:HIGH``, ``uniform:LOW:HIGH``, ``randint:LOW:HIGH`` (HIGH exclusive),
``choice:A,B,C``, ``grid:A,B,C`` (every value, times ``--num-samples``) or a plain value (fixed).
``--space lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4`` overrides entries of the default
space (a comma inside a ``choice``/``grid`` belongs to it), ``--space-file`` reads a JSON or YAML
mapping ``{name: domain}`` (or ``{"space": {...}}``) first; ``--no-default-space`` starts from
nothing.

Schedulers (``--scheduler``):

* ``asha`` - asynchronous successive halving on ``--metric`` (default ``val_macro_f1``, the
  validation macro F1 all-reduced over the Train ranks) per epoch: a trial below the top
  ``1/reduction_factor`` at a rung (``grace_period * reduction_factor^k`` epochs) stops.
* ``pbt`` - Population Based Training: every ``--perturbation-interval`` epochs a trial in the
  bottom ``--pbt-quantile`` copies the latest checkpoint of one in the top quantile and
  perturbs the continuous hyperparameters (x0.8 / x1.2, or resampled); it restarts from that
  checkpoint: the donor's weights, optimizer state, epoch and step. ``weight_decay``,
  ``batch_size``, ``optimizer``, ``warmup_epochs`` and the magnification are not mutated (the
  restored optimizer state carries the donor's weight decay; the others change what a
  checkpoint means). ``--pbt-synch`` waits until every live trial has reached the interval
  before ranking them (each trial then restarts once per interval); asynchronous PBT ranks
  whatever trials have reported, so a trial that runs ahead may finish before a slow one is
  ever compared with it.
* ``fifo`` - every trial runs to ``--epochs``.

Each trial is a Tune function trainable that runs one Ray Train ``TorchTrainer`` per (re)start
(see :mod:`resdistill.tune.trial`): the trial actor takes ``--trial-cpus`` (default 1: it only
waits and forwards), its Train workers ``--workers`` x ``--cpus-per-worker`` (and a GPU each
with ``--gpu``); ``--max-concurrent`` (default: as many as the cluster's CPUs/GPUs hold now)
lets several trials share a machine. Tune results and each trial's checkpoints live in
``<storage>/<name>`` (a folder or ``s3://``), the Train runs in ``<storage>/<name>/_train``;
``--resume`` continues an interrupted run of the same ``--name`` with ``Tuner.restore``
(finished trials are kept, unfinished ones restart from their latest checkpoint).

At the end: a table of trials (hyperparameters, epochs run, last and best metric) and the best
configuration; ``--best-json`` gets ``{"checkpoint": url, "config": {...}, "metric": name,
"value": best value, ...}``, which ``resdistill evaluate`` accepts as a model.

exit codes: 0 done; 1 no trial produced a checkpoint; 2 unusable options, space or data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from resdistill.errors import UsageError
from resdistill.tune.schedulers import SCHEDULERS
from resdistill.tune.stage import add_training_arguments


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (the fixed part of every trial) plus the tuning ones."""
    add_training_arguments(parser)
    g = parser.add_argument_group("tuning")
    g.add_argument(
        "--teacher-mode",
        action="store_true",
        help="tune the teacher (resdistill teacher) instead of distillation; --mag picks its "
        "magnification",
    )
    g.add_argument("--mag", default=None, help="teacher mode: magnification (default: highest)")
    g.add_argument(
        "--space",
        action="append",
        default=None,
        help="search space entries NAME=DOMAIN[,NAME=DOMAIN...], e.g. "
        "lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4 (repeatable)",
    )
    g.add_argument("--space-file", default=None, help="JSON or YAML {name: domain} read first")
    g.add_argument(
        "--no-default-space", action="store_true", help="tune only what --space/--space-file say"
    )
    g.add_argument("--scheduler", default="asha", choices=SCHEDULERS)
    g.add_argument("--num-samples", type=int, default=8, help="trials (per grid point)")
    g.add_argument(
        "--metric", default="val_macro_f1", help="reported metric to optimise (all-reduced)"
    )
    g.add_argument("--mode", default="max", choices=("max", "min"))
    g.add_argument("--grace-period", type=int, default=1, help="asha: epochs before a stop")
    g.add_argument("--reduction-factor", type=float, default=2.0, help="asha: keep 1/this")
    g.add_argument(
        "--perturbation-interval", type=int, default=1, help="pbt: epochs between exploits"
    )
    g.add_argument(
        "--pbt-quantile", type=float, default=0.25, help="pbt: bottom/top share exploited/copied"
    )
    g.add_argument(
        "--pbt-synch",
        action="store_true",
        help="pbt: rank and exploit only when every trial has reached the interval",
    )
    g.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs of each trial's own actor")
    g.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials running at once (default: what the cluster's CPUs/GPUs hold now)",
    )
    g.add_argument("--time-budget-s", type=float, default=None, help="stop tuning after this")
    g.add_argument(
        "--trial-retries",
        type=int,
        default=0,
        help="restarts of a failed trial on top of --max-failures (in a tuning run a worker "
        "failure restarts its trial from the trial's latest checkpoint)",
    )
    g.add_argument(
        "--keep-trial-checkpoints",
        type=int,
        default=None,
        help="Tune checkpoints kept per trial (default 2; with pbt 2 x interval + 2, so a "
        "donor's checkpoint outlives the exploit)",
    )
    g.add_argument(
        "--resume", action="store_true", help="continue the interrupted run --name (Tuner.restore)"
    )
    g.add_argument("--best-json", default=None, help="write the best checkpoint and config here")
    g.add_argument("--tune-seed", type=int, default=None, help="seed of the search's sampling")
    g.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's output")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m resdistill.tune``."""
    parser = argparse.ArgumentParser(
        prog="python -m resdistill.tune",
        description="Tune distillation (or the teacher) with Ray Tune: ASHA or PBT over Ray "
        "Train trials.",
    )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``resdistill tune``: 0 ok, 1 no trial produced a checkpoint, 2 bad options or data."""
    from resdistill.tune.run import tune_run

    try:
        summary = tune_run(args)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.best is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.tune``; returns the exit status."""
    try:
        return run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130
