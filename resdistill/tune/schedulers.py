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

from collections.abc import Mapping
from typing import Any

from resdistill.errors import UsageError
from resdistill.train.selection import Selection
from resdistill.tune.config import TuneConfig
from resdistill.tune.space import Domain
from resdistill.tune.stage import settings

#: Domains PBT can resample from when it perturbs a setting.
_PBT_KINDS = ("loguniform", "uniform", "choice")


def pbt_mutable(stage: str) -> tuple[str, ...]:
    """The names of ``stage``'s settings PBT may perturb in a running trial."""
    return tuple(name for name, s in settings(stage).items() if s.pbt)


def make_scheduler(cfg: TuneConfig, space: Mapping[str, Domain]) -> Any:
    """ASHA (``time_attr="epoch"``, ``max_t`` the trials' epochs), PBT (``time_attr="epoch"``, mutations
    of the space's non-fixed :func:`pbt_mutable` entries) or FIFO. Raises :class:`UsageError`
    when PBT would have nothing to perturb."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    epochs = cfg.train.optim.epochs
    if cfg.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(cfg.grace_period, epochs),
            reduction_factor=cfg.reduction_factor,
        )
    if cfg.scheduler == "pbt":
        mutable = pbt_mutable(cfg.stage)
        mutations = {
            k: d.to_tune() for k, d in space.items() if k in mutable and d.kind in _PBT_KINDS
        }
        if not mutations:
            raise UsageError(
                "--scheduler pbt needs a non-fixed domain for one of " + ", ".join(mutable)
            )
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=cfg.perturbation_interval,
            hyperparam_mutations=mutations,
            quantile_fraction=cfg.pbt_quantile,
            synch=cfg.pbt_synch,
        )
    return FIFOScheduler()


def default_concurrency(cfg: TuneConfig) -> int:
    """Trials the cluster's current CPUs (and GPUs) hold: ``floor(CPU / (trial_cpus + workers x
    cpus_per_worker))``, and ``floor(GPU / workers)`` on cuda; at least 1."""
    import ray

    run = cfg.train.run
    res = ray.cluster_resources()
    per_trial = cfg.trial_cpus + run.workers * run.cpus_per_worker
    n = int(res.get("CPU", 1) // per_trial) if per_trial > 0 else cfg.num_samples
    if run.device == "cuda":  # resolved: tune_run turns auto into cpu or cuda
        n = min(n, int(res.get("GPU", 0) // run.workers))
    return max(1, n)


def trial_checkpoints_kept(cfg: TuneConfig) -> int:
    """``--keep-trial-checkpoints``, by default 2, or ``2 x interval + 2`` with PBT (so a
    donor's checkpoint outlives the exploit that copies it)."""
    if cfg.keep_trial_checkpoints is not None:
        return max(1, cfg.keep_trial_checkpoints)
    return 2 * cfg.perturbation_interval + 2 if cfg.scheduler == "pbt" else 2


def checkpoint_config(cfg: TuneConfig, chosen: Selection) -> Any:
    """Tune's ``CheckpointConfig``: :func:`trial_checkpoints_kept` per trial, the best by
    ``chosen`` (the trials' ranking rule; Tune keeps each trial's latest as well). PBT keeps the
    newest instead: an exploit restores the donor's latest checkpoint, which has to outlive the
    donor's next reports whatever it scores."""
    from ray import tune

    kept = trial_checkpoints_kept(cfg)
    if cfg.scheduler == "pbt":
        return tune.CheckpointConfig(num_to_keep=kept)
    return tune.CheckpointConfig(num_to_keep=kept, checkpoint_score_attribute=chosen.metric,
                                 checkpoint_score_order=chosen.mode)  # fmt: skip


def seeded_search(seed: int | None) -> Any:
    """Tune's default random search drawing from ``seed`` (None: Tune's own default)."""
    if seed is None:
        return None
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)
