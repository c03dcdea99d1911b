"""Trial schedulers (ASHA, PBT, FIFO), how many trials run at once, and the search's seed.

* ``asha`` - asynchronous successive halving on the metric per epoch: a trial below the top
  ``1/reduction_factor`` at a rung (``grace_period * reduction_factor^k`` epochs) stops.
* ``pbt`` - Population Based Training: every ``perturbation_interval`` epochs a trial in the
  bottom quantile copies the latest checkpoint of one in the top quantile and perturbs the
  settings :func:`resdistill.config.tunable` marks PBT-mutable (continuous ones that keep a
  checkpoint meaningful). ``synch`` ranks only once every live trial reached the interval.
* ``fifo`` - every trial runs to the last epoch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from resdistill.errors import UsageError
from resdistill.tune.space import Domain
from resdistill.tune.stage import settings, stage_of

SCHEDULERS = ("asha", "pbt", "fifo")
#: Domains PBT can resample from when it perturbs a setting.
_PBT_KINDS = ("loguniform", "uniform", "choice")


def pbt_mutable(stage: str) -> tuple[str, ...]:
    """The names of ``stage``'s settings PBT may perturb in a running trial."""
    return tuple(name for name, s in settings(stage).items() if s.pbt)


def make_scheduler(args: argparse.Namespace, space: Mapping[str, Domain]) -> Any:
    """ASHA (``time_attr="epoch"``, ``max_t=--epochs``), PBT (``time_attr="epoch"``, mutations
    of the space's non-fixed :func:`pbt_mutable` entries) or FIFO. Raises :class:`UsageError`
    when PBT would have nothing to perturb."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if args.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=args.epochs,
            grace_period=min(args.grace_period, args.epochs),
            reduction_factor=args.reduction_factor,
        )
    if args.scheduler == "pbt":
        mutable = pbt_mutable(stage_of(args))
        mutations = {
            k: d.to_tune() for k, d in space.items() if k in mutable and d.kind in _PBT_KINDS
        }
        if not mutations:
            raise UsageError(
                "--scheduler pbt needs a non-fixed domain for one of " + ", ".join(mutable)
            )
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=args.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=args.pbt_quantile,
            synch=args.pbt_synch,
        )
    return FIFOScheduler()


def default_concurrency(args: argparse.Namespace) -> int:
    """Trials the cluster's current CPUs (and GPUs) hold: ``floor(CPU / (trial_cpus + workers x
    cpus_per_worker))``, and ``floor(GPU / workers)`` with ``--gpu``; at least 1."""
    import ray

    res = ray.cluster_resources()
    per_trial = args.trial_cpus + args.workers * args.cpus_per_worker
    n = int(res.get("CPU", 1) // per_trial) if per_trial > 0 else args.num_samples
    if args.gpu:
        n = min(n, int(res.get("GPU", 0) // args.workers))
    return max(1, n)


def trial_checkpoints_kept(args: argparse.Namespace) -> int:
    """``--keep-trial-checkpoints``, by default 2, or ``2 x interval + 2`` with PBT (so a
    donor's checkpoint outlives the exploit that copies it)."""
    if args.keep_trial_checkpoints is not None:
        return max(1, args.keep_trial_checkpoints)
    return 2 * args.perturbation_interval + 2 if args.scheduler == "pbt" else 2


def seeded_search(seed: int | None) -> Any:
    """Tune's default random search drawing from ``seed`` (None: Tune's own default)."""
    if seed is None:
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)
