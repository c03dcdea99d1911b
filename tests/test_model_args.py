"""Every model argument takes every form of :mod:`resdistill.model_spec`, local or ``s3://``.

The forms: a checkpoint folder, its ``model.pt``, a run folder (its best checkpoint, by Ray
Train's record), a run summary JSON (``--summary-json``) and a tune result JSON. The run folder
here is laid out as a training run leaves it (two kept checkpoints written by the project's
writer, the best one not the latest, and Ray Train's ``checkpoint_manager_snapshot.json`` in the
format Ray 2.60 writes); ``tests/test_api.py`` resolves a run folder that a real run wrote. Each
consumer is then driven through its own entry point: distill's teacher (the planner), evaluate,
predict with a cascade teacher, export and teacher-targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resdistill import checkpoint as T
from resdistill import model_spec as M
from resdistill.config import STAGE_DISTILL, DataConfig, ModelConfig, TeacherRef, TrainConfig
from resdistill.data import DatasetInfo
from resdistill.errors import CheckpointError
from resdistill.models import build_model
from sharding.storage import open_storage

BEST, LATEST = "checkpoint_epoch0001", "checkpoint_epoch0002"


def _snapshot(kept: list[tuple[str, float]], best_epoch: int) -> dict:
    """``checkpoint_manager_snapshot.json`` as Ray Train 2.60 writes it (the fields read)."""
    results = [
        {"version": 0, "checkpoint_dir_name": name,
         "metrics": {"val_macro_f1": score, "epoch": int(name[-4:]), "best_epoch": best_epoch}}
        for name, score in kept
    ]  # fmt: skip
    return {"ray_version": "2.60.0", "checkpoint_results": results,
            "latest_checkpoint_result": results[-1], "current_report_index": len(kept)}  # fmt: skip


def write_run(root: Path, info: DatasetInfo) -> Path:
    """A teacher run folder ``root`` with two kept checkpoints: epoch 1 (the best) and 2."""
    card = T.ModelCard(
        stage="teacher", arch="resnet-small", classes=tuple(info.classes), mag="10x",
        tile_px=int(info.tile_px["10x"]), read_chain=T.read_chain(info.raw),
        normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, dataset=info.url,
    )  # fmt: skip
    for seed, (name, score) in enumerate([(BEST, 0.9), (LATEST, 0.5)]):
        torch.manual_seed(seed)
        net = build_model("resnet-small", len(info.classes))
        folder = root / name
        folder.mkdir(parents=True)
        T.write_checkpoint(folder, card=card, state_dict=net.state_dict(), trainer={},
                           epoch=int(name[-4:]), metrics={"val_macro_f1": score})  # fmt: skip
    snapshot = _snapshot([(BEST, 0.9), (LATEST, 0.5)], best_epoch=1)
    (root / M.SNAPSHOT).write_text(json.dumps(snapshot))
    return root


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "t1", DatasetInfo.load(str(tiny_dataset)))


def _forms(run: str, where: Path | str) -> dict[str, str]:
    """Every form naming the run's best checkpoint; the JSONs are written to ``where``."""
    store = open_storage(str(where))
    best = f"{run}/{BEST}"
    summary = {"name": "t1", "run_url": run, "best_checkpoint": best,
               "latest_checkpoint": f"{run}/{LATEST}", "stage": "teacher"}  # fmt: skip
    store.write_bytes("summary.json", json.dumps(summary).encode())
    store.write_bytes("tune.json", json.dumps({"checkpoint": best, "config": {"lr": 0.1}}).encode())
    return {
        "checkpoint folder": best, "checkpoint folder/": best + "/", "model.pt": f"{best}/model.pt",
        "run folder": run, "summary json": store.child_url("summary.json"),
        "tune json": store.child_url("tune.json"),
    }  # fmt: skip


def test_every_local_form_names_the_best_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    best = str(run_dir / BEST)
    for form, spec in _forms(str(run_dir), tmp_path).items():
        folder, file, _ = M.resolve_spec(spec)
        assert (folder.rstrip("/"), file) == (best, "model.pt"), form
        assert T.load_model(spec).url.rstrip("/") == best, form
        assert M.checkpoint_folder(spec) == best, form
    assert T.load_model(tmp_path / "tune.json").config == {"lr": 0.1}


def test_a_summary_json_may_name_its_checkpoint_relative_to_itself(run_dir: Path) -> None:
    doc = run_dir.parent / "rel-summary.json"
    doc.write_text(json.dumps({"best_checkpoint": f"t1/{BEST}"}))
    assert M.checkpoint_folder(doc) == str(run_dir / BEST)


