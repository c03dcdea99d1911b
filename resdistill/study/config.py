"""Typed options of ``resdistill study``: the dataset and teachers, the grid, what every cell
trains with, and where the study runs.

``trials`` and ``controls`` set the protocol (:mod:`resdistill.study.recipes`,
:mod:`resdistill.study.grid`): every arm tries the same ``trials`` recipes and keeps the one its
own validation rule prefers; the controls add a same-resolution teacher and teacher-free
self-training.

``teacher_args`` / ``student_args`` are overrides of the cells' :class:`TrainConfig`, nested as
the config (``{"data": {"jitter": [0.5, 0.5, 0.5, 0.2]}}``); on the command line they are
written with the training commands' flags (``--teacher-args '--jitter 0.5,0.5,0.5,0.2'``) and
read by :func:`resdistill.study.overrides.train_options`. Imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resdistill.config import (
    ARCH_CHOICES,
    DEFAULT_EPOCHS,
    DEVICES,
    STAGE_DISTILL,
    STAGE_TEACHER,
    TRACKING_HELP,
    TRACKING_KINDS,
    tracking_ok,
)
from resdistill.fields import ConfigError, check, check_choice, opt
from resdistill.study.ablation import VARIED
from resdistill.study.grid import ABLATIONS, CONTROLS, LABEL_FRACTIONS, SEEDS, UNLABELLED_SHARES
from resdistill.study.overrides import check_overrides, train_options
from resdistill.study.recipes import DEFAULT_TRIALS, searched

#: the unlabelled shares of ``--quick``
QUICK_SHARES = (0.0, 1.0)


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def parse_controls(text: str) -> tuple[str, ...]:
    """``"same-res,self-training"`` -> a tuple; ``"none"`` (or empty) -> ``()``."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    return () if names == ("none",) else names


