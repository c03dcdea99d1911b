"""The study's feature-term ablation and its self-training rule, no cluster: which cells the
grid adds, what they train with, the validation column a default is chosen by, the report's
paired differences; the self-training control's confidence threshold."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from resdistill.config import DataConfig, ModelConfig, TrainConfig
from resdistill.fields import ConfigError
from resdistill.study.ablation import (
    SPATIAL_GRID,
    ablation_markdown,
    default_variant,
    variant_of,
    variant_overrides,
)
from resdistill.study.cells import self_training_loss
from resdistill.study.config import StudyConfig
from resdistill.study.grid import Arm, Cell, Grid
from resdistill.study.overrides import apply_overrides
from resdistill.study.protocol import protocol_markdown, validation_rows
from resdistill.study.results_table import check_claims

#: the distilled cells on the paper's rule (the last map), the ablation adding off and spatial
GRID = Grid("10x", ("2p5x",), (1.0, 0.1), (0.0, 1.0), (0, 1), ablations=("feature-term",),
            feature_default="global")  # fmt: skip


def test_the_ablation_adds_the_two_other_variants_at_the_top_share():
    cells = {c.id for c in GRID.cells()}
    for f in ("1", "0.1"):
        for s in (0, 1):
            assert f"feature-off-2p5x-l{f}-u1-s{s}" in cells
            assert f"feature-spatial-2p5x-l{f}-u1-s{s}" in cells
            assert f"feature-global-2p5x-l{f}-u1-s{s}" not in cells  # the distilled cells are it
    assert len(cells) == len(Grid("10x", ("2p5x",), (1.0, 0.1), (0.0, 1.0), (0, 1)).cells()) + 8
    # no arm of its own: the distilled arm's recipe and teacher
    assert not [a for a in GRID.arms() if a.kind.startswith("feature-")]
    cell = Cell("feature-spatial", "2p5x", 0.1, 1, 1.0)
    assert GRID.recipe_arm(cell) == Arm("distilled", "2p5x", 0.1)
    assert GRID.teacher_of(cell) == GRID.teacher_of(Cell("distilled", "2p5x", 0.1, 1, 1.0))
    assert [GRID.variant(k) for k in ("distilled", "feature-off", "baseline")] == [
        "global", "off", None]  # fmt: skip
    spatial = Grid("10x", ("2p5x",), ablations=("feature-term",), feature_default="spatial")
    # without feature_default, the distilled cells run the loss defaults' variant (off)
    assert Grid("10x", ("2p5x",)).variant("distilled") == default_variant(None) == "off"
    assert {c.kind for c in spatial.cells()} >= {"feature-off", "feature-global"}
    assert "feature-spatial" not in {c.kind for c in spatial.cells()}


def test_each_variant_differs_from_distilled_in_the_feature_term_alone():
    base = TrainConfig("distill", DataConfig(url="/data"), ModelConfig(mag="2p5x"))
    got = {k: apply_overrides(base, variant_overrides(f"feature-{k}")).loss
           for k in ("off", "global", "spatial")}  # fmt: skip
    assert got["off"] == base.loss and got["global"].feature_weight == 1  # off: the default
    assert got["spatial"].feature_grid == SPATIAL_GRID and got["spatial"].feature_weight == 1
    for k, loss in got.items():
        assert variant_of(asdict(loss)) == k
        assert asdict(loss) | {"feature_weight": 0, "feature_grid": 0} == asdict(base.loss) | {
            "feature_weight": 0, "feature_grid": 0}  # fmt: skip
    assert variant_overrides("distilled") is None
    assert default_variant(None) == "off"
    assert default_variant({"loss": {"feature_grid": 2, "feature_weight": 1.0}}) == "spatial"
    # a partial mapping reads the rest from LossConfig: the term's default weight is 0
    assert variant_of({}) == "off" and variant_of({"feature_weight": 1.0}) == "global"


def test_study_options_of_the_ablation_and_the_self_training_threshold():
    assert StudyConfig().ablations == () and StudyConfig(ablations="none").ablations == ()
    assert StudyConfig(ablations="feature-term").ablations == ("feature-term",)
    with pytest.raises(ConfigError, match="--ablations 'spatial' is not one of"):
        StudyConfig(ablations="spatial")
    with pytest.raises(ConfigError, match="--student-args sets feature_weight, feature_grid"):
        StudyConfig(
            ablations="feature-term",
            student_args={"loss": {"feature_grid": 2, "feature_weight": 1.0}},
        )
    StudyConfig(
        student_args={"loss": {"feature_grid": 2, "feature_weight": 1.0}}
    )  # without the ablation: fine
    # the control's rule, fixed a priori (FixMatch), and what it makes of a cell
    cfg = StudyConfig()
    assert cfg.self_training_threshold == 0.95
    help_text = StudyConfig.__dataclass_fields__["self_training_threshold"].metadata["help"]
    assert "FixMatch" in help_text and "0.95" in help_text
    with pytest.raises(ConfigError, match="--self-training-threshold"):
        StudyConfig(self_training_threshold=1.0)
    base = TrainConfig("distill", DataConfig(url="/data"), ModelConfig(mag="2p5x"))
    loss = apply_overrides(base, self_training_loss(cfg.self_training_threshold)).loss
    assert (loss.kd_threshold, loss.feature_weight, loss.attention_weight) == (0.95, 0.0, 0.0)
    grid = Grid("10x", ("2p5x",), (0.1,), (1.0,), (0,), controls=("self-training",))
    text = protocol_markdown(grid, 1, False, {}, (20, 20), 0.95)
    assert "FixMatch" in text and "0.95" in text and "No confidence threshold" not in text


def _record(kind: str, fraction: float, seed: int, correct: list[int]) -> dict:
    """A cell's record as the study writes it: 20 test tiles of 10 patients, two classes."""
    share = 1.0 if kind != "teacher" else None
    cell = Cell(kind, "2p5x" if kind != "teacher" else "10x", fraction, seed, share)
    labels = [i % 2 for i in range(20)]
    preds = [y if ok else 1 - y for y, ok in zip(labels, correct, strict=True)]
    return {"cell": asdict(cell), "keys": [f"t{i}" for i in range(20)],
            "units": [f"P{i // 2}" for i in range(20)], "labels": labels, "preds": preds,
            "correct": correct, "unit": "patient", "flops": 10,
            "validation": {"val": {"val_accuracy": 0.5 + sum(correct) / 100}}}  # fmt: skip


