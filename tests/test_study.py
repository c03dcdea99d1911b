"""``resdistill study``: the claims' rules on hand-made numbers, the unlabelled share's slide
choice, and a two-cell study through Ray Tune on a local cluster, resumed without rerunning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from resdistill.checkpoint import TRAINER_FILE, load_checkpoint
from resdistill.cli import main as cli_main
from resdistill.commands import distill, study, teacher
from resdistill.commands.generate import parse
from resdistill.data import read_manifest, select_train_slides
from resdistill.fields import ConfigError
from resdistill.study.cells import CellOptions, cell_config
from resdistill.study.claims import approach, beats, judge, rises
from resdistill.study.config import StudyConfig
from resdistill.study.grid import Cell, Grid
from resdistill.study.overrides import train_options
from resdistill.train.preflight import prepare
from tests.test_distill import trained_teacher  # noqa: F401 - module fixture: a tiny teacher

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------------------------
# The claims' rules, no cluster
# ---------------------------------------------------------------------------------------------


def test_claim_rules_on_hand_made_numbers() -> None:
    assert approach("2.5x", 0.94, 0.955, 16).holds  # 1.5 points under: within 2
    assert not approach("2.5x", 0.93, 0.955, 16).holds  # 2.5 points under
    assert approach("1.25x", 0.97, 0.955, 64).holds  # above the teacher
    assert beats("2.5x", 0.93, 0.85, 0.02, 0.14).holds
    assert not beats("2.5x", 0.90, 0.85, -0.01, 0.11).holds  # the CI reaches 0
    rising = [(0.0, 0.80, 0.01), (0.25, 0.84, 0.01), (0.5, 0.86, 0.01), (1.0, 0.90, 0.01)]
    assert rises("c", rising).holds
    noisy = [(0.0, 0.80, 0.005), (0.25, 0.845, 0.005), (0.5, 0.838, 0.005), (1.0, 0.90, 0.005)]
    assert rises("c", noisy).holds  # a 0.7-point dip is within the 1-point noise floor
    assert not rises("c", [(0.0, 0.80, 0.01), (0.5, 0.86, 0.01), (1.0, 0.82, 0.01)]).holds
    assert not rises("c", [(0.0, 0.80, 0.05), (1.0, 0.84, 0.05)]).holds  # rise within noise
    claims = judge([approach("2.5x", 0.94, 0.955, 16), approach("1.25x", 0.9, 0.955, 64)], [],
                   [rises("c", rising)])  # fmt: skip
    assert [c.word for c in claims] == ["does not hold", "not tested", "holds"]


def test_grid_cells() -> None:
    grid = Grid("10x", ("5x", "2p5x"), (1.0, 0.1), (0.0, 1.0), (0, 1), given={1.0: "ckpt"})
    kinds = [c.kind for c in grid.cells()]
    assert kinds.count("teacher") == 2  # fraction 0.1 x 2 seeds; the fraction-1 one is given
    assert kinds.count("baseline") == 2 * 2 * 2  # no unlabelled-share axis
    assert kinds.count("distilled") == 2 * 2 * 2 * 2
    assert len({c.id for c in grid.cells()}) == len(grid.cells())
    cell = Cell("distilled", "2p5x", 0.1, 1, 0.5)
    assert grid.teacher_of(cell) == Cell("teacher", "10x", 0.1, 1)
    assert grid.teacher_of(Cell("distilled", "2p5x", 1.0, 1, 0.5)) is None


def test_unlabelled_share_keeps_the_labelled_slides_and_nests() -> None:
    slides = [f"s{i}" for i in range(12)]
    labels = ["a", "b"] * 4 + [None] * 4
    manifest = pa.table({"slide": slides, "split": ["train"] * 8 + ["unlabeled"] * 4,
                         "label": labels})  # fmt: skip
    splits = ["train", "unlabeled"]
    assert select_train_slides(manifest, splits, 1.0) is None
    assert select_train_slides(manifest, splits, 0.0) == sorted(slides[:8])
    labelled = ["s0", "s1"]  # a 25% teacher's slides: the other six train slides are unlabelled
    prev: set[str] = set(labelled)
    for share in (0.0, 0.25, 0.5, 1 - 1e-9):
        got = set(select_train_slides(manifest, splits, share, seed=3, labelled_slides=labelled))
        assert prev <= got and len(got) == 2 + round(share * 10)
        prev = got


def test_study_options_from_flags_yaml_and_python(tmp_path: Path) -> None:
    """The flags, a --config file and StudyConfig agree; the training overrides are the
    training commands' flags, nested as the TrainConfig."""
    argv = ["--teacher", "ckpt1", "--teacher", "0.1=ckpt0.1", "--label-fractions", "1,0.5",
            "--student-args", "--temperature 2 --no-flips --jitter 0.1,0.1,0.1,0"]  # fmt: skip
    from_cli = parse(study.SPEC, argv)
    expected = StudyConfig(
        teacher=("ckpt1", "0.1=ckpt0.1"), label_fractions=(1.0, 0.5),
        student_args={"loss": {"temperature": 2.0},
                      "data": {"flips": False, "jitter": (0.1, 0.1, 0.1, 0.0)}},
    )  # fmt: skip
    assert from_cli == expected
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({"teacher": ["ckpt1", "0.1=ckpt0.1"], "label_fractions": [1, 0.5],
                                    "student_args": "--temperature 3", "quick": True}))  # fmt: skip
    from_yaml = parse(study.SPEC, ["--config", str(file), "--student-args", "--temperature 2"])
    assert from_yaml.student_args == {"loss": {"temperature": 2.0}}  # the flag wins
    assert from_yaml.teacher == expected.teacher and from_yaml.quick
    assert (from_yaml.grid_seeds, from_yaml.shares) == (1, (0.0, 1.0))  # --quick's
    assert parse(study.SPEC, ["--config", str(file)]).student_args == {"loss": {"temperature": 3.0}}
    assert (StudyConfig().grid_seeds, StudyConfig().shares) == (3, (0.0, 0.25, 0.5, 1.0))
    for bad, words in (({"label_fractions": (0.0,)}, "--label-fractions 0 is not in (0, 1]"),
                       ({"seeds": 0}, "--seeds must be at least 1"),
                       ({"data": "/ds", "cohort": "sites"}, "--cohort picks"),
                       ({"student_args": "--bogus 1"}, "--student-args: unknown option"),
                       ({"teacher_args": "--jitter 0.5,0.5,0.5,0.2,1"}, "1 to 4 numbers"),
                       ({"student_args": {"loss": {"temprature": 2}}}, "temprature")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(words)):
            StudyConfig(**bad)
    assert train_options("--compile --no-teacher-eval --hed-jitter=0.05") == {
        "speed": {"compile": "inductor"}, "teacher": {"evaluate": False},
        "data": {"hed_jitter": (0.05, 0.05)},
    }  # fmt: skip