@dataclass(frozen=True)
class StudyConfig:
    """One study; validated on construction (messages name the flag)."""

    data: str | None = opt(
        None, "dataset root (folder or s3://) sharded at the teacher's and the students' "
        "magnifications; default: the embedded synthetic cohort under --out")  # fmt: skip
    teacher: tuple[str, ...] = opt(
        (), "a trained teacher checkpoint for label fraction 1 (or FRACTION=CKPT for another; "
        "repeatable); fractions without one train their teachers as cells",
        metavar="[FRACTION=]CKPT", repeat=True)  # fmt: skip
    teacher_mag: str = opt("", "the teachers' magnification (default: the dataset's highest)")
    student_mags: tuple[str, ...] = opt(
        (),
        "comma list of student magnifications; default: every one below the teacher's",
        metavar="MAG,MAG",
    )
    label_fractions: tuple[float, ...] = opt(
        LABEL_FRACTIONS, "comma list of labelled shares of the training slides", metavar="F,F"
    )
    unlabelled_shares: tuple[float, ...] | None = opt(
        None, "comma list of shares of the unlabelled training slides distillation reads "
        f"(default: {_listed(UNLABELLED_SHARES)}; with --quick {_listed(QUICK_SHARES)})",
        metavar="S,S")  # fmt: skip
    seeds: int | None = opt(None, f"seeds per cell (default: {SEEDS}; 1 with --quick)")
    quick: bool = opt(
        False, "a smoke test, not evidence: one student magnification (16x fewer FLOPs), one "
        f"seed, unlabelled shares {_listed(QUICK_SHARES)}, no recipe search (one trial); its "
        "verdicts show the pipeline runs, not whether a claim holds")  # fmt: skip
    trials: int | None = opt(
        None, "recipes every arm (teacher, baseline, distilled, each control) tries on its "
        "validation rule before its cells run: the same recipes for every arm, the first its "
        f"defaults (default: {DEFAULT_TRIALS}; 1 with --quick: no search)")  # fmt: skip
    tune_seed: int = opt(0, "seed of the recipes the arms try")
    controls: tuple[str, ...] = opt(
        tuple(CONTROLS), "comma list of controls, or none: same-res (a teacher at the "
        "student's magnification, distilled alike), self-training (the baseline pseudo-labels "
        "the unlabelled slides for a fresh student)", parse=parse_controls,
        metavar="C,C|none")  # fmt: skip
    self_training_threshold: float = opt(
        0.95, "the self-training control's pseudo-label rule: a tile teaches only where the "
        "baseline's top softmax probability reaches this (FixMatch's 0.95, Sohn et al. 2020, "
        "fixed before any run; 0: every tile, soft labels weighing themselves)")  # fmt: skip
    ablations: tuple[str, ...] = opt(
        (), "comma list of ablations, or none: feature-term (the distilled student with the "
        "feature term off, on its last map, and on a spatial grid; the variant the distilled "
        "cells run is not repeated)", parse=parse_controls, metavar="A,A|none")  # fmt: skip
    arch: str = opt("resnet-small", "teachers' and students' network", choices=ARCH_CHOICES)
    epochs: int = opt(DEFAULT_EPOCHS, "teachers' epochs")
    student_epochs: int = opt(DEFAULT_EPOCHS, "students' epochs")
    batch_size: int = opt(32, "batch size of every cell")
    loader_workers: int = opt(1, "DataLoader processes per run")
    teacher_args: Mapping[str, Any] | None = opt(
        None, "more options of `resdistill teacher` for the teacher cells (the same-resolution "
        "ones too), which win over the study's but may not set what --trials searches (e.g. "
        "'--label-smoothing 0.1')", parse=train_options, metavar="OPTIONS")  # fmt: skip
    student_args: Mapping[str, Any] | None = opt(
        None, "more options of `resdistill distill` for every other cell, which win over the "
        "study's but may not set what --trials searches (e.g. '--temperature 4')",
        parse=train_options, metavar="OPTIONS")  # fmt: skip
    seed: int = opt(0, "seed of the synthetic cohort")
    cohort: str = opt(
        "default", "without --data: the embedded cohort's kind, as `resdistill synth --cohort` "
        "(default, sites, subtle, unlabeled, chromatin, or a+b)")  # fmt: skip
    out: str = opt("study", "report folder (cells/ records inside)")
    storage: str | None = opt(
        None, "run storage for Tune results and checkpoints (default: OUT/runs)"
    )
    name: str = opt("study", "prefix of the Tune experiments")
    resume: bool = opt(False, "keep finished cells, run the rest")
    cpus_per_worker: float = opt(0.9, "CPUs of each cell's run")
    trial_cpus: float = opt(0.1, "CPUs of each trial's actor")
    device: str = opt(
        "auto",
        "where each cell's worker runs: cuda is one GPU per cell; auto "
        "is cuda when the Ray cluster has GPUs",
        choices=DEVICES,
    )
    address: str | None = opt(None, "Ray cluster (default: $RAY_ADDRESS or a local Ray)")
    tracking: str = opt("tensorboard", TRACKING_HELP + "; one record per cell, tagged with it, "
                        "in an MLflow experiment named --name", metavar="KIND[:TARGET]")  # fmt: skip

    def __post_init__(self) -> None:
        check(tracking_ok(self.tracking), "--tracking", f"must be one of "
              f"{', '.join(TRACKING_KINDS)} (with :TARGET), got {self.tracking!r}")  # fmt: skip
        check(bool(self.label_fractions), "--label-fractions", "needs a value")
        for v in self.label_fractions:
            check(0 < v <= 1, "--label-fractions", f"{v:g} is not in (0, 1]")
        check(self.unlabelled_shares is None or bool(self.unlabelled_shares),
              "--unlabelled-shares", "needs a value")  # fmt: skip
        for v in self.unlabelled_shares or ():
            check(0 <= v <= 1, "--unlabelled-shares", f"{v:g} is not in [0, 1]")
        check(self.seeds is None or self.seeds >= 1, "--seeds", "must be at least 1")
        check(self.trials is None or self.trials >= 1, "--trials", "must be at least 1")
        controls = self.controls  # a YAML list, or the command line's text
        controls = parse_controls(controls) if isinstance(controls, str) else tuple(controls)
        object.__setattr__(self, "controls", controls)
        for c in self.controls:
            check(c in CONTROLS, "--controls", f"{c!r} is not one of {', '.join(CONTROLS)}, none")
        check(0.0 <= self.self_training_threshold < 1.0, "--self-training-threshold",
              "must be in [0, 1)")  # fmt: skip
        ablations = self.ablations
        ablations = parse_controls(ablations) if isinstance(ablations, str) else tuple(ablations)
        object.__setattr__(self, "ablations", ablations)
        for a in self.ablations:
            check(a in ABLATIONS, "--ablations",
                  f"{a!r} is not one of {', '.join(ABLATIONS)}, none")  # fmt: skip
        check_choice(StudyConfig, self, "device")
        check(not self.data or self.cohort == "default", "--cohort",
              "picks the embedded synthetic cohort: drop it with --data")  # fmt: skip
        for name in ("epochs", "student_epochs", "batch_size"):
            check(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be at least 1")
        check(self.loader_workers >= 0, "--loader-workers", "must be 0 or more")
        check(self.cpus_per_worker > 0, "--cpus-per-worker", "must be positive")
        check(self.trial_cpus > 0, "--trial-cpus", "must be positive")
        check_choice(StudyConfig, self, "arch")
        for name, stage in (("teacher_args", STAGE_TEACHER), ("student_args", STAGE_DISTILL)):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if isinstance(value, str):  # a YAML file may spell them as on the command line
                try:
                    value = train_options(value)
                except ValueError as exc:
                    raise ConfigError(f"{flag}: {exc}") from None
                object.__setattr__(self, name, value)
            check_overrides(value, stage, flag)
            varied = [k for k in VARIED if k in ((value or {}).get("loss") or {})]
            check(not (varied and self.ablations and stage == STAGE_DISTILL), flag,
                  f"sets {', '.join(varied)}, which --ablations feature-term varies: drop it, "
                  "or pass --ablations none")  # fmt: skip
            fixed = searched(value) if self.recipe_trials > 1 else []
            check(not fixed, flag, f"sets {', '.join(p.split('.')[1] for p in fixed)}, which "
                  "--trials searches for every arm alike: drop it, or pass --trials 1")  # fmt: skip

    @property
    def grid_seeds(self) -> int:
        """Seeds per cell: ``seeds``, else 1 with ``quick``, else the paper's."""
        return self.seeds if self.seeds is not None else 1 if self.quick else SEEDS

    @property
    def recipe_trials(self) -> int:
        """Recipes per arm: ``trials``, else 1 with ``quick``, else the default."""
        return self.trials if self.trials is not None else 1 if self.quick else DEFAULT_TRIALS

    @property
    def shares(self) -> tuple[float, ...]:
        """The unlabelled shares: ``unlabelled_shares``, else ``quick``'s or the paper's."""
        if self.unlabelled_shares is not None:
            return self.unlabelled_shares
        return QUICK_SHARES if self.quick else UNLABELLED_SHARES
