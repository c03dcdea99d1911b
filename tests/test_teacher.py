"""Teacher training on a real local Ray cluster, with shards and checkpoints on a real S3 endpoint."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from resdistill import checkpoint as C
from resdistill.commands import teacher
from resdistill.commands.generate import parse
from resdistill.commands.training import train as train_run
from resdistill.measures.metrics import confusion_scores
from resdistill.models import build_model
from resdistill.train import runner
from resdistill.train.optim import lr_at
from resdistill.train.validate import confusion_matrix
from resdistill.train.worker_env import WorkerEnv, unwrap
from sharding.ray_cluster import ray_init
from tests.fixtures_data import write_dataset
from tests.fixtures_ray import free_port, ray_bin, wait_for

pytestmark = pytest.mark.timeout(600)


def _args(data: str, storage: str, name: str, address: str | None, *extra: str) -> Any:
    argv = [
        "--data", data, "--storage", storage, "--name", name, "--workers", "2",
        "--batch-size", "8", "--loader-workers", "1", "--shuffle-buffer", "32",
        "--arch", "resnet18", *extra,
    ]  # fmt: skip
    if address:
        argv += ["--address", address]
    return parse(teacher.SPEC, argv)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Pieces that need no cluster
# ---------------------------------------------------------------------------------------------


def test_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        labels = torch.randint(0, k, (200,), generator=g)
        preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, k, (200,)))
        preds[preds == k - 1] = 0  # one class never predicted
        cm = confusion_matrix(preds, labels, k)
        m = confusion_scores(cm)
        assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
        assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    # a class absent from both labels and predictions does not count (as in scikit-learn)
    labels, preds = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    m = confusion_scores(confusion_matrix(preds, labels, 4))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    # null labels (-1) are skipped
    cm = confusion_matrix(torch.tensor([1, 0]), torch.tensor([-1, 0]), 2)
    assert cm.tolist() == [[1, 0], [0, 0]]


def test_lr_schedules() -> None:
    kw = {"base_lr": 1.0, "total_steps": 100}
    assert lr_at(0, schedule="constant", **kw) == 1.0
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_at(75, schedule="linear", **kw) == pytest.approx(0.25)
    assert lr_at(4, schedule="cosine", warmup_steps=10, **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, schedule="step", **kw)


def test_storage_for_local_and_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, fs = runner.storage_for(str(tmp_path / "runs"))
    assert fs is None and Path(path).is_dir()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    path, fs = runner.storage_for("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.type_name == "s3"
    assert runner.run_url("s3://bucket/runs", "t1") == "s3://bucket/runs/t1"


def test_gpu_settings_without_a_gpu(tmp_path: Path) -> None:
    """The GPU path is configured (NCCL, a GPU per worker, bf16 autocast) even where none runs."""
    trainer = runner.make_trainer(
        lambda config: None, {}, name="g", storage=str(tmp_path), workers=4, gpu=True
    )
    assert trainer.backend_config.backend == "nccl"
    assert trainer.scaling_config.use_gpu and trainer.scaling_config.num_workers == 4
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    cpu = runner.make_trainer(lambda config: None, {}, name="c", storage=str(tmp_path))
    assert cpu.backend_config.backend == "gloo" and not cpu.scaling_config.use_gpu
    ckpt = cpu.run_config.checkpoint_config
    assert (ckpt.num_to_keep, ckpt.checkpoint_score_attribute) == (1, "val_macro_f1")
    assert cpu.run_config.failure_config.max_failures == 2
    gpu_env = WorkerEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    ctx = gpu_env.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    cpu_env = WorkerEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert not isinstance(cpu_env.autocast(), torch.autocast) and not cpu_env.distributed


@pytest.mark.parametrize(
    ("variable", "ours"),
    [(runner.HEALTH_CHECK_ENV, "0.5"), (runner.PREEMPTION_WATCHER_ENV, "0")],
    ids=["poll-interval", "no-preemption-watcher"],
)  # fmt: skip
def test_controller_takes_our_settings_unless_the_user_set_them(
    variable: str, ours: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Train's controller reads these from the driver's environment: the trainer sets ours
    by default (reports wait on the 0.5 s poll; no preemption watcher, an extra polling actor
    and an error-level line per run that our epoch checkpoints do not use) and leaves a user's
    value alone."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv(variable, raising=False)
    runner.make_trainer(lambda config: None, {}, name="p", storage=str(tmp_path))
    assert get_env_vars_to_propagate()[variable] == ours
    monkeypatch.setenv(variable, "3")
    runner.make_trainer(lambda config: None, {}, name="p", storage=str(tmp_path))
    assert get_env_vars_to_propagate()[variable] == "3"


def test_speed_options_run_on_the_cpu() -> None:
    """bf16 autocast, channels-last and torch.compile (the eager backend: no C++ toolchain
    needed) on the CPU, so these GPU-minded paths are exercised by every test run."""
    import dataclasses

    from resdistill.config import ARCH_CHOICES
    from resdistill.models import ARCHITECTURES

    assert set(ARCH_CHOICES) == set(ARCHITECTURES)
    args = parse(
        teacher.SPEC, ["--data", "d", "--amp", "bf16", "--channels-last", "--compile", "eager"]
    )
    env = WorkerEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                      **{k: getattr(args.speed, k) for k in ("amp", "channels_last", "compile")})  # fmt: skip
    assert (env.amp, env.channels_last, env.compile) == ("bf16", True, "eager")
    ctx = env.autocast()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(dataclasses.replace(env, amp="off").autocast(), torch.autocast)
    x = env.input(torch.rand(2, 3, 64, 64))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert env.input(torch.arange(2)).tolist() == [0, 1]  # labels: no layout change
    model = build_model("resnet-small", 3).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend=env.compile)  # as prepare_model does
    with env.autocast():
        logits, features = compiled(x)
    assert logits.dtype == torch.bfloat16 and features.shape == (2, 256, 2, 2)
    logits.float().sum().backward()
    assert model.net.conv1.weight.grad is not None
    assert unwrap(compiled) is model
    assert not any(k.startswith("_orig_mod") for k in unwrap(compiled).state_dict())


def test_load_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    card = C.ModelCard(stage="teacher", arch="resnet18", classes=("a", "b"), mag="10x")
    C.write_checkpoint(good, card=card, state_dict=build_model("resnet18", 2).state_dict(),
                       trainer={}, epoch=1, metrics={})  # fmt: skip
    loaded = C.load_checkpoint(str(good))
    build_model("resnet18", 2).load_state_dict(loaded["state_dict"])
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"payload": io.BytesIO(b"not a tensor")}, bad / C.MODEL_FILE)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        C.load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="model.pt"):
        C.load_checkpoint(str(tmp_path))


def test_bad_options_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = teacher.main(["--data", str(tmp_path / "nothing"), "--epochs", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset.json" in err[0]
    write_dataset(tmp_path / "ds")
    assert teacher.main(["--data", str(tmp_path / "ds"), "--mag", "40x"]) == 2
    assert "40x is not in" in capsys.readouterr().err
    assert teacher.main(["--data", str(tmp_path / "ds"), "--batch-size", "200"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Ray Train runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_on_s3_learn_checkpoint_and_resume(
    ray_cluster: str, tiny_dataset_s3: str, tmp_path: Path
) -> None:
    import boto3

    bucket = tiny_dataset_s3.split("/")[2]
    storage = f"s3://{bucket}/runs"
    trace = tmp_path / "trace"
    # a constant learning rate so that extending the run to 3 epochs keeps the same schedule
    args = _args(tiny_dataset_s3, storage, "t-s3", ray_cluster, "--epochs", "2",
                 "--steps-per-epoch", "4", "--schedule", "constant", "--lr", "2e-4",
                 "--trace-dir", str(trace))  # fmt: skip
    first = train_run(args)
    assert first.epochs == 2
    assert first.latest_checkpoint == f"s3://{bucket}/runs/t-s3/checkpoint_epoch0002"

    s3 = boto3.session.Session().client("s3")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    assert "runs/t-s3/checkpoint_epoch0002/model.pt" in keys
    assert "runs/t-s3/checkpoint_epoch0002/trainer.pt" in keys
    model = C.load_checkpoint(first.latest_checkpoint)
    assert model["classes"] == ["benign", "tumor"] and model["mag"] == "10x"
    build_model(model["arch"], model["num_classes"]).load_state_dict(model["state_dict"])

    # every rank took the same number of steps; both ranks read the S3 shards
    epochs = _jsonl(trace / "epochs.jsonl")
    assert sorted((r["epoch"], r["rank"], r["steps"]) for r in epochs) == [
        (1, 0, 4), (1, 1, 4), (2, 0, 4), (2, 1, 4),
    ]  # fmt: skip

    # a second run with the same name resumes after epoch 2 and continues to epoch 3
    args = replace(args, optim=replace(args.optim, epochs=3))
    second = train_run(args)
    assert second.epochs == 3
    starts = _jsonl(trace / "starts.jsonl")
    assert sorted(s["start_epoch"] for s in starts) == [0, 0, 2, 2]
    state = C.load_checkpoint(second.latest_checkpoint, C.TRAINER_FILE)["state"]
    assert state["resumes"] == 1 and state["step"] == 12
    assert [Path(u).name for u in state["restored_from"]] == ["checkpoint_epoch0002"]
    losses = [h["train_loss"] for h in state["history"]]
    assert len(losses) == 3
    assert losses[-1] < losses[0]  # the loss falls
    assert 0.0 <= state["history"][-1]["val_accuracy"] <= 1.0
    assert state["history"][-1]["val_samples"] == 16  # every val sample scored once, all ranks
    assert second.best_checkpoint and second.best_epoch in (1, 2, 3)
    # the teacher chooses by its labelled val metric, and the summary counts those labels
    assert (second.select, second.metric, second.labelled_val_slides) == (
        "metric", "val_macro_f1", 4
    )  # fmt: skip
    assert state["selection"]["labelled_val_slides"] == 4


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_run_finishes(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    args = _args(str(tiny_dataset), str(tmp_path / "runs"), "t-kill", ray_cluster,
                 "--epochs", "4", "--steps-per-epoch", "8", "--max-failures", "2",
                 "--trace-dir", str(trace))  # fmt: skip
    ray_init(ray_cluster)  # connect before the thread so both share one driver
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(train_run, args)

        snapshot = tmp_path / "runs" / "t-kill" / "checkpoint_manager_snapshot.json"

        def rank0_training_after_checkpoint_1() -> dict[str, Any] | None:
            if future.done():
                future.result()  # surface an early failure
                raise AssertionError("run finished before the worker could be killed")
            try:
                info = json.loads((trace / "rank0.json").read_text())
                # Ray Train V2 commits a reported checkpoint when its controller next polls the
                # workers (every 2 s); a worker killed before that loses the report (by design)
                committed = "checkpoint_epoch0001" in snapshot.read_text()
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            mid_run = info["epoch"] in (2, 3) and info["phase"] == "train"
            return info if committed and mid_run else None

        victim = wait_for(
            rank0_training_after_checkpoint_1, timeout=240, interval=0.02, what="epoch 2 or 3"
        )
        os.kill(victim["pid"], signal.SIGKILL)
        summary = future.result(timeout=400)

    assert summary.epochs == 4
    starts = _jsonl(trace / "starts.jsonl")
    restarted = [s for s in starts if s["start_epoch"] >= 1]
    assert len(restarted) == 2, starts  # both ranks of the new group resumed from a checkpoint
    assert all(s["pid"] != victim["pid"] for s in restarted)
    assert restarted[0]["start_epoch"] < victim["epoch"]  # the killed epoch was run again
    done = {(r["epoch"], r["rank"]) for r in _jsonl(trace / "epochs.jsonl")}
    assert {(4, 0), (4, 1)} <= done


@pytest.mark.slow
def test_uneven_shards_do_not_hang_and_ranks_take_equal_steps(
    ray_cluster: str, tmp_path: Path
) -> None:
    root = tmp_path / "uneven"
    # 3 train shards of 3/17/6 samples: rank 0 gets 17, rank 1 gets 6+3 over 2 loader workers;
    # 1 val shard for 2 ranks: split by sample key.
    write_dataset(root, shard_sizes={"train": [3, 17, 6], "val": [10]})
    trace = tmp_path / "trace"
    # also runs the speed options through DDP: bf16 autocast on CPU, NHWC, torch.compile (eager)
    args = _args(str(root), str(tmp_path / "runs"), "t-uneven", ray_cluster, "--epochs", "1",
                 "--batch-size", "4", "--loader-workers", "2", "--trace-dir", str(trace),
                 "--arch", "resnet-small", "--amp", "bf16", "--channels-last",
                 "--compile", "eager")  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        summary = pool.submit(train_run, args).result(timeout=300)
    epochs = _jsonl(trace / "epochs.jsonl")
    assert sorted((r["rank"], r["steps"], r["samples"]) for r in epochs) == [(0, 3, 12), (1, 3, 12)]
    assert summary.last_metrics["val_samples"] == 10
    saved = C.load_checkpoint(summary.latest_checkpoint)
    build_model("resnet-small", 2).load_state_dict(saved["state_dict"])  # no wrapper prefixes
    speed = C.load_checkpoint(summary.latest_checkpoint, C.TRAINER_FILE)["config"]["speed"]
    assert (speed["amp"], speed["channels_last"], speed["compile"]) == ("bf16", True, "eager")


# ---------------------------------------------------------------------------------------------
# ray start + ray job submit
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_submit_runs_the_teacher(tiny_dataset: Path, tmp_path: Path) -> None:
    """A head with a dashboard on 127.0.0.1, ``ray job submit -- python -m resdistill.teacher``.

    The head runs as ``ray start --block`` in its own process group and is stopped by signalling
    that group (the scoped equivalent of ``ray stop``, which would stop every Ray on the machine,
    the session's ``ray_cluster`` and other test runs' included). Every port is a free one so
    that it can run beside other clusters; draining on SIGTERM is switched off so it stops at once.
    """
    # Ray's unix socket paths must stay under 107 bytes: a short folder, not pytest's tmp_path
    tmp = Path(tempfile.mkdtemp(prefix="rdj-", dir="/tmp" if os.path.isdir("/tmp") else None))
    port, dash = free_port(), free_port()
    env = dict(
        os.environ, RAY_TMPDIR=str(tmp), TMPDIR=str(tmp), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"
    )
    env.pop("RAY_ADDRESS", None)
    ports = {
        opt: str(free_port())
        for opt in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                    "--metrics-export-port")
    }  # fmt: skip
    log_path = tmp_path / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [ray_bin(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dash), *itertools.chain(*ports.items()),
             "--temp-dir", str(tmp / "t"), "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def dashboard_up() -> bool:
            if head.poll() is not None:
                raise AssertionError(f"ray start exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2):
                    return True
            except (urllib.error.URLError, OSError):
                return False

        wait_for(dashboard_up, timeout=180, interval=0.5, what="the Ray dashboard")
        runs = tmp_path / "runs"
        submit = subprocess.run(
            [ray_bin(), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
             sys.executable, "-m", "resdistill.teacher", "--data", str(tiny_dataset),
             "--storage", str(runs), "--name", "t-job", "--epochs", "1", "--workers", "2",
             "--batch-size", "8", "--loader-workers", "0", "--steps-per-epoch", "2"],
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-3000:]
        assert "succeeded" in out
        assert "best checkpoint:" in out
        assert (runs / "t-job" / "checkpoint_epoch0001" / "model.pt").is_file()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert head.returncode is not None
