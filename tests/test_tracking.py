"""``--tracking``: records of teacher and tune runs read back with the tools users open them with
(MlflowClient, TensorBoard's EventAccumulator), on a real local Ray cluster."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resdistill.commands import teacher
from resdistill.commands import tune as tune_command
from resdistill.commands.generate import parse
from resdistill.errors import UsageError
from resdistill.tracking import RunInfo, resolve, tracked_run
from resdistill.tracking.backends import BEST_ARTIFACT, BEST_EPOCH_TAG, BEST_TAG

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One run storage for the module: its MLflow database is created once."""
    yield tmp_path_factory.mktemp("tracked") / "runs"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _client(runs: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------
# Pieces that need no cluster
# ---------------------------------------------------------------------------------------------


def test_tracking_option_resolves_and_refuses(tmp_path: Path) -> None:
    base = dict(storage=str(tmp_path / "runs"), name="t1")
    tb = resolve("tensorboard", folder=str(tmp_path / "runs" / "t1"), **base)
    assert tb.target == str(tmp_path / "runs" / "t1" / "tensorboard")
    assert tb.describe().endswith(f"(view: tensorboard --logdir {tmp_path / 'runs'})")
    assert resolve("tensorboard:tb", folder="x", **base).target == str(Path("tb").resolve() / "t1")
    ml = resolve("mlflow", folder="x", **base)
    assert ml.target == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert ml.artifacts == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert ml.experiment == "resdistill"
    assert resolve("mlflow:http://h:5000", folder="x", **base).target == "http://h:5000"
    assert (
        resolve("mlflow:db/m.db", folder="x", **base).target
        == f"sqlite:///{Path('db/m.db').resolve()}"
    )
    assert not resolve("none", folder="x", **base).on
    with pytest.raises(UsageError, match="cannot hold a local MLflow database"):
        resolve("mlflow", storage="s3://b/runs", name="t1", folder="s3://b/runs/t1")
    with pytest.raises(UsageError, match="drop :DIR"):
        resolve("tensorboard:tb", storage="runs", name="tune1", folder=None)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UsageError, match=r"--tracking wandb needs wandb: pip install wandb"):
            resolve("wandb", folder="x", **base)
    # the flag is checked where it is parsed, the message names it
    for bad in ("mlfow", "none:x"):
        with pytest.raises(SystemExit):
            parse(teacher.SPEC, ["--data", "ds", "--tracking", bad])


def test_tensorboard_records_rank_0_each_epoch_and_the_best(tmp_path: Path) -> None:
    """The Train callback as the controller calls it: two ranks report each epoch; the event
    files hold rank 0's values, one per epoch, and the best checkpoint's URL as text."""
    import ray.train

    from resdistill.tracking.hooks import EpochTracking

    run = tracked_run(resolve("tensorboard", storage=str(tmp_path), name="t", folder=str(tmp_path / "t")),
                      RunInfo(str(tmp_path / "t"), "t", {"optim.lr": "0.001"}))  # fmt: skip
    run.start()
    ckpt_dir = tmp_path / "t" / "checkpoint_epoch0001"
    ckpt_dir.mkdir()
    callback = EpochTracking(run, epochs=2)
    for epoch, best in ((1, 1), (2, 1)):
        rank0 = {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "train_first_step_s": 0.5,
            "best_epoch": best,
        }
        rank1 = {**rank0, "train_first_step_s": 9.0}
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if epoch == 1 else None
        callback.after_report(None, [rank0, rank1], ckpt)
    scalars = _scalars(tmp_path / "t" / "tensorboard")
    assert scalars["train_loss"] == [(1, 1.0), (2, 0.5)]
    assert scalars["train_first_step_s"] == [(1, 0.5), (2, 0.5)]  # rank 0's, not rank 1's
    assert "epoch" not in scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "t" / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["tensors"]) >= {"config/text_summary", "best_checkpoint/text_summary"}
    text = acc.Tensors("best_checkpoint/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == f"epoch 1: {ckpt_dir}"


def test_tensorboard_on_s3_uploads_every_epoch(s3_bucket: str, tmp_path: Path) -> None:
    from sharding.storage import open_storage

    url = f"{s3_bucket}/runs/t"
    run = tracked_run(resolve("tensorboard", storage=f"{s3_bucket}/runs", name="t", folder=url),
                      RunInfo(url, "t"))  # fmt: skip
    run.start()
    run.log({"train_loss": 0.7}, 1)
    store = open_storage(f"{url}/tensorboard")
    (name,) = store.list()
    (tmp_path / name).write_bytes(store.read_bytes(name))
    assert _scalars(tmp_path)["train_loss"] == [(1, pytest.approx(0.7))]
    run.log({"train_loss": 0.5}, 2)
    run.end()
    (tmp_path / name).write_bytes(store.read_bytes(name))
    assert [s for s, _ in _scalars(tmp_path)["train_loss"]] == [1, 2]


def test_mlflow_rerun_continues_its_run(runs: Path) -> None:
    """A rerun of a run folder finds its MLflow run by key: metrics continue, a changed
    setting is kept as a tag (MLflow never changes a param)."""
    tracking = resolve("mlflow", storage=str(runs), name="r", folder=str(runs / "r"),
                       experiment="reruns")  # fmt: skip
    first = tracked_run(tracking, RunInfo(str(runs / "r"), "r", {"optim.epochs": "1"}))
    first.start()
    first.log({"train_loss": 0.9}, 1)
    first.end()
    again = tracked_run(tracking, RunInfo(str(runs / "r"), "r", {"optim.epochs": "2"}))
    again.start()
    again.log({"train_loss": 0.4}, 2)
    again.end("FAILED")
    client = _client(runs)
    (run,) = client.search_runs([client.get_experiment_by_name("reruns").experiment_id])
    assert run.info.run_id == first.run_id == again.run_id and run.info.status == "FAILED"
    assert run.data.params["optim.epochs"] == "1" and run.data.tags["changed.optim.epochs"] == "2"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0.9, 0.4]


