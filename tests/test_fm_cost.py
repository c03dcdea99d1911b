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
