"""``resdistill study``: the claims' rules on hand-made numbers, the unlabelled share's slide
choice, and a two-cell study through Ray Tune on a local cluster, resumed without rerunning."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
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
from resdistill.measures.paired import Estimate
from resdistill.study.cells import CellOptions, cell_config
from resdistill.study.claims import beats_control, gain, judge, non_inferior, rises
from resdistill.study.config import StudyConfig
from resdistill.study.grid import Cell, Grid
from resdistill.study.overrides import train_options
from resdistill.train.preflight import prepare

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------------------------
# The claims' rules, no cluster
# ---------------------------------------------------------------------------------------------


def _est(value: float, low: float | None, high: float | None, why: str | None = None) -> Estimate:
    return Estimate("accuracy", value, low, high, why, 0.05, 1000, "patient", 30, 1, (3, 3),
                    True, True)  # fmt: skip


def test_claim_rules_on_hand_made_intervals() -> None:
    # 1: non-inferiority, the lower bound of (distilled - teacher) above -2 points
    assert non_inferior("2.5x", _est(-0.005, -0.015, 0.004), 16).holds
    wide = non_inferior("2.5x", _est(-0.005, -0.025, 0.015), 16)
    assert not wide.holds and "bar met by the estimate" in wide.detail  # the estimate alone would
    assert "-0.5 points, 95% CI [-2.5, +1.5]" in wide.detail
    assert not non_inferior("1.25x", _est(0.01, None, None, "too few units"), 64).holds
    # 2: superiority by 3 points, the lower bound of (distilled - baseline) at least +3
    assert gain("2.5x", _est(0.06, 0.035, 0.08)).holds
    short = gain("2.5x", _est(0.05, 0.01, 0.09))
    assert not short.holds and "bar met" in short.detail
    assert not gain("2.5x", _est(0.02, 0.01, 0.03)).holds
    # 3: over four shares every step non-inferior (1 point) and the whole rise above 0
    shares = [0.0, 0.25, 0.5, 1.0]
    step, rise = _est(0.01, -0.005, 0.02), _est(0.03, 0.01, 0.05)
    assert rises("c", shares, [step] * 3, rise).holds
    dip = _est(-0.004, -0.015, 0.007)  # a dip whose interval allows a 1.5-point drop
    assert not rises("c", shares, [step, dip, step], rise).holds
    flat = rises("c", shares, [step] * 3, _est(0.01, -0.01, 0.03))
    assert not flat.holds and "bar met" in flat.detail  # non-decreasing, no rise shown
    two = rises("c", [0.0, 1.0], [rise], rise)
    assert two.holds is None and "needs 4" in two.detail
    # 4: (distilled - control) above 0
    assert beats_control("2.5x", "self-training", _est(0.02, 0.005, 0.04)).holds
    assert not beats_control("2.5x", "self-training", _est(0.02, -0.005, 0.04)).holds
    claims = judge([non_inferior("2.5x", _est(0, -0.01, 0.01), 16), wide], [], [two])
    assert [c.word for c in claims] == ["does not hold", "not tested", "not tested"]
    assert [c.number for c in claims] == [1, 2, 3]  # no controls, no claim 4
    assert judge([], [], [], [])[3].word == "not tested"


def _records(plan: dict[tuple, list[float]]) -> dict[str, dict]:
    """Cell records on 12 test slides of 6 patients (two slides each, one class per patient),
    10 tiles per slide; ``plan[(kind, mag, fraction, share)]`` gives each seed's accuracy, the
    same on every slide (its first tiles wrong)."""
    from dataclasses import asdict

    out = {}
    for (kind, mag, fraction, share), accs in plan.items():
        for seed, acc in enumerate(accs):
            cell = Cell(kind, mag, fraction, seed, share)
            keys, slides, units, labels, preds = [], [], [], [], []
            for s in range(12):
                for t in range(10):
                    label = (s // 2) % 2
                    keys.append(f"s{s:02d}_{t}_0")
                    slides.append(f"s{s:02d}")
                    units.append(f"P{s // 2}")
                    labels.append(label)
                    preds.append(label if t >= round(10 * (1 - acc)) else 1 - label)
            slide_preds = [labels[10 * s] if acc > 0.5 else 1 - labels[10 * s] for s in range(12)]
            out[cell.id] = {
                "cell": asdict(cell), "flops": 4_000_000 if kind == "teacher" else 250_000,
                "keys": keys, "slides": slides, "units": units, "unit": "patient",
                "labels": labels, "preds": preds,
                "correct": [int(a == b) for a, b in zip(labels, preds, strict=True)],
                "slide_level": {"slides": sorted(set(slides)), "units": [f"P{s // 2}" for s in
                                range(12)], "labels": labels[::10], "preds": slide_preds},
            }  # fmt: skip
    return out


def test_study_claims_from_records_with_known_answers(tmp_path: Path) -> None:
    """Cells whose accuracies are set seed by seed: the paired differences are exact, and each
    claim's verdict, rule and interval reach summary.md; a claim that fails is written so."""
    from resdistill.study.results_table import build_rows, check_claims, write_report

    plan = {
        ("teacher", "10x", 1.0, None): [0.9, 0.9, 0.9],
        ("teacher", "10x", 0.1, None): [0.8, 0.8, 0.8],
        ("baseline", "2p5x", 1.0, None): [0.8, 0.8, 0.8],
        ("baseline", "2p5x", 0.1, None): [0.6, 0.7, 0.6],
        **{("distilled", "2p5x", 1.0, u): [0.8 + 0.1 * u] * 3 for u in (0.0, 0.25, 0.5, 1.0)},
        **{("distilled", "2p5x", 0.1, u): [0.7 + 0.1 * u] * 3 for u in (0.0, 0.25, 0.5, 1.0)},
        ("self-training", "2p5x", 0.1, 1.0): [0.7, 0.7, 0.7],
    }
    records = _records(plan)
    rows = build_rows(records)
    claims = check_claims(rows, records)
    assert [c.word for c in claims] == ["holds", "holds", "holds", "holds"]
    (v1,) = claims[0].verdicts
    assert "+0.0 points, 95% CI [+0.0, +0.0]" in v1.detail and "6 patients" in v1.detail
    assert "slide level: distilled - teacher +0.0 points" in v1.detail
    (v2,) = claims[1].verdicts  # 0.8 - mean(0.6, 0.7, 0.6): the seeds vary, so the interval
    assert "+16.7 points, 95% CI [+10.0, +20.0]" in v2.detail
    assert "3 paired runs per arm" in v2.detail
    dist = next(r for r in rows if r.kind == "distilled" and r.label_fraction == 1.0
                and r.unlabelled_share == 1.0)  # fmt: skip
    assert (dist.accuracy, dist.accuracy_low, dist.accuracy_high) == pytest.approx((0.9,) * 3)
    assert dist.macro_f1 == pytest.approx(0.9) and dist.slide_accuracy == 1.0
    assert (dist.unit, dist.units, dist.seeds) == ("patient", 6, 3)
    # a student 10 points under its teacher does not approach it: written as not holding
    plan[("distilled", "2p5x", 1.0, 1.0)] = [0.8] * 3
    write_report(_records(plan), tmp_path, "header")
    summary = (tmp_path / "summary.md").read_text()
    assert (
        "1. **students at 4x/16x/64x fewer FLOPs approach the teacher: does not hold.**" in summary
    )
    assert "   - 2.5x: does not hold; 16x fewer FLOPs: distilled - teacher -10.0 points" in summary
    assert "Rule: with all labels and every unlabelled slide, the lower bound" in summary
    assert "two-level bootstrap resamples of the test patients" in summary
    assert "| distilled | 2.5x | 100% | 100% | 3 | 0.800 [0.800, 0.800] |" in summary


