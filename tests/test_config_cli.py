"""One declaration per option: the CLI, a YAML file and a config built in Python agree.

The generated parser writes no defaults of its own (every option's argparse default is
SUPPRESS, so the field's default is the only one), every option has a help line, and a run's
``config.yaml`` read back through ``--config`` reproduces the run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from resdistill.cli import COMMANDS, build_parser
from resdistill.commands import distill, teacher
from resdistill.commands.generate import leaves, parse, show_value
from resdistill.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TeacherRef,
    TrainConfig,
)
from resdistill.fields import ConfigError
from resdistill.run_config import read_config_file

pytestmark = pytest.mark.timeout(600)


def _specs() -> list:
    out = []
    for module, _ in COMMANDS.values():
        spec = getattr(importlib.import_module(module), "SPEC", None)
        if spec is not None:
            out.append(spec)
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: s.name)
def test_every_cli_default_is_its_fields(spec) -> None:
    """No option carries an argparse default: the value comes from the field (or the spec's
    preset), and the "(default: X)" its help shows is that value (a None default is derived,
    and the help says from what)."""
    parser = _subparsers()[spec.name]
    by_flag = {a.option_strings[0] if a.option_strings else a.dest: a for a in parser._actions}
    for leaf in leaves(spec):
        action = by_flag.get(leaf.flag) or by_flag.get("cfg:" + leaf.path)
        assert action is not None, leaf.flag
        assert action.default is argparse.SUPPRESS, leaf.flag
        assert action.help and action.help.strip(), f"{spec.name} {leaf.flag} has no help"
        shown = re.search(r"\(default: ([^)]*)\)$", action.help)
        value = spec.fixed.get(leaf.path, spec.defaults.get(leaf.path, leaf.field.default))
        if shown and value not in (None, "", ()) and "by stage" not in action.help:
            assert shown.group(1) == show_value(value), leaf.flag


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_reads_as_help(name: str, capsys: pytest.CaptureFixture) -> None:
    """Plain text (no reStructuredText roles or double backticks), at most 100 columns, an
    example spelt ``resdistill <command>``."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    text = capsys.readouterr().out
    assert ":mod:" not in text and "``" not in text and ":func:" not in text
    assert max(len(line) for line in text.splitlines()) <= 100
    if getattr(importlib.import_module(COMMANDS[name][0]), "SPEC", None) is not None:
        assert f"resdistill {name} " in text.split("examples:")[-1]


def test_one_training_option_agrees_in_cli_yaml_and_python(tmp_path: Path) -> None:
    """``--temperature``: the flag, the YAML key ``loss.temperature`` and ``LossConfig``."""
    base = ["--data", "/ds", "--teacher", "/t1", "--student-mag", "2.5x"]
    from_cli = parse(distill.SPEC, [*base, "--temperature", "2"])
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"loss": {"temperature": 2}}))
    from_yaml = parse(distill.SPEC, [*base, "--config", str(file)])
    from_python = TrainConfig(
        "distill", DataConfig(url="/ds"), model=ModelConfig(mag="2.5x"),
        loss=LossConfig(temperature=2.0), teacher=TeacherRef(checkpoint="/t1"),
    )  # fmt: skip
    assert from_cli == from_yaml == from_python
    # flags override the file; the stage preset applies to both
    assert parse(distill.SPEC, [*base, "--config", str(file), "--temperature", "3"]).loss == (
        LossConfig(temperature=3.0)
    )
    assert from_python.data.jitter == (0.0, 0.0, 0.0, 0.0)
    assert (
        parse(teacher.SPEC, ["--data", "/ds"]).data.jitter
        == TrainConfig("teacher", DataConfig(url="/ds")).data.jitter
    )


def test_print_config_reads_back_equal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--data", "/ds", "--teacher", "/t1", "--student-mag", "5x", "--supervised",
            "--batch-size", "16", "--no-flips", "--hed-jitter", "0.05"]  # fmt: skip
    cfg = parse(distill.SPEC, argv)
    with pytest.raises(SystemExit) as done:
        parse(distill.SPEC, [*argv, "--print-config"])
    assert done.value.code == 0
    file = tmp_path / "printed.yaml"
    file.write_text(capsys.readouterr().out)
    again = parse(distill.SPEC, ["--config", str(file)])
    assert again == cfg and again.stage == "supervised" and not again.data.flips
    assert again.teacher is not None and again.teacher.evaluate is False  # a baseline's


