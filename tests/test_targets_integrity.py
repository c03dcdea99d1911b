"""Cached targets cannot validate over another teacher's arrays.

A ``teacher-targets`` rerun into the same root with another teacher, killed part-way, used to
leave the first teacher's ``targets.json`` over some of the second teacher's ``.npz`` files, and
distillation from the first teacher accepted them. Now a (re)write removes ``targets.json``
first, records each ``.npz``'s sha256 in it and distillation checks them as it reads; and a root
another run holds is refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from resdistill import data as D
from resdistill.data.cached import make_cached_loader
from resdistill.data.targets import StaleTargetsError, TargetsIndex, check_for_distill
from resdistill.train.targets import write_targets
from resdistill.train.targets_config import TargetsConfig
from tests.test_run_leases import held, refused_line
from tests.test_teacher_targets import _teacher, geo_dataset, geo_teacher  # noqa: F401

pytestmark = pytest.mark.timeout(600)
SHARD = "train/shard-000000.tar"


class Killed(Exception):
    """Stands for a ``kill -9`` after the first shard was stored."""


def _write(data: Path, teacher: str, out: Path, log=None) -> TargetsIndex:  # noqa: ANN001
    cfg = TargetsConfig(data=str(data), teacher=teacher, out=str(out), splits=("train",),
                        local=True, batch_size=6)  # fmt: skip
    return write_targets(cfg, log=log)


def _other_teacher(geo_dataset: Path, tmp_path: Path) -> str:  # noqa: F811
    return _teacher(
        D.DatasetInfo.load(str(geo_dataset)), tmp_path / "t2" / "checkpoint_epoch0001", 7
    )


def test_a_killed_rewrite_with_another_teacher_leaves_no_usable_index(
    geo_dataset: Path,  # noqa: F811
    geo_teacher: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "targets"
    first = _write(geo_dataset, geo_teacher, out)
    before = (out / "train" / "shard-000000.npz").read_bytes()
    other = _other_teacher(geo_dataset, tmp_path)

    def die_after_one_shard(line: str) -> None:
        if "samples in" in line:
            raise Killed(line)

    with pytest.raises(Killed):
        _write(geo_dataset, other, out, log=die_after_one_shard)
    assert (out / "train" / "shard-000000.npz").read_bytes() != before  # the other's arrays
    with pytest.raises(FileNotFoundError, match="targets.json: not found"):
        TargetsIndex.load(str(out))
    with pytest.raises(FileNotFoundError, match="rerun|write targets"):
        check_for_distill(str(out), teacher_checkpoint=geo_teacher, data=str(geo_dataset),
                          train_shards=list(first.shards), student_mag="5x", teacher_mag="10x")  # fmt: skip


def test_each_array_is_checked_against_its_recorded_sha256(
    geo_dataset: Path,  # noqa: F811
    geo_teacher: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    mine = _write(geo_dataset, geo_teacher, tmp_path / "mine")
    theirs = _write(geo_dataset, _other_teacher(geo_dataset, tmp_path), tmp_path / "theirs")
    npz = Path(mine.url) / "train" / "shard-000000.npz"
    assert mine.doc["shards"][SHARD]["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert mine.read_shard(SHARD)["logits"].shape[0] == mine.doc["shards"][SHARD]["samples"]

    shutil.copyfile(Path(theirs.url) / "train" / "shard-000000.npz", npz)  # same shapes
    index = TargetsIndex.load(mine.url)
    with pytest.raises(StaleTargetsError, match="stale targets") as info:
        index.read_shard(SHARD)
    assert str(npz) in str(info.value) and "\n" not in str(info.value)

    # as distillation reads it, inside a DataLoader worker: still that one line
    loader = make_cached_loader(D.DatasetInfo.load(str(geo_dataset)), ["train"], "5x", index,
                                batch_size=4, num_workers=1, steps=2)  # fmt: skip
    try:
        with pytest.raises(StaleTargetsError) as info:
            list(loader.epoch())
    finally:
        loader.close()
    assert str(info.value).startswith(str(npz)) and "\n" not in str(info.value)


def test_a_targets_root_in_use_is_refused(
    geo_dataset: Path,  # noqa: F811
    geo_teacher: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from resdistill import teacher_targets

    out = tmp_path / "targets"
    argv = ["--data", str(geo_dataset), "--teacher", geo_teacher, "--out", str(out), "--local",
            "--splits", "train"]  # fmt: skip
    with held(out, "resdistill teacher-targets") as proc:
        capsys.readouterr()
        assert teacher_targets.main(argv) == 2
        err = capsys.readouterr().err.strip()
        refused_line(err, proc, "resdistill teacher-targets")
        assert sorted(p.name for p in out.iterdir()) == ["_state"]  # nothing written
    assert teacher_targets.main(argv) == 0  # the holder is gone: its lease is taken over
    assert TargetsIndex.load(str(out)).doc["shards"][SHARD]["sha256"]