def test_every_s3_form_names_the_best_checkpoint(run_dir: Path, s3_bucket: str) -> None:
    run = f"{s3_bucket}/runs/t1"
    store = open_storage(run)
    for path in run_dir.rglob("*"):
        if path.is_file():
            store.put_file(path.relative_to(run_dir).as_posix(), path)
    best = f"{run}/{BEST}"
    for form, spec in _forms(run, f"{s3_bucket}/summaries").items():
        assert M.resolve_spec(spec)[0].rstrip("/") == best, form
        assert M.checkpoint_folder(spec) == best, form
    loaded = T.load_model(run)
    assert loaded.url == best and loaded.classes == ["benign", "tumor"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_refusals_are_one_line_saying_what_was_expected(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        T.load_model(tmp_path / "nowhere")
    assert "no such checkpoint" in _one_line(exc) and M.EXPECTED in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as exc:
        M.checkpoint_folder(tmp_path / "empty")
    assert "no model.pt there" in _one_line(exc) and "run folder" in str(exc.value)
    for name, doc in {"list.json": [1], "none.json": {"config": {}}}.items():
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(CheckpointError) as exc:
            M.resolve_spec(tmp_path / name)
        assert name in _one_line(exc)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        M.resolve_spec(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="no model given"):
        M.resolve_spec("")


def test_a_run_folder_that_cannot_tell_its_best_is_refused(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / M.SNAPSHOT).unlink()  # no record: no way to rank the checkpoints
    with pytest.raises(CheckpointError) as exc:
        M.resolve_spec(run)
    assert "pass one of its checkpoints" in _one_line(exc) and LATEST in str(exc.value)
    shutil.rmtree(run / LATEST)
    (run / M.SNAPSHOT).write_text(json.dumps(_snapshot([(LATEST, 0.5)], best_epoch=1)))
    with pytest.raises(CheckpointError) as exc:  # the best epoch's checkpoint was not kept
        M.resolve_spec(run)
    assert "is not kept" in _one_line(exc) and "--keep" in str(exc.value)
    (run / M.SNAPSHOT).write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        M.resolve_spec(run)


def test_distill_teacher_takes_a_run_folder_and_a_summary(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The planner resolves ``--teacher`` to the checkpoint folder the workers reread."""
    from resdistill.train.preflight import prepare

    forms = _forms(str(run_dir), tmp_path)
    for form in ("run folder", "summary json"):
        cfg = TrainConfig(
            stage=STAGE_DISTILL, data=DataConfig(url=str(tiny_dataset), batch_size=8),
            model=ModelConfig(mag="5x"), teacher=TeacherRef(checkpoint=forms[form]),
        )  # fmt: skip
        planned = prepare(cfg, note=lambda _: None)
        assert planned.teacher.checkpoint == str(run_dir / BEST), form
        assert planned.teacher.arch == "resnet-small" and planned.model.arch == "resnet-small"


def test_evaluate_predict_export_and_targets_take_every_form(
    run_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from resdistill.eval.config import EvaluateConfig
    from resdistill.eval.evaluate import evaluate_models
    from resdistill.export.config import ExportConfig
    from resdistill.export.files import export_checkpoint
    from resdistill.predict.config import PredictConfig
    from resdistill.predict.driver import settle
    from resdistill.train.targets import write_targets
    from resdistill.train.targets_config import TargetsConfig

    best = str(run_dir / BEST)
    forms = _forms(str(run_dir), tmp_path)
    report = evaluate_models(EvaluateConfig(
        checkpoints=(forms["run folder"], forms["summary json"]), data=str(tiny_dataset),
        out=None, n_boot=20, bench_seconds=0, bench_repeats=1, plots=False, loader_workers=0,
    ))  # fmt: skip
    assert [m.model.url for m in report.models] == [best, best]
    setup = settle(PredictConfig(checkpoint=forms["tune json"], slides=("unused.svs",),
                                 out=str(tmp_path / "p"), cascade=forms["run folder"]))  # fmt: skip
    assert setup.model.url == best and setup.teacher.url == best
    exported = export_checkpoint(ExportConfig(checkpoint=forms["summary json"],
                                              out=str(tmp_path / "m.torchscript")))  # fmt: skip
    assert exported.meta["source_checkpoint"] == best and Path(exported.url).stat().st_size > 0
    index = write_targets(TargetsConfig(data=str(tiny_dataset), teacher=forms["run folder"],
                                        out=str(tmp_path / "tgt"), local=True, splits=("val",)))  # fmt: skip
    assert index.doc["teacher"]["checkpoint"] == best