def test_bad_values_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--data", "/ds"]
    for extra, words in ((["--batch-size", "0"], "--batch-size"),
                         (["--optimizer", "rmsprop"], "--optimizer"),
                         (["--label-fraction", "1.5"], "--label-fraction"),
                         (["--jitter", "0.1,0.1,0.1,0.1,0.1"], "--jitter")):  # fmt: skip
        assert teacher.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1], err
    file = tmp_path / "typo.yaml"
    file.write_text("optim: {epoch: 3}\n")
    assert teacher.main([*base, "--config", str(file)]) == 2
    assert "epoch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        OptimConfig(epochs=0)


@pytest.mark.slow
def test_config_yaml_reproduces_a_teacher_run(
    tiny_dataset: Path, tmp_path: Path, ray_cluster: str
) -> None:
    """A run's config.yaml given to --config (with a new name) resolves to the same config and
    learns the same first epoch (one worker, in-process loading: deterministic on the CPU)."""
    from resdistill.commands.training import train

    argv = ["--data", str(tiny_dataset), "--storage", str(tmp_path / "runs"), "--name", "a",
            "--workers", "1", "--loader-workers", "0", "--batch-size", "8", "--epochs", "1",
            "--steps-per-epoch", "3", "--arch", "resnet-small", "--address", ray_cluster]  # fmt: skip
    cfg = parse(teacher.SPEC, argv)
    first = train(cfg)
    written = tmp_path / "runs" / "a" / "config.yaml"
    doc = yaml.safe_load(written.read_text())
    assert doc["resdistill"]["version"] and doc["resdistill"]["command"] == "teacher"
    assert len(doc["dataset"]["fingerprint"]) == 16
    again_cfg = parse(teacher.SPEC, ["--config", str(written), "--name", "b"])
    assert replace(again_cfg, run=replace(again_cfg.run, name="a")) == replace(
        cfg, data=replace(cfg.data, url=str(Path(cfg.data.url).resolve()))
    )
    assert read_config_file(str(written))["run"]["name"] == "a"
    meta = json.loads((Path(first.latest_checkpoint) / "meta.json").read_text())
    assert meta["config"]["optim"]["epochs"] == 1 and "plan" not in meta["config"]
    assert meta["resdistill"]["version"] == doc["resdistill"]["version"]
    again = train(again_cfg)
    assert again.last_metrics["train_loss"] == pytest.approx(first.last_metrics["train_loss"])


def test_the_losses_take_the_configs_defaults() -> None:
    """The KD temperature (and every loss weight) defaults to the config's, not a second 1."""
    from resdistill.losses import DistillLoss, KDLoss

    cfg = LossConfig()
    assert KDLoss().temperature == cfg.temperature
    loss = DistillLoss()
    assert (loss.kd.temperature, loss.kd_weight, loss.feature_weight) == (
        cfg.temperature, cfg.kd_weight, cfg.feature_weight)  # fmt: skip


def test_every_command_picks_the_device_by_one_rule() -> None:
    """``--device auto|cpu|cuda`` everywhere: auto is cuda when GPUs are there (a teacher used
    to train on the CPU of a GPU machine unless --gpu was given); --gpu is --device cuda."""
    from resdistill.config import resolve_device
    from resdistill.errors import UsageError
    from resdistill.eval.config import EvaluateConfig
    from resdistill.predict.config import PredictConfig
    from resdistill.study.config import StudyConfig

    run = parse(teacher.SPEC, ["--data", "/ds"]).run
    assert run.device == "auto" and resolve_device(run.device, 4) == "cuda"
    assert resolve_device(run.device, 0) == "cpu"
    assert parse(teacher.SPEC, ["--data", "/ds", "--gpu"]).run.device == "cuda"
    assert (
        parse(distill.SPEC, ["--data", "/ds", "--student-mag", "5x", "--device", "cpu"]).run.device
        == "cpu"
    )
    fields_default = {PredictConfig.__dataclass_fields__["device"].default,
                      EvaluateConfig.__dataclass_fields__["device"].default,
                      StudyConfig.__dataclass_fields__["device"].default}  # fmt: skip
    assert fields_default == {"auto"}
    with pytest.raises(UsageError, match="--device cuda"):
        resolve_device("cuda", 0)
    with pytest.raises(ConfigError, match="--device"):
        replace(run, device="tpu")
