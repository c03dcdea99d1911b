"""A distilled student chooses its checkpoint without labels (``--select``, default ``auto``):
by the distillation loss on the validation images, labels unread; the teacher and the baseline
choose by a labelled metric, and their summaries count the validation slides that chose."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

from resdistill import checkpoint as T
from resdistill.commands import distill, teacher
from resdistill.commands.generate import parse
from resdistill.commands.training import train as train_run
from resdistill.config import DataConfig, RunOptions, TrainConfig
from resdistill.fields import ConfigError
from resdistill.models import build_model
from resdistill.train import loop
from resdistill.train.loop import EpochResult, TrainState, fit
from resdistill.train.preflight import prepare
from resdistill.train.runner import print_summary, summarize
from resdistill.train.selection import Selection, selection
from resdistill.train.teacher_net import DistillStep, FrozenTeacher, build_loss, distill_batch
from resdistill.train.validate import distill_loss
from resdistill.train.worker_env import WorkerEnv
from tests.test_distill import LOSS_CFG, _args, _LabelsForbidden

VAL_SLIDES = 4  # tests.fixtures_data.write_dataset: four labelled slides in every split
CPU = WorkerEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_select_is_a_typed_option_resolved_by_stage(tiny_dataset: Path, capsys) -> None:
    data = DataConfig(url=str(tiny_dataset))
    assert selection(TrainConfig("distill", data)) == Selection(
        "distill-loss", "val_distill_loss", "min", 0
    )
    assert selection(TrainConfig("teacher", data)) == Selection("metric", "val_macro_f1", "max")
    assert selection(TrainConfig("supervised", data)).rule == "metric"
    last = TrainConfig("supervised", data, run=RunOptions(select="last"))
    assert selection(last) == Selection("last", "epoch", "max", 0)
    with pytest.raises(ConfigError, match="^--select distill-loss needs a teacher"):
        TrainConfig("teacher", data, run=RunOptions(select="distill-loss"))
    with pytest.raises(ConfigError, match="^--select must be one of auto, metric"):
        RunOptions(select="val_macro_f1")
    # the flag comes from the field, and a teacher asked to select by a distillation loss exits 2
    cfg = parse(
        distill.SPEC,
        ["--data", str(tiny_dataset), "--teacher", "t", "--student-mag", "5x", "--select", "last"],
    )
    assert cfg.run.select == "last"
    assert teacher.main(["--data", str(tiny_dataset), "--select", "distill-loss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--select distill-loss needs a teacher" in err[0]


def test_prepare_records_the_rule_and_the_labelled_validation_slides(
    tiny_dataset: Path,
    trained_teacher: str,
) -> None:
    base = ["--data", str(tiny_dataset), "--student-mag", "5x", "--batch-size", "8"]
    cfg = prepare(parse(distill.SPEC, [*base, "--teacher", trained_teacher]))
    assert cfg.run.select == "distill-loss" and cfg.plan.n_val_slides == VAL_SLIDES
    assert selection(cfg) == Selection("distill-loss", "val_distill_loss", "min", 0)
    assert "label-free" in selection(cfg).describe()
    sup = prepare(parse(distill.SPEC, [*base, "--supervised", "--label-fraction", "0.5"]))
    assert sup.run.select == "metric"
    assert selection(sup) == Selection("metric", "val_macro_f1", "max", VAL_SLIDES)
    # a student may still choose with labels; then they are counted like the baseline's
    labelled = prepare(parse(distill.SPEC, [*base, "--teacher", trained_teacher, "--select",
                                            "metric"]))  # fmt: skip
    assert selection(labelled).labelled_val_slides == VAL_SLIDES
    assert f"labels of {VAL_SLIDES} validation slides" in selection(labelled).describe()


def test_validation_distill_loss_reads_no_label_and_is_the_training_objective() -> None:
    """Per-sample mean of the eval-mode training loss over uneven batches; the labels raise."""
    torch.manual_seed(0)
    student, t_net = build_model("resnet18", 2), build_model("resnet18", 2)
    step = DistillStep(student, build_loss(LOSS_CFG, 512, 512))
    frozen = FrozenTeacher(t_net)
    batches = [
        _LabelsForbidden((torch.randn(n, 3, 16, 16), torch.randn(n, 3, 32, 32))) for n in (4, 2)
    ]
    loader = SimpleNamespace(epoch=lambda: iter(batches))
    step.train()
    out = distill_loss(step, frozen, loader, CPU)
    assert step.training, "the student goes back to training mode"
    step.eval()
    with torch.no_grad():
        per_batch = [distill_batch(step, frozen, b)[0] for b in batches]
    expected = (4 * float(per_batch[0]) + 2 * float(per_batch[1])) / 6
    assert out["val_distill_loss"] == pytest.approx(expected, rel=1e-5)
    assert out["val_kd"] + out["val_feature"] == pytest.approx(expected, rel=1e-5)
    assert out["val_distill_samples"] == 6 and 0.0 <= out["val_agreement"] <= 1.0
    assert "val_attention" not in out  # the term is off


def _fit(monkeypatch: pytest.MonkeyPatch, chosen: Selection, rows: list[dict]) -> TrainState:
    """:func:`fit` over ``rows`` (one validation dict per epoch), reports kept in memory."""
    reported: list[dict] = []
    monkeypatch.setattr(loop, "report_epoch", lambda m, **kw: reported.append(dict(m)))
    state = fit(env=CPU, state=TrainState(), epochs=len(rows),
                train_epoch=lambda e: EpochResult({"train_loss": 1.0}, 1, 1),
                validate=lambda e: rows[e - 1], payload=lambda s: None,
                metric=chosen.metric, mode=chosen.mode)  # fmt: skip
    assert [r["best_epoch"] for r in reported] == [h["best_epoch"] for h in state.history]
    return state


def test_fit_ranks_epochs_by_the_selection_not_by_the_labelled_metric(monkeypatch) -> None:
    rows = [{"val_macro_f1": f1, "val_distill_loss": loss}
            for f1, loss in ((0.5, 0.9), (0.9, 0.7), (0.6, 0.3), (0.7, 0.4))]  # fmt: skip
    by_loss = _fit(monkeypatch, Selection("distill-loss", "val_distill_loss", "min"), rows)
    assert by_loss.best_epoch == 3 and by_loss.best_metric == pytest.approx(0.3)
    by_f1 = _fit(monkeypatch, Selection("metric", "val_macro_f1", "max", 4), rows)
    assert by_f1.best_epoch == 2
    last = _fit(monkeypatch, Selection("last", "epoch", "max"), rows)
    assert last.best_epoch == 4 and [h["best_epoch"] for h in last.history] == [1, 2, 3, 4]


def test_summary_keeps_the_selected_checkpoint_and_states_the_label_budget() -> None:
    ckpts = [(SimpleNamespace(path=f"/runs/r/checkpoint_epoch000{e}"),
              {"epoch": e, "val_macro_f1": f1, "val_distill_loss": loss})
             for e, f1, loss in ((1, 0.9, 0.8), (2, 0.6, 0.2), (3, 0.7, 0.5))]  # fmt: skip
    result = SimpleNamespace(best_checkpoints=ckpts, metrics=ckpts[-1][1], checkpoint=ckpts[-1][0])
    free = summarize(result, name="r", storage="/runs",
                     selection=Selection("distill-loss", "val_distill_loss", "min"))  # fmt: skip
    assert (free.best_epoch, free.select, free.labelled_val_slides) == (2, "distill-loss", 0)
    assert free.best_checkpoint == "/runs/r/checkpoint_epoch0002"
    labelled = summarize(result, name="r", storage="/runs",
                         selection=Selection("metric", "val_macro_f1", "max", 7))  # fmt: skip
    assert (labelled.best_epoch, labelled.labelled_val_slides) == (1, 7)
    console = Console(record=True, width=200)
    print_summary(labelled, title="baseline", console=console)
    assert "best val_macro_f1 on the labels of 7 validation slides" in console.export_text()


@pytest.mark.slow
def test_distilled_student_keeps_its_lowest_validation_distill_loss_epoch(
    ray_cluster: str,
    tiny_dataset: Path,
    trained_teacher: str,
    tmp_path: Path,
) -> None:
    """Default options: Ray keeps one best checkpoint, ranked by ``val_distill_loss``; the
    labelled metrics are still logged; checkpoint, meta.json and summary JSON say how it chose."""
    out = tmp_path / "summary.json"
    args = _args(str(tiny_dataset), str(tmp_path / "runs"), "sel", "--teacher", trained_teacher,
                 "--student-mag", "5x", "--epochs", "3", "--steps-per-epoch", "3",
                 "--schedule", "constant", "--lr", "3e-3", "--summary-json", str(out),
                 "--address", ray_cluster)  # fmt: skip
    summary = train_run(args)
    trainer = T.load_checkpoint(summary.latest_checkpoint, T.TRAINER_FILE)
    state: dict[str, Any] = trainer["state"]
    history = state["history"]
    losses = [h["val_distill_loss"] for h in history]
    best = max(range(len(losses)), key=lambda i: (-losses[i], i)) + 1  # lowest, ties to later
    assert summary.best_epoch == state["best_epoch"] == best, losses
    assert summary.best_checkpoint.endswith(f"checkpoint_epoch{best:04d}")
    assert (summary.select, summary.metric, summary.labelled_val_slides) == (
        "distill-loss", "val_distill_loss", 0
    )  # fmt: skip
    assert state["selection"] == {"rule": "distill-loss", "metric": "val_distill_loss",
                                  "mode": "min", "labelled_val_slides": 0}  # fmt: skip
    assert all("val_macro_f1" in h and "val_agreement" in h for h in history)
    assert history[-1]["val_distill_samples"] == 16  # every val image once over both ranks
    meta = json.loads((Path(summary.latest_checkpoint) / T.META_FILE).read_text())
    assert meta["config"]["run"]["select"] == "distill-loss"
    doc = json.loads(out.read_text())
    assert (doc["select"], doc["labelled_val_slides"], doc["best_epoch"]) == ("distill-loss", 0,
                                                                               best)  # fmt: skip
