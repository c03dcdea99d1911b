"""The Python API (:mod:`resdistill.api`): ``docs/python-api.md``'s walk-through runs as written.

Every ``python`` block of the page runs in order, in one namespace, in a folder holding eight
small synthetic slides and their ``labels.csv``, on the session's Ray cluster (named by
``RAY_ADDRESS``, as a notebook on a cluster would): shard, teacher, student, evaluate, predict
with GeoJSON, a model on tiles. The results are then checked for what the page promises.
The option-building rules (flag names, switches, refusals) are checked without Ray.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import resdistill as rd
from resdistill.errors import UsageError
from resdistill.fields import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "python-api.md"


def page_code(path: Path = PAGE) -> list[str]:
    """The ``python`` fenced blocks of a docs page, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_import_is_light_and_lists_the_api() -> None:
    code = ("import sys, resdistill as rd\n"
            "names = dir(rd)\n"
            "print(','.join(m for m in ('torch', 'ray', 'pandas', 'pyarrow') if m in sys.modules))\n"
            "print(all(n in names for n in ('shard', 'train_teacher', 'distill', 'evaluate', "
            "'predict_slides', 'load_model')))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")  # fmt: skip
    assert out[:2] == ["", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rd.nope  # noqa: B018
    import resdistill.predict.driver  # noqa: F401 - the package beside the API's functions

    assert callable(rd.predict_slides) and callable(rd.evaluate) and callable(rd.distill)


def test_options_are_the_commands_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resdistill.api import _build
    from resdistill.commands.distill import SPEC as DISTILL
    from resdistill.commands.teacher import SPEC as TEACHER
    from resdistill.config import STAGE_SUPERVISED, STAGE_TEACHER

    monkeypatch.chdir(tmp_path)  # local paths are made absolute: Ray workers run elsewhere
    cfg = _build(TEACHER, {"data": Path("ds"), "batch_size": 8, "jitter": [0, 0, 0, 0],
                           "storage": "s3://b/runs"})  # fmt: skip
    assert (cfg.stage, cfg.data.url, cfg.data.batch_size) == (
        STAGE_TEACHER,
        str(tmp_path / "ds"),
        8,
    )
    assert cfg.run.storage == "s3://b/runs"
    assert cfg.data.jitter == (0, 0, 0, 0) and cfg.teacher is None
    cfg = _build(DISTILL, {"data": "ds", "student_mag": "2.5x", "supervised": True})
    assert (cfg.stage, cfg.model.mag) == (STAGE_SUPERVISED, "2.5x")
    cfg = _build(DISTILL, {"data": "ds", "student_mag": "5x", "teacher": "runs/t1"})
    assert cfg.teacher.checkpoint == str(tmp_path / "runs" / "t1")
    with pytest.raises(ConfigError, match="unknown option.*batchsize"):
        _build(TEACHER, {"data": "ds", "batchsize": 8})
    with pytest.raises(ConfigError, match="unknown option.*temperature"):  # distillation's only
        _build(TEACHER, {"data": "ds", "temperature": 2.0})
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        _build(TEACHER, {"data": "ds", "batch_size": 0})
    with pytest.raises(ConfigError, match="distill: student_mag= required"):
        _build(DISTILL, {"data": "ds"})
    with pytest.raises(UsageError, match="not both"):
        rd.train_teacher(cfg, epochs=1)


def test_a_refused_prediction_raises_its_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such checkpoint"):
        rd.predict_slides([tmp_path / "a.svs"], tmp_path / "nowhere", out=tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def notebook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``slides/``: eight labelled synthetic slides, one per patient."""
    from sharding.synthetic import write_synthetic_slides

    root = tmp_path_factory.mktemp("notebook")
    write_synthetic_slides(root / "slides", 8, seed=5, size_um=(640.0, 512.0), base_mags=(20,),
                           labeled_fraction=1.0, slides_per_patient=1, formats=("svs",))  # fmt: skip
    return root


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(
    notebook: Path, ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = page_code()
    assert len(blocks) >= 5, "the page lost its walk-through"
    monkeypatch.chdir(notebook)
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), ns)  # noqa: S102 - the page's own code

    ds, teacher, student = ns["ds"], ns["teacher"], ns["student"]
    assert isinstance(ds, rd.ShardResult) and (notebook / "shards" / "config.yaml").exists()
    for run, stage in ((teacher, "teacher"), (student, "distill")):
        assert isinstance(run, rd.TrainResult) and run.stage == stage and run.epochs == 1
        assert Path(run.best_checkpoint, "model.pt").exists()
    assert student.select == "distill-loss" and teacher.select == "metric"

    scores = ns["scores"]
    assert list(scores["checkpoint"]) == [teacher.best_checkpoint, student.best_checkpoint]
    assert ((scores["accuracy_low"] <= scores["accuracy"])
            & (scores["accuracy"] <= scores["accuracy_high"])).all()  # fmt: skip
    assert (scores["flops"] > 0).all() and scores.attrs["files"] == {}

    slides, tiles = ns["slides"], ns["tiles"]
    assert len(slides) == 2 and (slides["status"] == "ok").all()
    assert sorted(set(tiles["slide"])) == sorted(slides["slide"])
    assert len(tiles) == slides["tiles"].sum()
    for sid in slides["slide"]:
        assert (notebook / "predictions" / f"{sid}.geojson").stat().st_size > 0

    model, probs = ns["model"], ns["probs"]
    assert isinstance(model, rd.Model) and model.url == student.best_checkpoint
    assert probs.shape == (4, len(model.classes)) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