def test_cells_are_the_training_commands_configs(
    tiny_dataset: Path,
    trained_teacher: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A cell's config is the one ``resdistill teacher`` / ``distill`` make of the same
    options, the study's overrides last (built directly, no command line in between)."""
    data, storage = str(tiny_dataset), str(tmp_path / "runs")
    cfg = StudyConfig(data=data, arch="resnet18", batch_size=8, epochs=2, student_epochs=3,
                      teacher_args="--jitter 0.5,0.5,0.5,0.2",
                      student_args="--temperature 2 --steps-per-epoch 2")  # fmt: skip
    opts = CellOptions(data, storage, teacher_steps=5, student_steps=7)
    common = ["--data", data, "--storage", storage, "--arch", "resnet18", "--batch-size", "8",
              "--workers", "1", "--cpus-per-worker", "0.9", "--loader-workers", "1"]  # fmt: skip

    t = Cell("teacher", "10x", 0.5, 1)
    assert cell_config(t, cfg, opts, "x") == prepare(parse(teacher.SPEC, [
        *common, "--name", f"x-{t.id}", "--seed", "1", "--mag", "10x", "--epochs", "2",
        "--label-fraction", "0.5", "--steps-per-epoch", "5", "--jitter", "0.5,0.5,0.5,0.2",
    ]))  # fmt: skip
    student = [*common, "--seed", "0", "--student-mag", "5x", "--epochs", "3",
               "--temperature", "2", "--steps-per-epoch", "2"]  # fmt: skip
    b = Cell("baseline", "5x", 0.5, 0)
    baseline = cell_config(b, cfg, opts, "x")
    assert baseline == prepare(parse(distill.SPEC, [
        *student, "--name", f"x-{b.id}", "--supervised", "--label-fraction", "0.5"]))  # fmt: skip
    assert baseline.data.jitter == (0.0, 0.0, 0.0, 0.0)  # the student's preset, not the teacher's
    d = Cell("distilled", "5x", 0.5, 0, 0.5)
    distilled = cell_config(d, cfg, opts, "x", trained_teacher)
    assert distilled == prepare(parse(distill.SPEC, [
        *student, "--name", f"x-{d.id}", "--teacher", trained_teacher, "--no-teacher-eval",
        "--label-fraction", "0.5", "--unlabelled-share", "0.5"]))  # fmt: skip
    assert distilled.loss.temperature == 2.0 and distilled.plan.steps_per_epoch == 2


# ---------------------------------------------------------------------------------------------
# Through Ray Tune on the local cluster
# ---------------------------------------------------------------------------------------------


def test_two_cell_study_writes_the_report_and_resumes(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "study"
    argv = ["study", "--data", str(tiny_dataset), "--teacher", trained_teacher, "--out", str(out),
            "--student-mags", "5x", "--label-fractions", "1", "--unlabelled-shares", "0.5",
            "--seeds", "1", "--epochs", "1", "--student-epochs", "1", "--batch-size", "8",
            "--loader-workers", "0", "--student-args", "--shuffle-buffer 16 --steps-per-epoch 2",
            "--address", ray_cluster]  # fmt: skip
    assert cli_main(argv) == 0
    cells = sorted(p.stem for p in (out / "cells").glob("*.json"))
    # the two cells run, and the given teacher scored beside them
    assert cells == ["baseline-5x-l1-s0", "distilled-5x-l1-u0.5-s0", "teacher-10x-l1-s0"]
    for name in ("study.csv", "study.parquet", "summary.md", "accuracy_vs_flops.png",
                 "accuracy_vs_unlabeled.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    for n in (1, 2, 3):
        assert f"\n{n}. **" in summary
    assert (
        "Rule:" in summary
        and "2.5x" not in summary
        and "| distilled | 5x | 100% | 50% |" in summary
    )
    record = json.loads((out / "cells" / "distilled-5x-l1-u0.5-s0.json").read_text())
    assert (
        0 <= record["accuracy"]["low"] <= record["accuracy"]["value"] <= record["accuracy"]["high"]
    )
    # the distilled cell read the labelled train slides and half of the unlabelled ones
    config = load_checkpoint(record["checkpoint"], TRAINER_FILE)["config"]
    manifest = read_manifest(str(tiny_dataset), columns=["slide", "split"]).to_pydict()
    train = {s for s, sp in zip(manifest["slide"], manifest["split"], strict=True) if sp == "train"}
    unl = {
        s for s, sp in zip(manifest["slide"], manifest["split"], strict=True) if sp == "unlabeled"
    }
    read = set(config["plan"]["train_slides"])
    assert train <= read and len(read & unl) == round(0.5 * len(unl))
    assert config["data"]["unlabelled_share"] == 0.5
    experiments = sorted(p.name for p in (out / "runs").iterdir())
    assert len(experiments) == 1 and experiments[0].startswith("study-students-")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        written["resdistill"]["command"] == "study" and len(written["dataset"]["fingerprint"]) == 16
    )
    assert written["config"]["student_args"]["data"] == {"shuffle_buffer": 16, "steps_per_epoch": 2}

    # a rerun without --resume refuses; with it, nothing is trained again
    assert cli_main(argv) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert cli_main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == experiments
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
