"""A rerun resumes only its own run: ``--name`` on another dataset or with a setting that changes
what is learnt used to continue the first run's weights silently. Now it is refused in one line
naming the difference, before Ray or any write, unless ``--resume-from`` names the checkpoint
(then its weights continue under the new settings). Real Ray Train runs (one worker)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from resdistill import checkpoint as C
from resdistill.cli import main as cli_main
from resdistill.config import STAGE_TEACHER, DataConfig, OptimConfig, RunOptions, TrainConfig
from sharding.lease import LEASE
from tests.cli_lines import error_lines
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.timeout(600)


def test_what_may_differ_on_resume() -> None:
    """Extending a run, moving or copying its dataset, its speed and run options resume; a
    setting that changes what is learnt (the learning rate, the workers, hence the global batch)
    does not."""
    from resdistill.train.resume_guard import differences

    plan = {"dataset": {"classes": ["a", "b"], "counts": {"train": 4}}}

    def planned(data: DataConfig, **sections: Any) -> dict[str, Any]:
        return TrainConfig(STAGE_TEACHER, data, **sections).to_dict() | {"plan": plan}

    data = DataConfig(url="s3://b/ds")
    base = planned(data)
    same = planned(replace(data, url="/copy/of/ds", loader_workers=0, eval_batch_size=7),
                   optim=OptimConfig(epochs=40), run=RunOptions(name="t", keep=3, device="cpu"))  # fmt: skip
    assert differences(base, same) == []
    lr = planned(data, optim=OptimConfig(lr=0.01))
    assert differences(base, lr) == ["--lr 0.001 in the run, 0.01 now"]
    workers = planned(data, run=RunOptions(workers=4))
    assert differences(base, workers) == ["--workers 2 in the run, 4 now"]
    other = base | {"plan": {"dataset": {"classes": ["a", "b"], "counts": {"train": 5}}}}
    assert differences(base, other)[0].startswith("--data s3://b/ds (dataset.json fingerprint ")


def teacher(data: Path, storage: Path, address: str, *extra: str) -> list[str]:
    """``resdistill teacher`` of run ``t1``: one epoch of 2 steps at lr 0.001, one worker."""
    return [
        "teacher", "--data", str(data), "--storage", str(storage), "--name", "t1",
        "--workers", "1", "--batch-size", "8", "--loader-workers", "0", "--shuffle-buffer", "16",
        "--epochs", "1", "--steps-per-epoch", "2", "--arch", "resnet-small", "--address", address,
        *extra,
    ]  # fmt: skip


def latest(run: Path) -> str:
    return str(sorted(run.glob("checkpoint_epoch*"))[-1])


def written(run: Path) -> dict[str, int]:
    """What a run folder holds besides its lease: ``{file: mtime}``."""
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("*") if "_state" not in p.parts}


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``resdistill ARGV`` exits 2; its one error line."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def first_run(ray_cluster: str, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, str]:  # fmt: skip
    """``<storage>/t1``: one epoch of a teacher at lr 0.001; ``(storage, its checkpoint)``."""
    storage = tmp_path_factory.mktemp("guard") / "runs"
    assert cli_main(teacher(tiny_dataset, storage, ray_cluster)) == 0
    assert not (storage / "t1" / LEASE).exists()  # released at the end
    return storage, latest(storage / "t1")


@pytest.mark.slow
def test_a_rerun_with_other_settings_or_data_is_refused(
    first_run: tuple[Path, str], ray_cluster: str, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    storage, ckpt = first_run
    files = written(storage / "t1")
    line = refused(teacher(tiny_dataset, storage, ray_cluster, "--lr", "0.01"), capsys)
    assert "--lr 0.001 in the run, 0.01 now" in line and f"--resume-from {ckpt}" in line, line

    other = tmp_path / "other-dataset"
    write_dataset(other, seed=1)
    line = refused(teacher(other, storage, ray_cluster), capsys)
    assert re.search(r"--data .*fingerprint .* in the run, .* now", line) and str(other) in line

    # --resume-from names a checkpoint the rerun would not continue
    line = refused(teacher(tiny_dataset, storage, ray_cluster, "--resume-from", str(tmp_path)),
                   capsys)  # fmt: skip
    assert "has checkpoints already" in line
    assert written(storage / "t1") == files  # nothing written
    assert latest(storage / "t1") == ckpt


@pytest.mark.slow
def test_resume_from_continues_the_weights_under_new_settings(
    first_run: tuple[Path, str], ray_cluster: str, tiny_dataset: Path, capsys
) -> None:  # noqa: ANN001
    storage, ckpt = first_run
    # into a new run: it starts from the checkpoint it names
    argv = teacher(tiny_dataset, storage, ray_cluster, "--name", "t2", "--lr", "0.01",
                   "--epochs", "2", "--resume-from", ckpt)  # fmt: skip
    assert cli_main(argv) == 0
    trainer = C.load_checkpoint(latest(storage / "t2"), C.TRAINER_FILE)
    assert trainer["state"]["restored_from"] == [ckpt] and trainer["state"]["epoch"] == 2
    assert trainer["config"]["optim"]["lr"] == 0.01

    # into its own run: it continues there, and then a plain rerun is held to the new settings
    argv = teacher(tiny_dataset, storage, ray_cluster, "--lr", "0.01", "--epochs", "2",
                   "--resume-from", ckpt)  # fmt: skip
    assert cli_main(argv) == 0
    trainer = C.load_checkpoint(latest(storage / "t1"), C.TRAINER_FILE)
    assert Path(latest(storage / "t1")).name == "checkpoint_epoch0002"
    assert trainer["state"]["restored_from"] == [ckpt] and trainer["state"]["step"] == 4
    assert trainer["config"]["optim"]["lr"] == 0.01
    line = refused(teacher(tiny_dataset, storage, ray_cluster, "--epochs", "3"), capsys)
    assert "--lr 0.01 in the run, 0.001 now" in line
