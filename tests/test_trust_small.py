"""Issue 21's smaller items: one writer's files are replaced whole, a checkpoint from a newer
resdistill is refused, and ``--summary-json`` goes to a local file or ``s3://`` atomically.

"Replaced whole" is checked by the mechanism that makes it true: the path gets a new file
(``os.replace`` of a complete temp file), so a hard link taken to the old file still holds the
old bytes; a file rewritten in place (``open(path, "w")``) shows the new, or a torn, content
through every link, which is what a reader or a kill mid-write would see.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill import checkpoint as C
from resdistill.errors import UsageError
from resdistill.models import build_model

# ---------------------------------------------------------------------------------------------
# A checkpoint's format is checked on load
# ---------------------------------------------------------------------------------------------


def _checkpoint(folder: Path) -> Path:
    """A random ``resnet-small`` checkpoint written by the project's writer."""
    card = C.ModelCard(stage="student", arch="resnet-small", classes=("benign", "tumor"),
                       mag="5x", tile_px=32)  # fmt: skip
    folder.mkdir(parents=True)
    C.write_checkpoint(folder, card=card, state_dict=build_model("resnet-small", 2).state_dict(),
                       trainer={"state": {}}, epoch=1, metrics={})  # fmt: skip
    return folder


def _set_format(folder: Path, version: Any) -> None:
    payload = torch.load(folder / C.MODEL_FILE, weights_only=True)
    payload["format"] = version
    torch.save(payload, folder / C.MODEL_FILE)


