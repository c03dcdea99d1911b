"""Check the paper's three claims on a dataset with one command, resumable, on Ray Tune:

  1. students at 4x/16x/64x fewer FLOPs approach the high-magnification teacher;
  2. with few labels, the distilled student beats the supervised baseline;
  3. accuracy rises with the amount of unlabelled data.

The grid: student magnification (default: every one of the dataset below the teacher's) x
{baseline (labels only), distilled} x label fraction (1, 0.1) x unlabelled share (0, 0.25, 0.5,
1: the share of the unlabelled training slides distillation reads; baselines read none) x seeds
(3), plus a teacher per label fraction and seed (none for a fraction whose --teacher is given).
Each cell is one Ray Train run scheduled by Ray Tune (a grid search, trials sized to the
cluster), evaluated on the test split with slide-clustered bootstrap CIs.

Without --data it writes the embedded synthetic cohort (32 slides, a quarter unlabelled) under
--out and shards it at 10x, 5x, 2.5x and 1.25x. --quick runs one student magnification, one seed
and the unlabelled shares 0 and 1, at the full schedules. Output in --out: study.csv / study.parquet, accuracy_vs_flops.png,
accuracy_vs_unlabeled.png and summary.md (each claim with its numbers, its rule and "holds" or
"does not hold"); cells/ holds one record per finished cell, which --resume keeps.
"""

from __future__ import annotations

import argparse

from resdistill.commands import common
from resdistill.config import DEFAULT_EPOCHS

#: the unlabelled shares of the full grid and of --quick
SHARES, QUICK_SHARES = "0,0.25,0.5,1", "0,1"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("data and teachers")
    g.add_argument("--data", default=None,
                   help="dataset root (folder or s3://) sharded at the teacher's and the students' "
                        "magnifications; default: the embedded synthetic cohort under --out")  # fmt: skip
    g.add_argument("--teacher", action="append", default=None, metavar="[FRACTION=]CKPT",
                   help="a trained teacher checkpoint for label fraction 1 (or FRACTION=CKPT for "
                        "another; repeatable); fractions without one train their teachers as cells")  # fmt: skip
    g.add_argument("--teacher-mag", default=None, help="default: the dataset's highest")
    g.add_argument("--student-mags", default=None,
                   help="comma list; default: every magnification below the teacher's")  # fmt: skip
    g = p.add_argument_group("grid")
    g.add_argument("--label-fractions", default="1,0.1", help="labelled share of training slides")
    g.add_argument("--unlabelled-shares", default=None,
                   help=f"shares of the unlabelled training slides distillation reads (default: "
                        f"{SHARES}; with --quick {QUICK_SHARES})")  # fmt: skip
    g.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    g.add_argument("--quick", action="store_true",
                   help="one student magnification (16x fewer FLOPs), one seed, unlabelled "
                        f"shares {QUICK_SHARES}; the full schedules, so its verdicts are evidence")  # fmt: skip
    g = p.add_argument_group("training (every cell)")
    g.add_argument("--arch", default="resnet-small", help="teachers' and students' network")
    g.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="teachers' epochs")
    g.add_argument("--student-epochs", type=int, default=DEFAULT_EPOCHS, help="students' epochs")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes per run")
    g.add_argument("--teacher-args", default="",
                   help="more `resdistill teacher` options for teacher cells, e.g. '--jitter 0.5,0.5,0.5,0.2'")  # fmt: skip
    g.add_argument("--student-args", default="",
                   help="more `resdistill distill` options for student cells, e.g. '--temperature 4'")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic cohort")
    g.add_argument("--cohort", default="default",
                   help="without --data: the embedded cohort's kind, as `resdistill synth "
                        "--cohort` (default, sites, subtle, unlabeled, or a+b)")  # fmt: skip
    g = p.add_argument_group("run")
    g.add_argument("--out", default="study", help="report folder (cells/ records inside)")
    g.add_argument("--storage", default=None,
                   help="run storage for Tune results and checkpoints (default: OUT/runs)")  # fmt: skip
    g.add_argument("--name", default="study", help="prefix of the Tune experiments")
    g.add_argument("--resume", action="store_true", help="keep finished cells, run the rest")
    g.add_argument("--cpus-per-worker", type=float, default=0.9, help="CPUs of each cell's run")
    g.add_argument("--trial-cpus", type=float, default=0.1, help="CPUs of each trial's actor")
    g.add_argument("--gpu", action="store_true", help="one GPU per cell")
    g.add_argument("--address", default=None, help="Ray cluster (default: $RAY_ADDRESS or local)")
    return common.show_defaults(p)


def study(args: argparse.Namespace) -> object:
    from resdistill.study.run import run_study

    if args.quick:
        args.seeds = 1
    if args.unlabelled_shares is None:
        args.unlabelled_shares = QUICK_SHARES if args.quick else SHARES
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if args.data and args.cohort != "default":
        raise ValueError("--cohort picks the embedded synthetic cohort: drop it with --data")
    return run_study(args)


def run(args: argparse.Namespace) -> int:
    """``resdistill study``: errors as one line; 0 ok, 1 failed run, 2 bad input."""
    return common.exit_code("study", lambda: study(args))
