"""predict, evaluate, export and teacher-targets: ``--config FILE.yaml`` plus flags resolve to the
config built in Python, ``--print-config`` reads back equal, and bad values name their flag.

Parsing only (no model, no Ray): the commands' runs are tested in test_evaluate, test_cascade,
test_predict_*, test_export and test_teacher_targets, which also check the config.yaml they write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from resdistill.commands import evaluate, export, predict, teacher_targets
from resdistill.commands.generate import parse
from resdistill.eval.config import EvaluateConfig
from resdistill.export.config import ExportConfig
from resdistill.fields import ConfigError
from resdistill.predict.config import PredictConfig
from resdistill.train.targets_config import TargetsConfig


def _round_trip(spec: Any, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> Any:
    """The config of ``argv``, checked to come back equal from its ``--print-config`` YAML."""
    cfg = parse(spec, argv)
    with pytest.raises(SystemExit) as done:
        parse(spec, [*argv, "--print-config"])
    assert done.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert parse(spec, ["--config", str(printed)]) == cfg
    return cfg


def _file(tmp_path: Path, doc: dict[str, Any]) -> str:
    path = tmp_path / "given.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_predict_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = _file(tmp_path, {"checkpoint": "runs/s/ckpt", "slides": ["a.svs", "b,c.svs"],
                            "out": "preds", "read": "native", "batch_size": 16})  # fmt: skip
    cfg = _round_trip(predict.SPEC, ["--config", file, "--batch-size", "8"], tmp_path, capsys)
    assert cfg == PredictConfig(checkpoint="runs/s/ckpt", slides=("a.svs", "b,c.svs"),
                                out="preds", read="native", batch_size=8)  # fmt: skip
    # positionals on the command line replace the file's; a slide name keeps its comma
    cfg = parse(predict.SPEC, ["--config", file, "other/ckpt", "x,y.svs", "z.svs"])
    assert (cfg.checkpoint, cfg.slides) == ("other/ckpt", ("x,y.svs", "z.svs"))
    flags = ["c", "s.svs", "--out", "o", "--cascade", "t", "--escalate", "0.9", "--heatmap", "none"]
    cfg = _round_trip(predict.SPEC, flags, tmp_path, capsys)
    assert cfg.threshold == 0.9 and PredictConfig(checkpoint="c", slides=("s",), out="o").threshold
    assert cfg.heatmap_px == PredictConfig.__dataclass_fields__["heatmap_px"].default


def test_evaluate_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = _file(tmp_path, {"checkpoints": ["t/ckpt", "s/ckpt"], "data": "ds", "out": "ev",
                            "names": ["t", "s"], "n_boot": 200, "plots": True})  # fmt: skip
    cfg = _round_trip(evaluate.SPEC, ["--config", file, "--n-boot", "50", "--no-plots",
                                      "--split", "val"], tmp_path, capsys)  # fmt: skip
    assert cfg == EvaluateConfig(checkpoints=("t/ckpt", "s/ckpt"), data="ds", out="ev",
                                 names=("t", "s"), n_boot=50, plots=False, split="val")  # fmt: skip
    cfg = _round_trip(evaluate.SPEC, ["s", "--data", "ds", "--out", "o", "--cascade", "t",
                                      "--thresholds", "0.9,0,0.5,0.9"], tmp_path, capsys)  # fmt: skip
    assert cfg.thresholds == (0.0, 0.5, 0.9) == cfg.grid
    assert EvaluateConfig(checkpoints=("s",), data="ds").grid[0] == 0.0  # the default grid


def test_export_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = _file(tmp_path, {"checkpoint": "runs/s/ckpt", "format": "onnx", "out": "m.onnx"})
    cfg = _round_trip(export.SPEC, ["--config", file, "--out", "s3://b/m.onnx"], tmp_path, capsys)
    assert cfg == ExportConfig(checkpoint="runs/s/ckpt", format="onnx", out="s3://b/m.onnx")
    assert _round_trip(export.SPEC, ["c"], tmp_path, capsys) == ExportConfig(checkpoint="c")


def test_teacher_targets_config_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    file = _file(tmp_path, {"data": "ds", "teacher": "t/ckpt", "splits": ["train"],
                            "batch_size": 32, "local": True})  # fmt: skip
    argv = ["--config", file, "--student-mags", "5x,2.5x", "--no-local", "--batch-size", "16"]
    cfg = _round_trip(teacher_targets.SPEC, argv, tmp_path, capsys)
    assert cfg == TargetsConfig(data="ds", teacher="t/ckpt", splits=("train",),
                                student_mags=("5x", "2.5x"), batch_size=16, local=False)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "argv", "words"),
    [
        (predict.SPEC, ["c", "s", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (predict.SPEC, ["c", "s", "--out", "o", "--escalate", "0.5"], "--escalate needs --cascade"),
        (predict.SPEC, ["c", "s", "--out", "o", "--read", "fast"], "--read"),
        (predict.SPEC, ["c", "s", "--out", "o", "--device", "tpu"], "--device"),
        (predict.SPEC, ["c", "--out", "o"], "required: SLIDE"),
        (evaluate.SPEC, ["c", "--data", "d", "--out", "o", "--alpha", "1"], "--alpha"),
        (evaluate.SPEC, ["c", "--data", "d", "--out", "o", "--names", "a,b"], "--names"),
        (evaluate.SPEC, ["c", "--data", "d", "--out", "o", "--thresholds", "0.5"],
         "--thresholds needs --cascade"),
        (evaluate.SPEC, ["--data", "d", "--out", "o"], "required: CKPT"),
        (export.SPEC, ["c", "--format", "tflite"], "unknown --format 'tflite'"),
        (teacher_targets.SPEC, ["--data", "d", "--teacher", "t", "--batch-size", "0"],
         "--batch-size"),
    ],
)  # fmt: skip
def test_bad_values_name_the_flag(
    spec: Any, argv: list[str], words: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as done:
        parse(spec, argv)
    assert done.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_configs_built_in_python_are_checked() -> None:
    with pytest.raises(ConfigError, match="--thresholds: 1.5 is out of range"):
        EvaluateConfig(checkpoints=("s",), data="d", cascade="t", thresholds=(0.5, 1.5))
    with pytest.raises(ConfigError, match="--heatmap-px must be at least 16"):
        PredictConfig(checkpoint="c", slides=("s",), out="o", heatmap_px=8)
