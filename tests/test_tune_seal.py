"""``tune --resume`` unpickles the run folder's state (``Tuner.restore``): it resumes only files
this user's runs wrote (:mod:`resdistill.tune.seal`).

The "tampered" file is a real exploit: a pickle whose loading touches a marker file, so a test
sees both the one-line refusal and that nothing ran. The seal key lives in a per-test
``XDG_CONFIG_HOME``.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from resdistill.errors import UsageError
from resdistill.tune import seal as S
from sharding.storage import open_storage


class Exploit:
    """Unpickling this touches ``marker``: what a writer of the prefix would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (Path.touch, (self.marker,))


@pytest.fixture(autouse=True)
def _own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def _run_folder(root: Path) -> Path:
    """The root-level and trial-level state files a Tune run leaves (contents stand-ins)."""
    run = root / "runs" / "tune1"
    (run / "trial_0").mkdir(parents=True)
    (run / "_train" / "t0").mkdir(parents=True)
    (run / "tuner.pkl").write_bytes(pickle.dumps({"genuine": True}))
    (run / "experiment_state-2026.json").write_text(json.dumps({"trial_data": []}))
    (run / "basic-variant-state-2026.json").write_bytes(pickle.dumps([1, 2]))
    (run / "trial_0" / "params.pkl").write_bytes(pickle.dumps({"lr": 0.1}))
    (run / "trial_0" / "result.json").write_text("{}\n")  # plain JSON: out of scope
    (run / "_train" / "t0" / "snapshot.json").write_text("{}")  # Train's, out of scope
    (run / "config.yaml").write_text("a: 1\n")
    return run


def _refused(store, *words: str) -> str:
    with pytest.raises(UsageError) as err:
        S.verify(store)
    msg = str(err.value)
    assert "\n" not in msg and "--trust-resume" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_scope_is_what_tune_unpickles() -> None:
    assert S.in_scope("tuner.pkl") and S.in_scope("experiment_state-x.json")
    assert S.in_scope("callback-states-x.pkl") and S.in_scope("trial_1/error.pkl")
    assert not S.in_scope("trial_1/result.json") and not S.in_scope("config.yaml")
    assert not S.in_scope("_train/run/x.pkl") and not S.in_scope("_state/tune-seal.json")
    assert not S.in_scope("trial_1/checkpoint_000000/model.pt")


def test_a_sealed_folder_verifies_and_any_change_is_refused(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    store = open_storage(str(run))
    _refused(store, str(run / S.SEAL), "missing")  # no seal yet (a run from before seals)
    S.seal_stored(store)
    S.verify(store)
    assert oct(S.key_file().stat().st_mode & 0o777) == "0o600"
    assert S.key_file().read_text().strip() not in (run / S.SEAL).read_text()

    # tuner.pkl swapped for an exploit: refused by name, nothing unpickled
    genuine = (run / "tuner.pkl").read_bytes()
    marker = tmp_path / "pwned"
    (run / "tuner.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    _refused(store, str(run / "tuner.pkl"), "not a file this run wrote")
    assert not marker.exists()
    (run / "tuner.pkl").write_bytes(genuine)
    S.verify(store)

    # a planted state file Tune would load (its callbacks' state), and a trial's pickle
    for planted in ("callback-states-z.pkl", "trial_0/error.pkl"):
        (run / planted).write_bytes(pickle.dumps(Exploit(marker)))
        _refused(store, str(run / planted))
        (run / planted).unlink()
    S.verify(store)

    # the seal rewritten to vouch for the exploit, without the key: its MAC fails
    (run / "tuner.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    doc = json.loads((run / S.SEAL).read_text())
    doc["files"]["tuner.pkl"].append(S.sha256((run / "tuner.pkl").read_bytes()))
    (run / S.SEAL).write_text(json.dumps(doc))
    _refused(store, "signature does not match")
    assert not marker.exists()


def test_another_machine_without_the_key_is_refused(tmp_path: Path, monkeypatch) -> None:
    run = _run_folder(tmp_path)
    store = open_storage(str(run))
    S.seal_stored(store)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "elsewhere"))
    _refused(store, "no seal key", str(tmp_path / "elsewhere"))
    # a different key (another user) does not verify either
    S.load_key(create=True)
    _refused(store, "signature does not match")


def test_staged_state_is_sealed_before_upload(tmp_path: Path) -> None:
    """:class:`ResumeSeal` hashes what Tune staged; an upload of those bytes then verifies, and
    an older staged version of a file stays accepted (an upload may trail the staging)."""
    staged = _run_folder(tmp_path / "staging")
    run = tmp_path / "storage" / "tune1"
    callback = S.ResumeSeal()
    assert pickle.loads(pickle.dumps(callback)).__dict__.keys() == callback.__dict__.keys()
    callback.seal_staged(staged, str(run))
    older = (staged / "experiment_state-2026.json").read_bytes()
    (staged / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [1]}))
    callback.seal_staged(staged, str(run))
    shutil.copytree(staged, run, dirs_exist_ok=True)
    store = open_storage(str(run))
    S.verify(store)
    (run / "experiment_state-2026.json").write_bytes(older)
    S.verify(store)
    (run / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [2]}))
    _refused(store, "experiment_state-2026.json")


def test_the_seal_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    store = open_storage(f"{s3_bucket}/runs/tune1")
    store.write_bytes("tuner.pkl", pickle.dumps({"genuine": True}))
    store.write_bytes("trial_0/params.pkl", pickle.dumps({"lr": 0.1}))
    S.seal_stored(store)
    S.verify(store)
    store.write_bytes("tuner.pkl", pickle.dumps(Exploit(tmp_path / "pwned")))
    _refused(store, f"{s3_bucket}/runs/tune1/tuner.pkl")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_real_run_resumes_and_its_tampered_tuner_pkl_is_refused(
    ray_cluster: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    """Every state file a real tuning run wrote is in its seal (its resume passes); the same
    folder with an exploit in ``tuner.pkl`` is refused in one line before Ray restores it."""
    from resdistill.commands.generate import parse
    from resdistill.commands.tune import SPEC
    from resdistill.tune.run import tune_run

    runs = tmp_path / "runs"
    argv = ["--data", str(tiny_dataset), "--teacher-mode", "--arch", "resnet-small",
            "--storage", str(runs), "--name", "sealed", "--workers", "1",
            "--cpus-per-worker", "0.9", "--trial-cpus", "0.1", "--batch-size", "8",
            "--loader-workers", "0", "--shuffle-buffer", "16", "--steps-per-epoch", "2",
            "--schedule", "constant", "--no-default-space", "--verbose", "0",
            "--scheduler", "fifo", "--epochs", "1", "--num-samples", "1",
            "--space", "lr=grid:0.001,0.002", "--address", ray_cluster]  # fmt: skip
    first = tune_run(parse(SPEC, argv))
    assert len(first.trials) == 2
    exp = runs / "sealed"
    assert (exp / S.SEAL).exists()

    genuine = (exp / "tuner.pkl").read_bytes()
    marker = tmp_path / "pwned"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(UsageError) as err:
        tune_run(parse(SPEC, [*argv, "--resume"]))
    msg = str(err.value)
    assert "\n" not in msg and str(exp / "tuner.pkl") in msg and "--trust-resume" in msg, msg
    assert not marker.exists()

    (exp / "tuner.pkl").write_bytes(genuine)
    again = tune_run(parse(SPEC, [*argv, "--resume"]))
    assert again.resumed and sorted(r.status for r in again.trials) == ["done", "done"]
