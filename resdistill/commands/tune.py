"""``resdistill tune``: Ray Tune (ASHA / PBT / FIFO) over distillation or teacher trials."""

from __future__ import annotations

import sys

from resdistill.commands import training
from resdistill.commands.generate import CommandSpec, Flag, Switch
from resdistill.config import STAGE_DISTILL, STAGE_SUPERVISED, STAGE_TEACHER
from resdistill.tune.config import TuneConfig

SPEC = CommandSpec(
    name="tune",
    config=TuneConfig,
    summary="tune distillation or the teacher with Ray Tune (ASHA/PBT)",
    description="""\
Every option of resdistill distill (data, teacher, model, loss, run) sets the fixed part of each
trial; the search space sets the rest. --teacher-mode tunes the teacher (resdistill teacher)
instead, --supervised the low-magnification baseline; a stage's own defaults (training splits,
colour jitter) apply to its trials.

Tunable names: lr, weight_decay, optimizer, warmup_epochs, batch_size, mag (the trained model's
magnification; student_mag names it too when training a student); when distilling temperature,
kd_weight, feature_weight, attention_weight; with --teacher-mode or --supervised
label_smoothing. A domain is written loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH
(HIGH exclusive), choice:A,B,C, grid:A,B,C (every value, times --num-samples) or a plain value
(fixed). --space lr=loguniform:1e-4:1e-2,batch_size=choice:16,32 overrides entries of the
default space (a comma inside a choice or grid belongs to it); --space-file reads a JSON or YAML
mapping {name: domain} (or {"space": {...}}) first; --no-default-space starts from nothing.

Trials are ranked by the rule their stage keeps its checkpoint by (--select, as in
resdistill distill): distillation trials by val_distill_loss, the distillation loss against the
teacher on --val-split's images with no label read (lower is better); teacher and --supervised
trials by --metric on the labelled --val-split (default val_macro_f1). --select metric ranks
distillation trials by --metric too, and --val-split's labelled slides then count in the label
budget; --select last ranks nothing and is refused. The schedulers (after every epoch, the metric
all-reduced over the Train ranks), the checkpoints each trial keeps (pbt keeps the newest) and
its best, the table and --best-json all use that rule; the table and --best-json state it with
the labelled validation slides that chose (0: label-free). val_distill_loss only compares trials
minimising the same loss, so under it temperature, kd_weight, feature_weight and
attention_weight may be fixed but not varied (the default space leaves them out; varied, the
ranking would pick whatever shrinks the loss, such as no feature term); --select metric tunes
them on labels. The schedulers:
  asha  asynchronous successive halving: a trial below the top 1/--reduction-factor at a rung
        (--grace-period x reduction_factor^k epochs) stops.
  pbt   Population Based Training: every --perturbation-interval epochs a trial in the bottom
        --pbt-quantile copies the latest checkpoint of one in the top quantile (weights,
        optimiser state, epoch and step) and perturbs the continuous settings (x0.8 / x1.2, or
        resampled); weight_decay, batch_size, optimizer, warmup_epochs and the magnification are
        never mutated. --pbt-synch ranks only once every live trial has reached the interval.
  fifo  every trial runs to --epochs.

Each trial is a Tune function trainable that runs one Ray Train run per (re)start: the trial's
actor takes --trial-cpus, its Train workers --workers x --cpus-per-worker (and a GPU each with
--device cuda); --max-concurrent (default: what the cluster holds now) lets trials share a machine.
Results, each trial's checkpoints and the resolved options (config.yaml) live in
<storage>/<name>, the Train runs in <storage>/<name>/_train; --resume continues an interrupted
run of the same --name (finished trials are kept, the others restart from their latest
checkpoint). At the end: a table of trials and the best configuration; --best-json gets
{"checkpoint": url, "config": {...}, "metric": name, "value": best value, "select": rule,
"labelled_val_slides": n, ...}, which resdistill evaluate accepts as a model.

exit codes: 0 done; 1 no trial produced a checkpoint; 2 unusable options, space or data.""",
    examples=(
        "resdistill tune --data shards/ --teacher runs/t1 --student-mag 2.5x --name sweep1",
        "resdistill tune --data shards/ --teacher runs/t1 --student-mag 2.5x --scheduler pbt",
        "resdistill tune --data shards/ --teacher-mode --space lr=loguniform:1e-4:1e-2",
        "resdistill tune --config runs/sweep1/config.yaml --name sweep1 --resume",
    ),
    defaults={"train.stage": STAGE_DISTILL},
    flags={
        "train.model.mag": Flag(
            "--student-mag",
            "the trials' student magnification, e.g. 5x, 2.5x (required unless "
            "--teacher-mode; --space student_mag=... tunes it)",
        ),  # fmt: skip
        "train.run.metric": Flag(
            help="with --select metric (the teacher's and --supervised's default rule): the "
            "reported metric that ranks trials and picks their checkpoints"
        ),  # fmt: skip
        "train.optim.epochs": Flag(help="epochs of every trial (asha's and fifo's last)"),
        "train.run.tracking": Flag(
            help="record every trial's params (its resolved config), epochs and best "
            "checkpoint: tensorboard (Ray Tune's event files in each trial folder), mlflow[:URI] "
            "(one run per trial in an experiment named --name; default store: the run storage's "
            "sqlite mlflow.db; pip install 'resdistill[mlflow]'), wandb[:PROJECT] (pip install "
            "wandb) or none"
        ),  # fmt: skip
    },
    switches=(
        training.gpu_switch("train.run.device"),
        Switch(
            "--teacher-mode",
            "train.stage",
            STAGE_TEACHER,
            "tune the teacher (resdistill teacher) instead of distillation; --mag picks its "
            "magnification",
        ),  # fmt: skip
        Switch(
            "--supervised",
            "train.stage",
            STAGE_SUPERVISED,
            "tune the baseline: the student on labels only, no teacher",
        ),  # fmt: skip
    ),
    titles={f"train.{k}": v for k, v in training.TITLES.items()},
)


def run(cfg: TuneConfig) -> int:
    """Tune as ``cfg`` says: 0 ok, 1 no trial produced a checkpoint, 2 bad options or data."""
    from resdistill.errors import UsageError
    from resdistill.tune.run import tune_run

    try:
        summary = tune_run(cfg)
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"tune: error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.best is not None else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m resdistill.tune``; returns the exit status."""
    from resdistill.commands.generate import main as generated_main

    return generated_main(SPEC, run, argv, prog="python -m resdistill.tune")