def test_a_checkpoint_in_a_newer_format_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    assert C.load_model(str(folder)).card.format == C.CHECKPOINT_FORMAT  # today's format loads
    newer = C.CHECKPOINT_FORMAT + 1
    _set_format(folder, newer)
    for load in (lambda: C.load_model(str(folder)), lambda: C.load_checkpoint(str(folder))):
        with pytest.raises(C.CheckpointError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and str(folder / C.MODEL_FILE) in msg
        assert f"format {newer} is newer" in msg and "upgrade resdistill" in msg
    _set_format(folder, "2")
    with pytest.raises(C.CheckpointError, match="format '2' is not a version number"):
        C.load_model(str(folder))


# ---------------------------------------------------------------------------------------------
# --summary-json: local or s3://, checked before training, written whole
# ---------------------------------------------------------------------------------------------


def test_summary_json_replaces_the_file_whole(tmp_path: Path) -> None:
    from resdistill.train.driver import summary_json_target, write_summary_json

    path = tmp_path / "out" / "summary.json"
    target = summary_json_target(str(path))
    write_summary_json(target, {"epochs": 1})
    old = tmp_path / "old-link"
    os.link(path, old)
    write_summary_json(target, {"epochs": 2, "best_checkpoint": "x"})
    assert json.loads(path.read_text()) == {"epochs": 2, "best_checkpoint": "x"}
    assert json.loads(old.read_text()) == {"epochs": 1}  # a new file, not a rewrite in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]  # no temp left


def test_summary_json_to_s3(s3_bucket: str) -> None:
    from resdistill.checkpoint import read_url
    from resdistill.train.driver import summary_json_target, write_summary_json

    url = f"{s3_bucket}/runs/t1/summary.json"
    write_summary_json(summary_json_target(url), {"latest_checkpoint": "s3://b/c"})
    assert json.loads(read_url(url)) == {"latest_checkpoint": "s3://b/c"}


def test_unusable_summary_json_is_refused_before_any_training(
    tiny_dataset: Path, tmp_path: Path, s3_server: str
) -> None:
    """A missing bucket or a folder fails in one line before Ray is even reached (the address
    is a closed port: the old code went on to train and failed only at the end)."""
    from resdistill.commands import teacher
    from resdistill.commands.generate import parse
    from resdistill.train.driver import train
    from tests.fixtures_ray import free_port

    (tmp_path / "adir").mkdir()
    for target, expect in ((f"s3://no-such-bucket-{os.getpid()}/s.json", "no-such-bucket"),
                           (str(tmp_path / "adir"), "name a file"),
                           ("s3://bucket-only/", "name a file")):  # fmt: skip
        cfg = parse(teacher.SPEC, ["--data", str(tiny_dataset), "--storage", str(tmp_path / "r"),
                                   "--summary-json", target, "--arch", "resnet-small", "--workers", "1", "--batch-size", "8",
                                   "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip
        with pytest.raises(UsageError) as err:
            train(cfg)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("--summary-json") and expect in msg, msg


@pytest.mark.slow
def test_a_training_run_writes_its_summary_to_s3(
    ray_cluster: str, tiny_dataset: Path, s3_bucket: str, tmp_path: Path
) -> None:
    from resdistill.checkpoint import read_url
    from resdistill.commands import teacher
    from resdistill.commands.generate import parse
    from resdistill.train.driver import train

    url = f"{s3_bucket}/summaries/t.json"
    cfg = parse(teacher.SPEC, ["--data", str(tiny_dataset), "--storage", str(tmp_path / "runs"),
                               "--name", "t", "--summary-json", url, "--arch", "resnet-small",
                               "--workers", "1", "--batch-size", "8", "--epochs", "1",
                               "--steps-per-epoch", "2", "--loader-workers", "0",
                               "--shuffle-buffer", "16", "--address", ray_cluster])  # fmt: skip
    summary = train(cfg)
    doc = json.loads(read_url(url))
    assert doc["stage"] == "teacher" and doc["latest_checkpoint"] == summary.latest_checkpoint


# ---------------------------------------------------------------------------------------------
# The study's report files are replaced whole
# ---------------------------------------------------------------------------------------------


def _records(accuracy: float) -> dict[str, dict[str, Any]]:
    """Hand-made cell records (the layout :func:`resdistill.study.records.evaluation_records`
    writes): a teacher and a distilled student scored on 8 tiles of 4 slides."""
    from resdistill.study.grid import Cell

    keys = [f"s{i // 2}_{i}_0" for i in range(8)]
    right = round(accuracy * len(keys))
    out = {}
    for cell, flops in ((Cell("teacher", "10x", 1.0, 0), 4_000_000),
                        (Cell("distilled", "5x", 1.0, 0, 1.0), 1_000_000)):  # fmt: skip
        out[cell.id] = {
            "cell": asdict(cell), "checkpoint": f"/runs/{cell.id}", "flops": flops,
            "accuracy": {"value": accuracy}, "macro_f1": {"value": accuracy},
            "keys": keys, "slides": [k.split("_")[0] for k in keys],
            "correct": [1] * right + [0] * (len(keys) - right),
        }  # fmt: skip
    return out


def test_study_report_files_are_replaced_whole(tmp_path: Path) -> None:
    from resdistill.study.results_table import write_report

    out = tmp_path / "study"
    out.mkdir()
    write_report(_records(0.5), out, "first run")
    names = ("study.parquet", "study.csv", "summary.md")
    before = {n: (out / n).read_bytes() for n in names}
    for n in names:
        os.link(out / n, tmp_path / f"old-{n}")
    write_report(_records(1.0), out, "second run")
    for n in names:
        assert (tmp_path / f"old-{n}").read_bytes() == before[n], f"{n} was rewritten in place"
        assert (out / n).read_bytes() != before[n]
    assert "second run" in (out / "summary.md").read_text()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    """``cohort.json`` and the cell records go through the same writer: a failed write (here a
    target that is a folder) leaves no temp file and nothing half-written."""
    from resdistill.study.records import write_atomic

    path = tmp_path / "cohort.json"
    write_atomic(path, b'{"cohort": "default", "seed": 0}\n')
    os.link(path, tmp_path / "old")
    write_atomic(path, b'{"cohort": "sites", "seed": 1}\n')
    assert json.loads((tmp_path / "old").read_text()) == {"cohort": "default", "seed": 0}
    assert json.loads(path.read_text()) == {"cohort": "sites", "seed": 1}
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "dir.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.json", "dir.json", "old"]