def test_records_without_labels_still_give_accuracy_verdicts() -> None:
    """A study resumed from records written before they kept labels: those cells (and any
    comparison with them) are read from each tile's correctness, by slide, accuracy only."""
    from resdistill.study.results_table import build_rows, check_claims

    records = _records({("teacher", "10x", 1.0, None): [0.9, 0.9],
                        ("distilled", "2p5x", 1.0, 1.0): [0.9, 0.8]})  # fmt: skip
    for r in records.values():
        if r["cell"]["kind"] == "teacher":
            for key in ("labels", "preds", "units", "unit", "slide_level"):
                del r[key]
    rows = build_rows(records)
    teacher = next(r for r in rows if r.kind == "teacher")
    assert teacher.accuracy == pytest.approx(0.9) and teacher.unit == "slide"
    assert math.isnan(teacher.macro_f1) and math.isnan(teacher.slide_accuracy)
    (check,) = check_claims(rows, records)[0].verdicts
    assert not check.holds and "-5.0 points, 95% CI [-10.0, +0.0]" in check.detail
    assert "12 slides" in check.detail and "slide level" not in check.detail


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
    assert grid.teacher_of(Cell("baseline", "2p5x", 1.0, 1)) is None


def test_grid_controls_share_teachers_and_arms_share_recipes() -> None:
    grid = Grid("10x", ("2p5x",), (1.0, 0.1), (0.0, 1.0), (0, 1, 2),
                controls=("same-res", "self-training"))  # fmt: skip
    kinds = [c.kind for c in grid.cells()]
    for kind in ("same-res-teacher", "same-res-distilled", "self-training"):
        assert kinds.count(kind) == 2 * 3  # fractions x seeds, at one share
    assert {c.unlabelled_share for c in grid.cells() if c.kind == "self-training"} == {1.0}
    # self-training learns from the baseline cell of its labels and seed: no new teacher
    st = Cell("self-training", "2p5x", 0.1, 2, 1.0)
    assert grid.teacher_of(st) == Cell("baseline", "2p5x", 0.1, 2)
    sr = Cell("same-res-distilled", "2p5x", 0.1, 2, 1.0)
    assert grid.teacher_of(sr) == Cell("same-res-teacher", "2p5x", 0.1, 2)
    # six arms per fraction, each tuned with the same number of trials, never a reported seed
    arms = grid.arms()
    assert len(arms) == 6 * 2 and len({a.id for a in arms}) == len(arms)
    trials = [grid.trial_cells(a, 3) for a in arms]
    assert {len(t) for t in trials} == {3}
    assert all(c.seed not in grid.seeds and c.id not in {x.id for x in grid.cells()}
               for t in trials for c in t)  # fmt: skip
    # a distilling arm is tuned at the largest share, on the first seed's teacher
    (d0, *_) = grid.trial_cells(next(a for a in arms if a.kind == "distilled"), 3)
    assert d0.unlabelled_share == 1.0 and grid.teacher_of(d0).seed == 0
    assert Grid("10x", ("2p5x",)).kinds == ("teacher", "baseline", "distilled")


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
            "--trials", "1", "--controls", "self-training",
            "--student-args", "--temperature 2 --no-flips --jitter 0.1,0.1,0.1,0"]  # fmt: skip
    from_cli = parse(study.SPEC, argv)
    expected = StudyConfig(
        teacher=("ckpt1", "0.1=ckpt0.1"), label_fractions=(1.0, 0.5), trials=1,
        controls=("self-training",),
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
    assert (StudyConfig().recipe_trials, from_yaml.recipe_trials) == (4, 1)  # --quick: no search
    assert StudyConfig().controls == ("same-res", "self-training")
    assert parse(study.SPEC, ["--controls", "none"]).controls == ()
    assert StudyConfig(controls="none").controls == ()  # a YAML file's text
    assert StudyConfig(controls=["self-training"]).controls == ("self-training",)
    for bad, words in (({"label_fractions": (0.0,)}, "--label-fractions 0 is not in (0, 1]"),
                       ({"seeds": 0}, "--seeds must be at least 1"),
                       ({"data": "/ds", "cohort": "sites"}, "--cohort picks"),
                       ({"student_args": "--bogus 1"}, "--student-args: unknown option"),
                       ({"teacher_args": "--jitter 0.5,0.5,0.5,0.2,1"}, "1 to 4 numbers"),
                       ({"student_args": {"loss": {"temprature": 2}}}, "temprature"),
                       ({"trials": 0}, "--trials must be at least 1"),
                       ({"controls": ("same-mag",)}, "--controls 'same-mag' is not one of"),
                       # a searched setting fixed for one arm would make the contest unequal
                       ({"student_args": "--jitter 0.2,0.2,0.2,0.05"},
                        "--student-args sets jitter, which --trials searches"),
                       ({"teacher_args": "--lr 0.01", "trials": 2},
                        "--teacher-args sets lr, which --trials searches")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(words)):
            StudyConfig(**bad)
    assert train_options("--compile --no-teacher-eval --hed-jitter=0.05") == {
        "speed": {"compile": "inductor"}, "teacher": {"evaluate": False},
        "data": {"hed_jitter": (0.05, 0.05)},
    }  # fmt: skip


def test_cells_are_the_training_commands_configs(
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """A cell's config is the one ``resdistill teacher`` / ``distill`` make of the same
    options, the study's overrides last (built directly, no command line in between)."""
    data, storage = str(tiny_dataset), str(tmp_path / "runs")
    cfg = StudyConfig(data=data, arch="resnet18", batch_size=8, epochs=2, student_epochs=3,
                      teacher_args="--jitter 0.5,0.5,0.5,0.2", trials=1,
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
    # the same-resolution teacher is trained as the teacher is, at the student's magnification
    sr = Cell("same-res-teacher", "5x", 0.5, 1)
    assert cell_config(sr, cfg, opts, "x") == prepare(parse(teacher.SPEC, [
        *common, "--name", f"x-{sr.id}", "--seed", "1", "--mag", "5x", "--epochs", "2",
        "--label-fraction", "0.5", "--steps-per-epoch", "5", "--jitter", "0.5,0.5,0.5,0.2",
    ]))  # fmt: skip
    # self-training: distillation machinery, the KD term and cross-entropy on the cell's
    # labelled tiles; the recipe before the overrides
    st = Cell("self-training", "5x", 0.5, 0, 1.0)
    recipe = {"optim": {"lr": 0.002}, "data": {"jitter": [0.2, 0.2, 0.2, 0.05]}}
    selftrain = cell_config(st, cfg, opts, "x", trained_teacher, recipe)
    assert selftrain == prepare(parse(distill.SPEC, [
        *student, "--name", f"x-{st.id}", "--teacher", trained_teacher, "--no-teacher-eval",
        "--lr", "0.002", "--jitter", "0.2,0.2,0.2,0.05", "--feature-weight", "0",
        "--attention-weight", "0", "--kd-threshold", "0.95", "--ce-weight", "1"]))  # fmt: skip
    assert selftrain.loss.kd_weight == 1.0 and selftrain.loss.feature_weight == 0.0
    assert selftrain.loss.ce_weight == 1.0 and distilled.loss.ce_weight == 0.0  # label-free
    assert selftrain.loss.kd_threshold == cfg.self_training_threshold == 0.95  # FixMatch's
    # students given a feature grid: the self-training cell turns the term off, grid and all
    loss = {**(cfg.student_args.get("loss") or {}), "feature_grid": 2, "feature_weight": 1.0}
    gridded = replace(cfg, student_args={**cfg.student_args, "loss": loss})
    st_loss = cell_config(st, gridded, opts, "x", trained_teacher, recipe).loss
    assert (st_loss.feature_weight, st_loss.feature_grid, st_loss.ce_weight) == (0.0, 0, 1.0)


# ---------------------------------------------------------------------------------------------
# Through Ray Tune on the local cluster
# ---------------------------------------------------------------------------------------------


def test_two_cell_study_writes_the_report_and_resumes(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    out = tmp_path / "study"
    argv = ["study", "--data", str(tiny_dataset), "--teacher", trained_teacher, "--out", str(out),
            "--student-mags", "5x", "--label-fractions", "1", "--unlabelled-shares", "0.5",
            "--seeds", "1", "--epochs", "1", "--student-epochs", "1", "--batch-size", "8",
            "--loader-workers", "0", "--student-args", "--shuffle-buffer 16 --steps-per-epoch 2",
            "--trials", "1", "--controls", "none", "--address", ray_cluster]  # fmt: skip
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
    # the baseline in the phase of the arms that learn from labels, the distilled one after
    assert [e.split("-")[1] for e in experiments] == ["distilled", "supervised"]
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


# ---------------------------------------------------------------------------------------------
# The protocol: equal recipe budgets chosen on validation, the controls, --quick's honesty
# ---------------------------------------------------------------------------------------------


def test_every_arm_tries_the_same_recipes_and_keeps_its_best_on_validation() -> None:
    from resdistill.study.grid import Arm
    from resdistill.study.protocol import tuning_record
    from resdistill.study.recipes import SPACE, draw_recipes
    from resdistill.study.tuning import CellResult, chosen_epoch

    recipes = draw_recipes(4, seed=7)
    assert recipes == draw_recipes(4, seed=7) and recipes != draw_recipes(4, seed=8)
    assert recipes[0] == {}  # the arm's own defaults are always a candidate
    for r in recipes[1:]:
        assert 3e-4 <= r["optim"]["lr"] <= 3e-3 and 1e-6 <= r["optim"]["weight_decay"] <= 1e-3
        assert tuple(r["data"]["jitter"]) in SPACE["data.jitter"][1]

    def result(val: dict, metric: str, mode: str) -> CellResult:
        return CellResult("ckpt", val, "metric" if mode == "max" else "distill-loss", metric, mode)

    # a labelled arm keeps its highest validation metric...
    sup = [result({"val_macro_f1": v}, "val_macro_f1", "max") for v in (0.7, 0.9, 0.9, 0.8)]
    doc = tuning_record(Arm("baseline", "2p5x", 0.1), recipes, sup)
    assert doc["chosen"] == 1 and doc["recipe"] == recipes[1]  # a tie goes to the earlier trial
    # ...a distilling arm its lowest validation distillation loss; a failed trial never wins
    kd = [result({"val_distill_loss": v}, "val_distill_loss", "min") for v in (0.5, 0.3, 0.2)]
    kd.append(CellResult(None, {"val_distill_loss": 0.01}, "distill-loss", "val_distill_loss",
                         "min"))  # fmt: skip
    doc = tuning_record(Arm("distilled", "2p5x", 0.1), recipes, kd)
    assert doc["chosen"] == 2 and doc["trials"][3]["score"] is None
    assert doc["seed"] == 1000 and doc["rule"]["metric"] == "val_distill_loss"
    # a run's kept epoch: best by its own rule, ties to the later epoch
    rows = [{"epoch": 1, "val_distill_loss": 0.4}, {"epoch": 2, "val_distill_loss": 0.3},
            {"epoch": 3, "val_distill_loss": 0.3}, {"epoch": 4}]  # fmt: skip
    assert chosen_epoch(rows, "val_distill_loss", "min")["epoch"] == 3
    assert chosen_epoch(rows, "val_accuracy", "max") is None


def test_validation_table_holds_no_test_metric_and_quick_says_smoke_test(tmp_path: Path) -> None:
    from dataclasses import asdict

    from resdistill.study.protocol import protocol_markdown, validation_rows, write_validation

    cells = [Cell("baseline", "2p5x", 0.1, s) for s in (0, 1)]
    cells += [Cell("self-training", "2p5x", 0.1, s, 1.0) for s in (0, 1)]
    records = {c.id: {"cell": asdict(c), "accuracy": {"value": 0.99}, "correct": [1, 1],
                      "validation": {"val": {"val_accuracy": 0.5 + i / 10}, "select": "metric",
                                     "metric": "val_macro_f1", "mode": "max",
                                     "labelled_val_slides": 4},
                      "recipe": {"optim": {"lr": 0.001}}}
               for i, c in enumerate(cells)}  # fmt: skip
    rows = validation_rows(records)
    assert [(r["kind"], r["seeds"]) for r in rows] == [("baseline", 2), ("self-training", 2)]
    assert rows[0]["val_accuracy"] == pytest.approx(0.55) and rows[0]["recipe"] == "lr 0.001"
    header = write_validation(records, tmp_path).read_text().splitlines()[0]
    columns = {c.strip('"') for c in header.split(",")}
    assert "val_accuracy" in columns and not {"accuracy", "macro_f1", "correct"} & columns
    grid = Grid("10x", ("2p5x",), (0.1,), (0.0, 1.0), (0,), controls=("self-training",))
    quick = protocol_markdown(grid, 1, True, {}, (20, 20))
    assert quick.startswith("**Smoke test, not evidence (`--quick`)**")
    assert "No recipe search" in quick and "self-training: teacher-free" in quick
    full = protocol_markdown(grid, 4, False, {}, (20, 20))
    assert "Smoke test" not in full and "the same 4 recipes" in full
    assert "- baseline 2.5x, 10% labelled: its defaults (no search)" in full
    help_text = study.SPEC.description + StudyConfig.__dataclass_fields__["quick"].metadata["help"]
    assert "smoke test, not evidence" in help_text and "evidence" not in help_text.replace(
        "not evidence", ""
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 15 Ray Train runs
def test_both_controls_and_equal_tuning_on_the_smallest_grid(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """The smallest grid with both controls and a recipe search: every arm tries the same two
    recipes on its own validation rule, the controls learn from the cells the grid shares
    (self-training from the baseline), each reported cell records its validation metrics and
    recipe, and the summary judges the teacher against both controls."""
    from resdistill.study.recipes import draw_recipes

    out = tmp_path / "study"
    argv = ["study", "--data", str(tiny_dataset), "--teacher", trained_teacher, "--out", str(out),
            "--student-mags", "5x", "--label-fractions", "1", "--unlabelled-shares", "1",
            "--seeds", "1", "--epochs", "1", "--student-epochs", "1", "--batch-size", "8",
            "--loader-workers", "0", "--trials", "2", "--tune-seed", "3",
            "--teacher-args", "--shuffle-buffer 16 --steps-per-epoch 2",
            "--student-args", "--shuffle-buffer 16 --steps-per-epoch 2",
            "--address", ray_cluster]  # fmt: skip
    assert cli_main(argv) == 0
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert sorted(records) == [
        "baseline-5x-l1-s0", "distilled-5x-l1-u1-s0", "same-res-distilled-5x-l1-u1-s0",
        "same-res-teacher-5x-l1-s0", "self-training-5x-l1-u1-s0", "teacher-10x-l1-s0"]  # fmt: skip
    recipes = draw_recipes(2, 3)
    tuning = {p.stem: json.loads(p.read_text()) for p in (out / "tuning").glob("*.json")}
    assert sorted(tuning) == ["baseline-5x-l1", "distilled-5x-l1", "same-res-distilled-5x-l1",
                              "same-res-teacher-5x-l1", "self-training-5x-l1"]  # fmt: skip
    for arm, doc in tuning.items():
        assert [t["recipe"] for t in doc["trials"]] == recipes  # the same recipes, every arm
        scores = [t["score"] for t in doc["trials"]]
        assert doc["chosen"] == max(range(2), key=lambda i: (scores[i], -i)), arm
        kd = arm.split("-5x")[0] in ("distilled", "same-res-distilled", "self-training")
        # labelled arms choose on validation labels (counted), distilling arms on none
        assert doc["rule"]["select"] == ("distill-loss" if kd else "metric"), arm
        assert (doc["rule"]["labelled_val_slides"] == 0) == kd, arm
        record = next(r for k, r in records.items() if k.startswith(arm))
        assert record["recipe"] == doc["recipe"]
        assert record["validation"]["select"] == doc["rule"]["select"]
        metric = doc["rule"]["metric"]
        assert isinstance(record["validation"]["val"][metric], float)
    # the controls' teachers are the grid's own cells
    config = load_checkpoint(records["self-training-5x-l1-u1-s0"]["checkpoint"], TRAINER_FILE)
    teacher_dir = Path(config["config"]["teacher"]["checkpoint"])
    assert teacher_dir == Path(records["baseline-5x-l1-s0"]["checkpoint"])
    assert config["config"]["loss"]["feature_weight"] == 0.0
    config = load_checkpoint(records["same-res-distilled-5x-l1-u1-s0"]["checkpoint"], TRAINER_FILE)
    assert Path(config["config"]["teacher"]["checkpoint"]) == Path(
        records["same-res-teacher-5x-l1-s0"]["checkpoint"]
    )
    assert config["config"]["teacher"]["mag"] == "5x"
    summary = (out / "summary.md").read_text()
    assert "## Protocol" in summary and "the same 2 recipes" in summary
    assert "4. **the high-magnification teacher beats the controls: " in summary
    for control in ("same-res-distilled", "self-training"):
        assert f"vs {control}: " in summary and f"distilled - {control} " in summary
    # each teacher's outputs stored once: the given one, the same-res teacher, the baseline
    assert len([p for p in (out / "targets").iterdir() if (p / "targets.json").exists()]) == 3
    validation = (out / "validation.csv").read_text().splitlines()
    assert "val_accuracy" in validation[0] and len(validation) == 1 + 6
    # resumed: the tuning and the cells are kept, nothing trains again
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 4  # tuning and cells, per phase
    assert cli_main([*argv, "--resume"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
