"""Ray Tune over distillation trials on a real local Ray cluster: search-space parsing, ASHA
stopping weak trials early, PBT exploiting with a real checkpoint restore, ``Tuner.restore``
after the driver is killed, and the best-json read by ``resdistill evaluate``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from resdistill.checkpoint import TRAINER_FILE, load_checkpoint
from resdistill.commands.generate import parse
from resdistill.commands.tune import SPEC, main
from resdistill.config import DEFAULT_JITTER, DEFAULT_TEMPERATURE, STUDENT_JITTER
from resdistill.errors import UsageError
from resdistill.tune.config import TuneConfig
from resdistill.tune.run import trial_options, tune_run
from resdistill.tune.space import Domain, build_space, check_space, parse_domain, split_space_arg
from resdistill.tune.stage import apply_hparams, base_config
from resdistill.tune.trial import TRAINER_OPTIONS
from resdistill.tune.trials_table import TrialRow, trial_id_of
from tests.fixtures_ray import wait_for

pytestmark = pytest.mark.timeout(600)

GOOD, WEAK = 1.5e-3, 1e-7


def _config(argv: list[str]) -> TuneConfig:
    """The config ``resdistill tune`` resolves from ``argv``."""
    return parse(SPEC, argv)


def _argv(data: str, teacher: str, storage: Path, name: str, *extra: str) -> list[str]:
    return ["--data", data, "--teacher", teacher, "--student-mag", "5x", "--storage",
            str(storage), "--name", name, "--workers", "1", "--cpus-per-worker", "0.9",
            "--trial-cpus", "0.1", "--batch-size", "8", "--loader-workers", "0",
            "--shuffle-buffer", "16", "--steps-per-epoch", "3", "--schedule", "constant",
            "--no-teacher-eval", "--no-default-space", "--verbose", "0", *extra]  # fmt: skip


def _results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trial_dirs(exp: Path) -> dict[str, Path]:
    """trial id -> trial folder."""
    return {
        trial_id_of(str(d)): d for d in exp.iterdir() if d.is_dir() and (d / "params.json").exists()
    }


def test_trial_id_from_the_trial_folder() -> None:
    name = "trial_function_96532_00001_1_lr=0.0000,temperature=2_2026-11-25_15-05-01"
    assert trial_id_of(f"/runs/pbt/{name}") == "96532_00001"
    assert trial_id_of(f"s3://bucket/runs/pbt/{name}/") == "96532_00001"
    assert trial_id_of("/runs/pbt/not-a-trial") == "not-a-trial"


# ---------------------------------------------------------------------------------------------
# Search space, no cluster
# ---------------------------------------------------------------------------------------------


def test_space_from_command_line_and_file(tmp_path: Path) -> None:
    assert split_space_arg("lr=loguniform:1e-4:1e-2,temperature=choice:1,2,4,kd_weight=0.5") == [
        ("lr", "loguniform:1e-4:1e-2"), ("temperature", "choice:1,2,4"), ("kd_weight", "0.5"),
    ]  # fmt: skip
    assert parse_domain("lr", "loguniform:1e-4:1e-2") == Domain("loguniform", (1e-4, 1e-2))
    assert parse_domain("t", "choice:1,2,4") == Domain("choice", (1, 2, 4))
    assert parse_domain("m", "grid:5x,2.5x") == Domain("grid", ("5x", "2.5x"))
    assert parse_domain("b", "randint:8:33") == Domain("randint", (8, 33))
    assert parse_domain("k", "0.5") == Domain("fixed", (0.5,))
    assert parse_domain("k", [1, 2]) == Domain("choice", (1, 2))
    assert parse_domain("k", {"type": "uniform", "low": 0, "high": 2}).values == (0.0, 2.0)
    for bad in ("loguniform:0:1", "uniform:2:1", "uniform:1", "choice:"):
        with pytest.raises(UsageError, match="search space 'x'"):
            parse_domain("x", bad)

    (tmp_path / "space.yaml").write_text(
        "space:\n  lr: loguniform:1e-5:1e-3\n  batch_size: [8, 16]\n"
    )
    (tmp_path / "space.json").write_text(json.dumps({"temperature": "choice:2,4"}))
    # ranked by labels: the loss settings may vary (tests/test_tune_ranking.py: label-free)
    base = ["--data", "d", "--teacher", "t", "--student-mag", "5x", "--select", "metric"]
    args = _config([*base, "--space-file", str(tmp_path / "space.yaml"),
                    "--space", "lr=uniform:1e-3:2e-3,temperature=choice:1,3"])  # fmt: skip
    space = build_space(args, "distill")
    assert space["lr"] == Domain("uniform", (1e-3, 2e-3))  # --space wins over the file
    assert space["batch_size"] == Domain("choice", (8, 16))
    assert space["temperature"] == Domain("choice", (1, 3))
    assert set(space) >= {"weight_decay", "kd_weight", "feature_weight"}  # the default space
    args = _config([*base, "--no-default-space", "--space-file", str(tmp_path / "space.json")])
    assert build_space(args, "distill") == {"temperature": Domain("choice", (2, 4))}
    with pytest.raises(UsageError, match="cannot tune 'temperature' for the teacher"):
        build_space(args, "teacher")


def test_config_file_with_flag_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``resdistill tune --config FILE.yaml`` plus flags: defaults < file < flags, the trials'
    training options nested under ``train``, equal to the config built in Python."""
    from resdistill.cli import main as cli_main
    from resdistill.config import DataConfig, LossConfig, ModelConfig, TeacherRef, TrainConfig

    file = tmp_path / "tune.yaml"
    file.write_text(yaml.safe_dump({
        "train": {"data": {"url": "/ds", "batch_size": 16}, "model": {"mag": "2.5x"},
                  "loss": {"temperature": 2}, "teacher": {"checkpoint": "/t1"}},
        "scheduler": "pbt", "num_samples": 4, "space": ["lr=loguniform:1e-4:1e-2"],
    }))  # fmt: skip
    argv = ["--config", str(file), "--num-samples", "6", "--temperature", "3",
            "--space", "weight_decay=uniform:0:1", "--space", "lr=uniform:1e-3:2e-3"]  # fmt: skip
    cfg = _config(argv)
    assert cfg == TuneConfig(
        TrainConfig("distill", DataConfig(url="/ds", batch_size=16), model=ModelConfig(mag="2.5x"),
                    loss=LossConfig(temperature=3.0), teacher=TeacherRef(checkpoint="/t1")),
        space=("weight_decay=uniform:0:1", "lr=uniform:1e-3:2e-3"), scheduler="pbt", num_samples=6,
    )  # fmt: skip
    assert cfg.train.data.jitter == STUDENT_JITTER and cfg.train.run.metric == "val_macro_f1"
    assert build_space(cfg)["lr"] == Domain("uniform", (1e-3, 2e-3))  # the flags' space
    # the file may set the trials' stage; its presets follow
    (tmp_path / "teacher.yaml").write_text(
        yaml.safe_dump({"train": {"stage": "teacher", "data": {"url": "/ds"}}, "mag": "5x"})
    )
    teacher = _config(["--config", str(tmp_path / "teacher.yaml"), "--metric", "val_acc"])
    assert teacher.stage == "teacher" and teacher.train.data.jitter == DEFAULT_JITTER
    assert teacher.trial_config().model.mag == "5x" and teacher.train.run.metric == "val_acc"
    # the whole command line: --print-config shows what the flags resolved to
    assert cli_main(["tune", *argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_samples"] == 6 and printed["train"]["loss"]["temperature"] == 3.0
    assert _config(["--config", str(_write(tmp_path / "printed.yaml", printed))]) == cfg


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_bad_tuning_options_name_the_flag(capsys: pytest.CaptureFixture) -> None:
    base = ["--data", "/ds", "--teacher", "/t1", "--student-mag", "5x"]
    cases = [
        (["--reduction-factor", "1"], "--reduction-factor must be above 1"),
        (["--pbt-quantile", "0.9"], "--pbt-quantile must be in (0, 0.5]"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--trial-cpus", "0"], "--trial-cpus must be above 0"),
        (["--max-concurrent", "0"], "--max-concurrent must be at least 1"),
        (["--resume"], "--resume needs the --name"),
        (["--mag", "10x"], "--mag is the teacher's magnification"),
        (["--verbose", "3"], "--verbose must be one of 0, 1, 2"),
        (["--scheduler", "hyperband"], "--scheduler"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err.strip().splitlines()[-1], extra
    assert main(["--data", "/ds", "--teacher", "/t1"]) == 2
    assert "--student-mag is required" in capsys.readouterr().err
    assert main(["--data", "/ds", "--teacher-mode", "--student-mag", "5x"]) == 2
    assert "--student-mag is a student's" in capsys.readouterr().err
    from resdistill.config import DataConfig, ModelConfig, TrainConfig

    with pytest.raises(UsageError, match="--student-mag is required"):  # a config in Python too
        TuneConfig(TrainConfig("distill", DataConfig(url="/ds")))
    with pytest.raises(UsageError, match="--mag is the teacher's"):
        TuneConfig(TrainConfig("distill", DataConfig(url="/ds"), model=ModelConfig(mag="5x")),
                   mag="10x")  # fmt: skip


def test_bad_space_against_the_dataset_exits_2(
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    cases = [
        (["--space", "student_mag=choice:5x,40x"], "40x is not in"),
        (["--space", "student_mag=choice:10x,5x", "--teacher-mag", "5x"], "above the teacher"),
        (["--space", "batch_size=choice:8,512"], "fewer than one batch"),
        (["--space", "bogus=1"], "cannot tune 'bogus'"),
        (["--space", "lr=loguniform:1:0.1"], "LOW < HIGH"),
        (["--scheduler", "pbt", "--space", "weight_decay=uniform:0:1"], "pbt needs"),
    ]
    for extra, message in cases:
        argv = _argv(str(tiny_dataset), trained_teacher, tmp_path / "runs", "x", *extra)
        argv.remove("--steps-per-epoch")
        argv.remove("3")
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[-1], (extra, err)


def test_trial_config_takes_the_hyperparameters(tiny_dataset: Path, trained_teacher: str) -> None:
    args = _config(
        ["--data", str(tiny_dataset), "--teacher", trained_teacher, "--student-mag", "5x",
         "--batch-size", "8", "--workers", "1"])  # fmt: skip
    base = base_config(args)
    cfg = apply_hparams(base, {"lr": 0.01, "temperature": 2, "kd_weight": 0.5, "feature_weight": 0,
                               "batch_size": 16, "weight_decay": 0.0}, {"workers": 2})  # fmt: skip
    assert cfg.optim.lr == 0.01 and cfg.optim.weight_decay == 0.0
    assert cfg.loss.temperature == 2.0 and cfg.loss.kd_weight == 0.5
    assert cfg.loss.feature_weight == 0.0
    assert cfg.data.batch_size == 16 and cfg.plan.steps_per_epoch == 56 // (2 * 16)
    assert base.loss.temperature == DEFAULT_TEMPERATURE  # the base config is left alone
    # options whose default differs by stage take the trials' stage's own
    assert base.data.jitter == STUDENT_JITTER
    teacher_args = _config(["--data", str(tiny_dataset), "--teacher-mode",
                            "--batch-size", "8", "--workers", "1"])  # fmt: skip
    assert base_config(teacher_args).data.jitter == DEFAULT_JITTER
    with pytest.raises(ValueError, match="40x"):
        apply_hparams(base, {"student_mag": "40x"}, {"workers": 1})
    # a trial's Train run never retries on its own (Tune restarts the trial), so a stopped
    # trial's dying controller cannot reserve a new worker group
    assert "max_failures" not in TRAINER_OPTIONS and "max_failures" not in trial_options(args, "t")


def test_tunable_names_come_from_the_config(
    tiny_dataset: Path,
    trained_teacher: str,
) -> None:
    from resdistill.config import tunable
    from resdistill.tune.schedulers import pbt_mutable
    from resdistill.tune.stage import settings

    assert set(settings("teacher")) == set(tunable("teacher"))
    assert set(settings("distill")) == {*tunable("distill"), "student_mag"}
    assert pbt_mutable("distill") == (
        "lr",
        "temperature",
        "kd_weight",
        "feature_weight",
        "attention_weight",
    )
    assert pbt_mutable("teacher") == pbt_mutable("supervised") == ("lr", "label_smoothing")
    argv = ["--data", str(tiny_dataset), "--teacher", trained_teacher, "--student-mag", "5x",
            "--batch-size", "8", "--workers", "1"]  # fmt: skip
    args = _config([*argv, "--space", "mag=choice:5x,10x"])
    base = base_config(args)
    assert apply_hparams(base, {"mag": "10x"}, {"workers": 1}).model.mag == "10x"
    assert apply_hparams(base, {"student_mag": "10x"}, {"workers": 1}).model.mag == "10x"
    with pytest.raises(ValueError, match="cannot tune 'label_smoothing' for the distill"):
        apply_hparams(base, {"label_smoothing": 0.1}, {"workers": 1})
    args = _config([*argv, "--space", "mag=5x,student_mag=choice:5x,10x"])
    with pytest.raises(UsageError, match="name the same setting"):
        build_space(args, "distill")
    args = _config([*argv, "--supervised"])
    assert set(build_space(args, "supervised")) == {"lr", "weight_decay", "label_smoothing"}
    supervised = apply_hparams(base_config(args), {"label_smoothing": 0.1}, {"workers": 1})
    assert supervised.loss.label_smoothing == 0.1


# ---------------------------------------------------------------------------------------------
# Ray Tune runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_asha_stops_weak_trials_and_best_json_loads(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """Two good learning rates start first (max 2 at once); the two tiny ones reach the first
    rung after them, rank in the bottom half and are stopped there (grace period 1). An epoch is
    the whole training split (7 steps), so a good rate has learnt by the first rung: the mean
    loss of a 3-step epoch was decided by which samples were drawn, not by the rate."""
    from resdistill.checkpoint import load_model

    best_json = tmp_path / "best.json"
    argv = _argv(str(tiny_dataset), trained_teacher, tmp_path / "runs", "asha",
                 "--address", ray_cluster, "--scheduler", "asha", "--epochs", "3",
                 "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "2",
                 "--select", "metric", "--metric", "train_loss", "--mode", "min",
                 "--num-samples", "1",
                 "--space", f"lr=grid:{GOOD},{GOOD * 0.5},{WEAK},{WEAK}",
                 "--best-json", str(best_json), "--steps-per-epoch", "7")  # fmt: skip
    summary = tune_run(_config(argv))
    assert len(summary.trials) == 4
    by_lr: dict[float, list[TrialRow]] = {}
    for row in summary.trials:
        by_lr.setdefault(row.config["lr"], []).append(row)
    weak = by_lr[WEAK]
    assert [r.epochs for r in weak] == [1, 1] and {r.status for r in weak} == {"stopped"}
    assert max(r.epochs for r in summary.trials) == 3  # the first good trial ran to the end
    best = summary.best
    assert best is not None and best["config"]["lr"] in (GOOD, GOOD * 0.5)
    assert best["metric"] == "train_loss" and best["value"] == min(r.best for r in summary.trials)
    # --select metric: the validation slides are counted, though train_loss reads none
    n_val = base_config(_config(argv)).plan.n_val_slides
    assert (best["select"], best["labelled_val_slides"]) == ("metric", n_val) and n_val >= 1
    doc = json.loads(best_json.read_text())
    assert doc["checkpoint"] == best["checkpoint"] and doc["config"]["lr"] == best["config"]["lr"]
    assert doc["checkpoint"].startswith(str(tmp_path / "runs" / "asha"))
    model = load_model(str(best_json))
    assert model.mag == "5x" and list(model.classes) == ["benign", "tumor"]
    assert (
        load_checkpoint(doc["checkpoint"], TRAINER_FILE)["config"]["optim"]["lr"]
        == best["config"]["lr"]
    )


@pytest.mark.slow
def test_pbt_exploit_continues_from_the_donors_checkpoint(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """Two trials in synchronous PBT, ranked by their (constant) learning rate so the ranking is
    deterministic (a 3-step train loss is noise): at epoch 2 the tiny-lr trial is the bottom half,
    copies the other's checkpoint and carries on from the donor's epoch, step and history."""
    runs = tmp_path / "runs"
    argv = _argv(str(tiny_dataset), trained_teacher, runs, "pbt",
                 "--address", ray_cluster, "--scheduler", "pbt", "--epochs", "4",
                 "--perturbation-interval", "2", "--pbt-quantile", "0.5", "--pbt-synch",
                 "--max-concurrent", "2", "--select", "metric", "--metric", "lr", "--mode", "max",
                 "--num-samples", "1",
                 "--tune-seed", "0", "--keep-trial-checkpoints", "8",
                 "--space", f"lr=grid:{GOOD},{WEAK}", "--space", "temperature=choice:1,2,4")  # fmt: skip
    summary = tune_run(_config(argv))
    assert len(summary.trials) == 2 and all(r.epochs == 4 for r in summary.trials)
    # the table names each trial once, by its own id (not the donor's it ended as a copy of)
    assert len({r.trial for r in summary.trials}) == 2
    exp = runs / "pbt"
    # Every (re)start of a trial is its own Train run, ``_train/<trial id>-<suffix>``; the state in
    # its checkpoints lists the checkpoints it was restored from. (Tune's result.json is no
    # record: a restarted trial's file is replaced by the last copy synced to storage.)
    # Only checkpoints Train registered count: a run stopped while it persisted one leaves a
    # partial folder behind, which its snapshot never names.
    exploits = []  # (run folder, the run's newest state, the copied checkpoint it started from)
    for run in sorted((exp / "_train").iterdir()):
        snapshot = run / "checkpoint_manager_snapshot.json"
        if not snapshot.exists():  # a restart that had no epochs left to train
            continue
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        own = load_checkpoint(str(run / latest), TRAINER_FILE)["state"]
        if not own["restored_from"]:
            continue
        start = own["restored_from"][-1]
        donor_trial = trial_id_of(str(Path(start).parent))
        if not start.startswith(str(run) + os.sep) and donor_trial != run.name.split("-")[0]:
            exploits.append((run, own, start))
    assert exploits, "no trial restarted from another trial's checkpoint"
    for _run, own, start in exploits:
        donor = load_checkpoint(start, TRAINER_FILE)["state"]
        assert donor["epoch"] == 2 and own["epoch"] == 4
        # the restarted run went on from the donor's epoch and step (3 steps an epoch) ...
        assert own["step"] == donor["step"] + 3 * (own["epoch"] - donor["epoch"])
        # ... and carries the donor's history, restore count and lineage
        assert own["history"][: donor["epoch"]] == donor["history"]
        assert len(own["history"]) == own["epoch"]
        assert own["resumes"] == donor["resumes"] + 1
        assert own["restored_from"] == [*donor["restored_from"], start]


@pytest.mark.slow
def test_tuner_restore_continues_an_interrupted_run(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """The driver is killed while the second of two trials runs; ``--resume`` finishes the run
    without rerunning the trial that had completed."""
    runs = tmp_path / "runs"
    argv = _argv(str(tiny_dataset), trained_teacher, runs, "res", "--scheduler", "fifo",
                 "--epochs", "2", "--max-concurrent", "1", "--num-samples", "1",
                 "--space", "lr=grid:0.003,0.001")  # fmt: skip
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, TUNE_GLOBAL_CHECKPOINT_S="0")
    log = (tmp_path / "driver.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "resdistill.tune", *argv], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    exp = runs / "res"

    def states() -> dict[str, str]:
        """trial id -> status, from the newest experiment state Tune has written."""
        found: dict[str, str] = {}
        for f in sorted(exp.glob("experiment_state-*.json")) if exp.exists() else []:
            try:
                doc = json.loads(f.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            for trial in doc.get("trial_data", []):
                state = json.loads(trial[0])
                found[state["trial_id"]] = state["status"]
        return found

    def one_done_next_running() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "driver.log").read_text()[-3000:])
        s = states()
        statuses = list(s.values())
        return s if statuses.count("TERMINATED") == 1 and "RUNNING" in statuses else None

    try:
        before = wait_for(
            one_done_next_running, timeout=300, interval=0.2, what="one finished trial"
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    # The kill ends the driver before Tune writes a final done=true row: completion is the
    # experiment state's TERMINATED plus every epoch reported.
    (done_id,) = [tid for tid, status in before.items() if status == "TERMINATED"]
    done_rows = _results(_trial_dirs(exp)[done_id])
    assert [r["epoch"] for r in done_rows] == [1, 2], done_rows
    done_before = {done_id: len(done_rows)}
    train_runs_before = sorted(p.name for p in (exp / "_train").iterdir())

    args = _config([*argv, "--resume", "--address", ray_cluster])
    summary = tune_run(args)
    assert summary.resumed
    assert len(summary.trials) == 2 and all(
        r.epochs == 2 and r.status == "done" for r in summary.trials
    )
    dirs = _trial_dirs(exp)
    assert len(dirs) == 2
    assert len(_results(dirs[done_id])) == done_before[done_id]  # not rerun
    train_runs_after = sorted(p.name for p in (exp / "_train").iterdir())
    assert [p for p in train_runs_after if p.startswith(done_id)] == [
        p for p in train_runs_before if p.startswith(done_id)
    ]
    assert sorted(r.config["lr"] for r in summary.trials) == [0.001, 0.003]
    # distillation trials were ranked without labels, by the loss every epoch reported
    assert (summary.select, summary.metric, summary.labelled_val_slides) == (
        "distill-loss", "val_distill_loss", 0)  # fmt: skip
    assert all(r.best is not None and r.best > 0 for r in summary.trials)
    assert summary.best is not None and summary.best["value"] == min(r.best for r in summary.trials)


def test_teacher_mode_tunes_the_teachers_config(tiny_dataset: Path) -> None:
    args = _config(
        ["--data", str(tiny_dataset), "--teacher-mode", "--batch-size", "8", "--workers", "1",
         "--space", "label_smoothing=choice:0,0.1,mag=choice:10x,5x"])  # fmt: skip
    base = base_config(args)
    assert base.stage == "teacher" and base.model.mag == "10x"
    space = build_space(args, "teacher")
    assert space["mag"] == Domain("choice", ("10x", "5x")) and "temperature" not in space
    check_space(space, base, args)
    cfg = apply_hparams(base, {"mag": "5x", "label_smoothing": 0.1, "lr": 0.002}, {"workers": 1})
    assert (cfg.model.mag, cfg.loss.label_smoothing, cfg.optim.lr) == ("5x", 0.1, 0.002)
    with pytest.raises(ValueError, match="cannot tune 'temperature' for the teacher"):
        apply_hparams(base, {"temperature": 2}, {"workers": 1})