def test_report_compares_the_variants_paired_and_keeps_them_out_of_the_claims():
    grid = Grid("10x", ("2p5x",), (1.0,), (1.0,), (0, 1), ablations=("feature-term",),
                feature_default="global")  # fmt: skip
    good, half = [1] * 20, [1, 0] * 10
    records = {}
    for kind, correct in (("distilled", good), ("feature-off", half),
                          ("feature-spatial", good)):  # fmt: skip
        for seed in (0, 1):
            r = _record(kind, 1.0, seed, correct)
            records[Cell(**r["cell"]).id] = r
    text = ablation_markdown(grid, records)
    assert text.startswith("## Ablation: the feature term")
    assert "accuracy global 1.000, off 0.500, spatial 1.000" in text
    assert "global - off +50.0 [" in text and "spatial - global +0.0 [+0.0, +0.0]" in text
    # the ablation's kinds are not controls: no claim 4 from them
    assert [c.number for c in check_claims([], records)] == [1, 2, 3]
    rows = validation_rows(records, grid)
    assert {r["kind"]: r["feature_term"] for r in rows} == {
        "distilled": "global", "feature-off": "off", "feature-spatial": "spatial"}  # fmt: skip
    assert ablation_markdown(Grid("10x", ("2p5x",)), records) == ""  # no ablation, no section