def test_mlflow_server_that_does_not_answer_is_refused_at_start(tmp_path: Path) -> None:
    """One line naming the URI, in seconds (MLflow alone retries for about four minutes)."""
    from tests.fixtures_ray import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    run = tracked_run(resolve(f"mlflow:{uri}", storage=str(tmp_path), name="t", folder="t"),
                      RunInfo(str(tmp_path / "t"), "t"))  # fmt: skip
    with pytest.raises(UsageError, match=f"^--tracking mlflow:{uri}: ") as err:
        run.start()
    assert "\n" not in str(err.value)


def test_wandb_offline_rerun_resumes_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where wandb is installed (not in CI): offline, a rerun writes to the same run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "runs" / "t"
    tracking = resolve("wandb:proj", storage=str(tmp_path / "runs"), name="t", folder=str(folder))
    for epoch in (1, 2):  # the run, then its rerun
        run = tracked_run(tracking, RunInfo(str(folder), "t", {"optim.lr": "0.001"}))
        run.start()
        run.log({"train_loss": 1.0 / epoch}, epoch)
        run.best(str(folder / "checkpoint_epoch0001"), epoch, {})
        run.end()
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run.info.key}") for r in runs)


# ---------------------------------------------------------------------------------------------
# Real runs on the session's Ray cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_mlflow_run_holds_config_epochs_and_best_checkpoint(
    ray_cluster: str, tiny_dataset: Path, runs: Path, tmp_path: Path
) -> None:
    """``teacher --tracking mlflow`` with 2 workers: one MLflow run (rank 0 only) in the run
    storage's database, the resolved config as params, one value per epoch, the best checkpoint
    as a tag and a referencing artifact, all as the run's summary says."""
    summary_json = tmp_path / "summary.json"
    argv = ["--data", str(tiny_dataset), "--storage", str(runs), "--name", "t-ml", "--workers", "2",
            "--batch-size", "8", "--loader-workers", "0", "--shuffle-buffer", "16",
            "--steps-per-epoch", "2", "--epochs", "2", "--arch", "resnet-small",
            "--address", ray_cluster, "--tracking", "mlflow", "--summary-json", str(summary_json)]  # fmt: skip
    assert teacher.main(argv) == 0
    summary = json.loads(summary_json.read_text())
    client = _client(runs)
    exp = client.get_experiment_by_name("resdistill")
    (run,) = client.search_runs([exp.experiment_id])  # one run, not one per worker
    assert run.info.status == "FINISHED" and run.info.run_name == "t-ml"
    params = run.data.params
    expected = {"optim.epochs": "2", "data.batch_size": "8", "model.arch": "resnet-small",
                "run.workers": "2", "run.tracking": "mlflow", "plan.steps_per_epoch": "2"}  # fmt: skip
    assert {k: params.get(k) for k in expected} == expected
    assert params["data.url"] == str(tiny_dataset) and params["stage"] == "teacher"
    for key in ("train_loss", "val_loss", "val_macro_f1", "lr", "best_epoch"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    last = {m.key: m.value for m in client.get_metric_history(run.info.run_id, "train_first_step_s")
            if m.step == 2}  # fmt: skip
    rank0 = summary["last_metrics"]["train_first_step_s"]  # not all-reduced: this rank's own
    assert last["train_first_step_s"] == pytest.approx(rank0)
    tags = run.data.tags
    assert tags[BEST_TAG] == summary["best_checkpoint"] and Path(tags[BEST_TAG]).is_dir()
    assert tags[BEST_EPOCH_TAG] == str(summary["best_epoch"])
    assert tags["resdistill.stage"] == "teacher"
    local = client.download_artifacts(run.info.run_id, BEST_ARTIFACT, str(tmp_path))
    assert json.loads(Path(local).read_text())["checkpoint"] == summary["best_checkpoint"]
    assert not (runs / "t-ml" / "tensorboard").exists()


@pytest.mark.slow
def test_tune_logs_one_mlflow_run_per_trial(
    ray_cluster: str, tiny_dataset: Path, runs: Path
) -> None:
    """Two teacher-mode trials of one epoch: two MLflow runs in the experiment named for the
    tuning run, each with its own learning rate among its params and its best checkpoint."""
    from resdistill.tune.run import tune_run

    argv = ["--data", str(tiny_dataset), "--teacher-mode", "--storage", str(runs), "--name", "tn",
            "--workers", "1", "--cpus-per-worker", "0.9", "--trial-cpus", "0.1", "--batch-size", "8",
            "--loader-workers", "0", "--shuffle-buffer", "16", "--steps-per-epoch", "2",
            "--epochs", "1", "--arch", "resnet-small", "--no-default-space", "--scheduler", "fifo",
            "--space", "lr=grid:0.001,0.002", "--num-samples", "1", "--max-concurrent", "2",
            "--verbose", "0", "--address", ray_cluster, "--tracking", "mlflow"]  # fmt: skip
    summary = tune_run(parse(tune_command.SPEC, argv))
    assert len(summary.trials) == 2
    client = _client(runs)
    found = client.search_runs([client.get_experiment_by_name("tn").experiment_id])
    assert sorted(r.data.params["optim.lr"] for r in found) == ["0.001", "0.002"]
    assert len({r.data.tags["resdistill.trial"] for r in found}) == 2
    for r in found:
        assert r.info.status == "FINISHED" and r.data.params["stage"] == "teacher"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_macro_f1")] == [1]
        assert Path(r.data.tags[BEST_TAG]).is_dir()
