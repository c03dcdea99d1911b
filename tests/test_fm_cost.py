"""The cost of a foundation-model teacher beside its student's, through ``resdistill evaluate``:
the compute table, ``evaluation.json`` and the accuracy-vs-compute plot carry the frozen ViT's
FLOPs (counted at the backbone's input edge, head included) and measured images/s next to a
ResNet student's, and the cost benchmark's per-mm^2 arithmetic holds (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_fm_targets import ARCH, fm_teacher  # noqa: F401  (the module's fixture)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def evaluated(fm_teacher: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    """``resdistill evaluate`` of the ViT teacher (10x, 32 px) and a resnet18 student (5x,
    16 px) on the val split: exit status, stdout, ``evaluation.json``, and the report object."""
    import contextlib
    import io
    from unittest import mock

    import torch

    from resdistill.commands import evaluate as eval_cmd
    from resdistill.data import DatasetInfo
    from resdistill.eval import evaluation_run
    from resdistill.eval.evaluation_run import run_evaluation
    from resdistill.models import build_model
    from tests.test_evaluate import _cli, save_checkpoint

    root: Path = fm_teacher["root"]
    info = DatasetInfo.load(fm_teacher["data"])
    torch.manual_seed(1)
    mean, std = info.mean_std("5x")
    student = save_checkpoint(
        root / "student" / "checkpoint_epoch0001", build_model("resnet18", info.num_classes),
        stage="student", mag="5x", tile_px=16, classes=info.classes, mean=list(mean),
        std=list(std), dataset=fm_teacher["data"],
    )  # fmt: skip
    out = root / "eval"
    argv = [fm_teacher["ckpt"], str(student), "--data", fm_teacher["data"], "--split", "val",
            "--out", str(out), "--n-boot", "20", "--bench-seconds", "0", "--bench-repeats", "1",
            "--bench-batch", "4", "--loader-workers", "0", "--device", "cpu"]  # fmt: skip
    stdout, reports = io.StringIO(), []

    def keep(*args: Any, **kw: Any) -> Any:  # the real run; its report kept for the plot test
        reports.append(run_evaluation(*args, **kw)[0])
        return reports[-1], None

    with (
        contextlib.redirect_stdout(stdout),
        mock.patch.object(evaluation_run, "run_evaluation", keep),
    ):
        rc = _cli(eval_cmd, argv)
    report = json.loads((out / "evaluation.json").read_text()) if rc == 0 else {}
    return {"rc": rc, "stdout": stdout.getvalue(), "report": report, "out": out,
            "student": student, "object": reports[0] if reports else None}  # fmt: skip


def test_evaluate_counts_the_fm_teachers_cost_beside_the_students(
    evaluated: dict[str, Any],
    fm_teacher: dict[str, Any],  # noqa: F811
) -> None:
    from resdistill.checkpoint import load_model
    from resdistill.measures.compute import count_flops, count_params, human_flops

    assert evaluated["rc"] == 0, evaluated["stdout"]
    models = {m["stage"]: m for m in evaluated["report"]["models"]}
    teacher, student = models["teacher"], models["student"]
    assert teacher["arch"] == ARCH and student["arch"] == "resnet18"
    net = load_model(fm_teacher["ckpt"]).model
    px = int(net.input_px)
    # the tile is resized to the backbone's edge inside forward: the ViT at that edge + the head
    head = 2 * net.embed_dim * net.num_classes
    assert teacher["compute"]["flops"] == count_flops(net.backbone, (3, px, px)) + head
    assert teacher["compute"]["params"] == count_params(net)
    s_net = load_model(evaluated["student"]).model
    assert student["compute"]["flops"] == count_flops(s_net, (3, 16, 16))
    assert teacher["compute"]["flops"] != student["compute"]["flops"]
    for m in (teacher, student):
        assert m["compute"]["images_per_s"] > 0
    # the terminal table shows both rows with their FLOPs
    stdout = evaluated["stdout"]
    for m in (teacher, student):
        assert human_flops(m["compute"]["flops"]) in stdout
    assert "10x" in stdout and "5x" in stdout


def test_accuracy_vs_compute_plot_places_the_fm_teacher(evaluated: dict[str, Any]) -> None:
    """The plot of that run has one point per model at its FLOPs: the teacher's at the ViT's
    count, labelled in the legend."""
    from resdistill.eval.plots import accuracy_vs_flops_figure

    assert evaluated["rc"] == 0, evaluated["stdout"]
    assert (evaluated["out"] / "accuracy_vs_flops.png").stat().st_size > 1000
    fig = accuracy_vs_flops_figure(evaluated["object"])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("teacher") for label in labels)
    xs = {float(x) for line in ax.get_lines() for x in line.get_xdata()}
    for m in evaluated["report"]["models"]:
        assert float(m["compute"]["flops"]) in xs


def test_cost_table_per_mm2_of_tissue() -> None:
    """bench_fm_cost's table: the geometry (one teacher region per student tile, 1 mm^2 =
    1e6 um^2), FLOPs counted on the networks, and one measured round giving positive ratios."""
    from benchmarks import bench_fm_cost as B
    from resdistill.measures.compute import count_flops
    from tests.test_fm_targets import TINY

    assert B.tiles_per_mm2(224, 20.0) == pytest.approx(1e6 / 112**2)  # 0.5 um/px: 112 um
    tiny = B.Teacher("tiny", ARCH, {**TINY, "img_size": 32, **B.IMAGENET}, mag=10.0, input_px=32)
    assert [B.student_px(tiny, m) for m in (5.0, 2.5)] == [16, 8]
    with pytest.raises(ValueError, match="not a whole tile"):
        B.student_px(tiny, 3.0)
    rows = B.cost_table(tiny, "resnet18", (5.0, 2.5), rounds=1, teacher_batch=2,
                        student_batch=4, student_seconds=0.0, log=lambda _: None)  # fmt: skip
    teacher, s5, s25 = rows
    assert [r["px"] for r in rows] == [32, 16, 8]
    # every model covers the same 32 um region: the same tiles per mm^2
    assert {round(r["tiles_per_mm2"], 6) for r in rows} == {round(1e6 / 32**2, 6)}
    from resdistill.models import build_model

    assert s5["flops_per_tile"] == count_flops(build_model("resnet18", 2), (3, 16, 16))
    assert s25["flops_per_tile"] < s5["flops_per_tile"]
    for r in rows:
        assert r["flops_per_mm2"] == pytest.approx(r["flops_per_tile"] * r["tiles_per_mm2"])
        assert r["flops_ratio"] == pytest.approx(teacher["flops_per_mm2"] / r["flops_per_mm2"])
        assert r["tiles_per_s"] > 0 and r["speed_ratio"] > 0
        assert r["speed_range"][0] <= r["speed_ratio"] <= r["speed_range"][1]
    assert teacher["flops_ratio"] == teacher["speed_ratio"] == 1.0
    table = B.markdown(rows)
    assert table.count("\n") == 4 and "| student resnet18 | 2.5x (4) | 8 (32) |" in table
