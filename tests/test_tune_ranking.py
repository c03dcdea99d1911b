"""Tune ranks trials by the rule their stage keeps its checkpoint by: distillation trials by
``val_distill_loss`` (lower better, no label read) unless ``--select metric``, the teacher and
the baseline by ``--metric`` on the labelled validation split. The scheduler, the checkpoints
kept, the table and the best-json all take it, and state the labels that chose."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from resdistill.commands.generate import parse
from resdistill.commands.tune import SPEC, main
from resdistill.errors import UsageError
from resdistill.tune.config import TuneConfig
from resdistill.tune.run import search_config, trial_options
from resdistill.tune.schedulers import checkpoint_config
from resdistill.tune.space import Domain, build_space, objective_settings
from resdistill.tune.stage import base_config, ranking
from resdistill.tune.trials_table import print_summary, summarize, write_best_json

#: per trial, per epoch: (val_macro_f1, val_distill_loss). Trial "a" is better by labels,
#: trial "b" by the distillation loss (at its first epoch).
EPOCHS = {"a": [(0.90, 0.60), (0.95, 0.50)], "b": [(0.50, 0.30), (0.60, 0.40)]}
LR = {"a": 0.001, "b": 0.01}


def _config(*extra: str) -> TuneConfig:
    return parse(SPEC, ["--data", "/ds", "--teacher", "/t1", "--student-mag", "5x",
                        "--max-concurrent", "1", "--no-default-space",
                        "--space", "lr=choice:0.001,0.01", *extra])  # fmt: skip


def _grid(root: Path) -> list[Any]:
    """Two finished trials as Tune's ``ResultGrid`` yields them: every epoch reported with a
    checkpoint, all kept."""
    import pandas as pd
    from ray.tune import Checkpoint, Result

    grid = []
    for i, (trial, epochs) in enumerate(EPOCHS.items()):
        folder = root / f"trial_function_96532_0000{i}_{i}_lr={LR[trial]}_2026-12-06_10-00-00"
        rows, kept = [], []
        for epoch, (f1, loss) in enumerate(epochs, 1):
            ckpt = folder / f"checkpoint_00000{epoch - 1}"
            ckpt.mkdir(parents=True)
            row = {"epoch": epoch, "val_macro_f1": f1, "val_distill_loss": loss,
                   "config": {"lr": LR[trial]}}  # fmt: skip
            rows.append(row)
            kept.append((Checkpoint(str(ckpt)), row))
        grid.append(Result(metrics=rows[-1], checkpoint=kept[-1][0], error=None,
                           path=str(folder), metrics_dataframe=pd.DataFrame(rows),
                           best_checkpoints=kept))  # fmt: skip
    return grid


def _best(cfg: TuneConfig, root: Path, chosen: Any = None) -> dict[str, Any]:
    space = build_space(cfg)
    summary = summarize(_grid(root), cfg, "sweep", space, resumed=False, elapsed_s=1.0,
                        chosen=chosen)  # fmt: skip
    assert summary.best is not None
    return {"summary": summary, **summary.best}


def test_distill_trials_rank_by_the_distill_loss_without_labels(tmp_path: Path) -> None:
    from rich.console import Console

    cfg = _config()
    chosen = ranking(cfg)
    assert (chosen.rule, chosen.metric, chosen.mode, chosen.labelled_val_slides) == (
        "distill-loss", "val_distill_loss", "min", 0)  # fmt: skip
    space = build_space(cfg)
    tune_cfg = search_config(cfg, space)
    assert (tune_cfg.metric, tune_cfg.mode) == ("val_distill_loss", "min")
    tune_cfg.scheduler.set_search_properties(tune_cfg.metric, tune_cfg.mode)  # as Tuner.fit does
    assert tune_cfg.scheduler.metric == "val_distill_loss"
    kept = checkpoint_config(cfg, chosen)
    assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (
        "val_distill_loss", "min")  # fmt: skip
    opts = trial_options(cfg, "sweep")  # each trial's own Train run keeps by the same rule
    assert (opts["metric"], opts["mode"]) == ("val_distill_loss", "min")

    best = _best(cfg, tmp_path)
    summary = best["summary"]
    assert (best["config"]["lr"], best["epoch"], best["value"]) == (LR["b"], 1, 0.30)
    assert (best["select"], best["metric"], best["labelled_val_slides"]) == (
        "distill-loss", "val_distill_loss", 0)  # fmt: skip
    assert [r.config["lr"] for r in summary.trials] == [LR["b"], LR["a"]]
    assert [r.best for r in summary.trials] == [0.30, 0.50]
    console = Console(record=True, width=200)
    print_summary(summary, build_space(cfg), console)
    text = console.export_text()
    assert "best val_distill_loss" in text and "labels unread" in text
    assert "label budget:    0 labelled validation slides" in text
    write_best_json(str(tmp_path / "best.json"), summary.best)
    doc = json.loads((tmp_path / "best.json").read_text())
    assert (doc["select"], doc["labelled_val_slides"], doc["value"]) == ("distill-loss", 0, 0.30)


def test_select_metric_ranks_distill_trials_by_labels(tmp_path: Path) -> None:
    cfg = _config("--select", "metric", "--metric", "val_macro_f1")
    tune_cfg = search_config(cfg, build_space(cfg))
    assert (tune_cfg.metric, tune_cfg.mode) == ("val_macro_f1", "max")
    best = _best(cfg, tmp_path)
    assert (best["config"]["lr"], best["epoch"], best["value"]) == (LR["a"], 2, 0.95)
    assert best["select"] == "metric"
    # another metric, lower is better, as a user may ask
    cfg = _config("--select", "metric", "--metric", "val_distill_loss", "--mode", "min")
    assert ranking(cfg).rule == "metric" and _best(cfg, tmp_path / "2")["value"] == 0.30


def test_teacher_trials_rank_by_val_macro_f1_on_counted_slides(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    cfg = parse(SPEC, ["--data", str(tiny_dataset), "--teacher-mode", "--batch-size", "8",
                       "--workers", "1", "--max-concurrent", "1", "--no-default-space",
                       "--space", "lr=choice:0.001,0.01"])  # fmt: skip
    base = base_config(cfg)
    chosen = ranking(cfg, base)
    assert base.plan is not None and base.plan.n_val_slides >= 1
    assert (chosen.rule, chosen.metric, chosen.mode) == ("metric", "val_macro_f1", "max")
    assert chosen.labelled_val_slides == base.plan.n_val_slides
    tune_cfg = search_config(cfg, build_space(cfg))
    assert (tune_cfg.metric, tune_cfg.mode) == ("val_macro_f1", "max")
    best = _best(cfg, tmp_path, chosen)
    assert (best["config"]["lr"], best["value"]) == (LR["a"], 0.95)
    assert (best["select"], best["labelled_val_slides"]) == ("metric", base.plan.n_val_slides)
    # the teacher learns from labels anyway: a --metric of its own ranks without --select
    other = parse(SPEC, ["--data", "/ds", "--teacher-mode", "--metric", "val_acc"])
    assert ranking(other).metric == "val_acc"


DISTILL = ["--data", "/ds", "--teacher", "/t1", "--student-mag", "5x"]


def test_label_free_ranking_never_varies_the_loss_it_ranks_by() -> None:
    """val_distill_loss only compares trials minimising the same loss: under it the default
    space leaves temperature and the weights out, and a varied one is refused; --select
    metric tunes them on labels."""
    assert objective_settings() == {"temperature", "kd_weight", "feature_weight",
                                    "attention_weight"}  # fmt: skip
    space = build_space(parse(SPEC, DISTILL))
    assert set(space) == {"lr", "weight_decay"}
    fixed = build_space(parse(SPEC, [*DISTILL, "--space", "temperature=2,kd_weight=choice:0.5"]))
    assert (fixed["temperature"], fixed["kd_weight"]) == (Domain("fixed", (2,)),
                                                          Domain("choice", (0.5,)))  # fmt: skip
    for entry in ("temperature=choice:1,4", "feature_weight=uniform:0:1", "kd_weight=grid:1,2"):
        with pytest.raises(UsageError, match="only compares trials with the same distillation"):
            build_space(parse(SPEC, [*DISTILL, "--space", entry]))
    assert main([*DISTILL, "--scheduler", "pbt", "--space", "temperature=choice:1,4"]) == 2
    by_labels = build_space(parse(SPEC, [*DISTILL, "--select", "metric"]))
    assert {"temperature", "kd_weight", "feature_weight"} <= set(by_labels)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*DISTILL, "--metric", "val_acc"], "--metric (and --mode) rank trials only with --select"),
        ([*DISTILL, "--mode", "min"], "distill trials rank by val_distill_loss"),
        ([*DISTILL, "--select", "last"], "--select last ranks no trials"),
        (["--data", "/ds", "--teacher-mode", "--select", "last"], "--select last ranks no"),
    ],
)
def test_a_rule_that_would_not_rank_is_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_tune_drivers_silence_the_snapshot_warning_but_keep_the_users_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tune's forced-snapshot warning fires every few seconds with one kept checkpoint; the
    drivers turn it off, unless the user set the variable."""
    from resdistill.tune.trial import QUIET_TUNE_ENV, quiet_tune

    (key,) = QUIET_TUNE_ENV
    monkeypatch.delenv(key, raising=False)
    quiet_tune()
    assert os.environ[key] == "0"
    monkeypatch.setenv(key, "7")
    quiet_tune()
    assert os.environ[key] == "7"
