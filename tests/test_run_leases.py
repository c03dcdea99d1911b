"""One writer per output: ``teacher``, ``distill``, ``tune``, ``study`` and ``predict`` take the
lease on what they write (``teacher-targets``: ``test_targets_integrity.py``). While another
run holds it (a real process beating its lease), a second run is refused in one line naming the
holder, before Ray or any write; two runs started in one second get distinct default names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from resdistill import data as D
from resdistill.cli import main as cli_main
from resdistill.config import STAGE_TEACHER, DataConfig, ModelConfig, TrainConfig
from resdistill.models import build_model
from sharding.lease import LEASE
from tests.cli_lines import error_lines
from tests.slide_factory import blob_image, write_slide
from tests.test_distill import save_checkpoint, teacher_payload
from tests.test_evaluate import save_checkpoint as save_model
from tests.test_predict_scale import chain, model, predict

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)

HOLD = """
import sys
from sharding.lease import Lease
from sharding.storage import open_storage
Lease(open_storage(sys.argv[1]), sys.argv[2], heartbeat_s=0.5).acquire()
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def held(url: str | Path, owner: str) -> Iterator[subprocess.Popen]:
    """Another run (a process of its own) holding the lease on ``url`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(url), owner], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def refused_line(text: str, proc: subprocess.Popen, owner: str) -> None:
    """``text`` is one line naming the holding run (its command and pid) and how to clear it."""
    assert "\n" not in text.strip(), text
    assert f"is in use by another '{owner}' run" in text and f"pid {proc.pid}" in text, text


def refused(argv: list[str], proc: subprocess.Popen, owner: str, capsys) -> None:  # noqa: ANN001
    """``resdistill ARGV`` exits 2 with one error line naming the holder ``proc``."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    refused_line(errors[0], proc, owner)


def test_two_runs_in_one_second_get_their_own_names() -> None:
    """A default name used to be ``<stage>-<mag>-<time to the second>``: two runs started
    together shared a run folder and resumed each other's checkpoints."""
    from resdistill.train.driver import default_name

    cfg = TrainConfig(STAGE_TEACHER, DataConfig(url="d"), model=ModelConfig(mag="10x"))
    names = {default_name(cfg) for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("teacher-10x-") for n in names)


def _teacher_ckpt(tiny_dataset: Path, folder: Path) -> str:
    info = D.DatasetInfo.load(str(tiny_dataset))
    torch.manual_seed(0)
    return save_checkpoint(folder, teacher_payload(build_model("resnet18", 2), info, "10x"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_a_run_folder_in_use_is_refused(
    stage: str, ray_cluster: str, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    storage = tmp_path / "runs"
    argv = [stage, "--data", str(tiny_dataset), "--storage", str(storage), "--name", "same",
            "--workers", "1", "--batch-size", "8", "--loader-workers", "0", "--epochs", "1",
            "--steps-per-epoch", "1", "--address", ray_cluster]  # fmt: skip
    if stage == "distill":
        ckpt = _teacher_ckpt(tiny_dataset, tmp_path / "t" / "checkpoint_epoch0001")
        argv += ["--teacher", ckpt, "--student-mag", "5x"]
    with held(storage / "same", f"resdistill {stage}") as proc:
        refused(argv, proc, f"resdistill {stage}", capsys)
        assert sorted(p.name for p in (storage / "same").iterdir()) == ["_state"]  # nothing written


@pytest.mark.slow
def test_a_tune_run_folder_in_use_is_refused(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    storage = tmp_path / "runs"
    argv = [
        "tune", "--data", str(tiny_dataset), "--teacher-mode", "--storage", str(storage),
        "--name", "sw", "--workers", "1", "--cpus-per-worker", "0.9", "--trial-cpus", "0.1",
        "--batch-size", "8", "--loader-workers", "0", "--steps-per-epoch", "1", "--epochs", "1",
        "--num-samples", "1", "--no-default-space", "--space", "lr=choice:0.001",
        "--verbose", "0", "--address", ray_cluster,
    ]  # fmt: skip
    with held(storage / "sw", "resdistill tune") as proc:
        refused(argv, proc, "resdistill tune", capsys)
        assert not (storage / "sw" / "config.yaml").exists()


@pytest.mark.slow
def test_a_study_out_in_use_is_refused(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    out = tmp_path / "study"
    ckpt = _teacher_ckpt(tiny_dataset, tmp_path / "t" / "checkpoint_epoch0001")
    argv = [
        "study", "--data", str(tiny_dataset), "--teacher", ckpt, "--out", str(out),
        "--student-mags", "5x", "--label-fractions", "1", "--unlabelled-shares", "0.5",
        "--seeds", "1", "--epochs", "1", "--student-epochs", "1", "--batch-size", "8",
        "--loader-workers", "0", "--address", ray_cluster,
    ]  # fmt: skip
    with held(out, "resdistill study") as proc:
        refused(argv, proc, "resdistill study", capsys)
        assert sorted(p.name for p in out.iterdir()) == ["_state"]


@pytest.mark.slow
def test_a_predict_out_in_use_is_refused_and_released_after(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ``predict`` runs on one ``--out`` used to predict the same slides twice and the last
    merge dropped the other's: the second is refused (exit 2, one line) and writes nothing; the
    first's lease is gone once it ends."""
    ckpt = save_model(tmp_path / "student", model(0, 0.2), stage="student", mag="1p25x",
                      tile_px=16, read_chain=chain())  # fmt: skip
    slide = write_slide(tmp_path / "S1.svs", blob_image(1024, 768, seed=0), app_mag=5, mpp=2.0)
    out = tmp_path / "out"
    with held(out, "resdistill predict") as proc:
        capsys.readouterr()
        assert predict(ray_cluster, ckpt, [str(slide)], str(out)) == 2
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1, errors
        refused_line(errors[0], proc, "resdistill predict")
        assert sorted(p.name for p in out.iterdir()) == ["_state"]
    assert predict(ray_cluster, ckpt, [str(slide)], str(out)) == 0
    assert (out / "slides.parquet").exists() and not (out / LEASE).exists()
