"""A corrupted, truncated or missing shard stops reading with one line naming it: through loader
workers, in training and evaluation, and in ``resdistill evaluate``. Never a hang, never a skip."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from resdistill.data import DatasetInfo, ShardError, make_loader
from resdistill.models import build_model
from sharding.layout import shard_name
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.timeout(300)

BAD = shard_name("train", 1)


def _dataset(root: Path) -> Path:
    write_dataset(root, shard_sizes={"train": [12, 12, 12], "val": [8], "test": [8]})
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # cut inside a member


def _cut_at_a_header(path: Path) -> None:
    """Cut the tar exactly before a member's header in the middle: tarfile then just stops."""
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[len(tf.getmembers()) // 2].offset
    path.write_bytes(path.read_bytes()[:offset])


def _garble_a_header(path: Path) -> None:
    """Overwrite a member header in the middle with garbage (bad checksum)."""
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[len(tf.getmembers()) // 2].offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 512] = b"\x7f" * 512
    path.write_bytes(bytes(data))


def _bad_image(path: Path) -> None:
    """Rewrite the shard with one image member that is not a JPEG."""
    out = io.BytesIO()
    done = False
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if not done and member.name.endswith(".10x.jpg"):
                data, done = data[:40], True
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def _remove(path: Path) -> None:
    path.unlink()


DAMAGE = [_truncate, _cut_at_a_header, _garble_a_header, _bad_image, _remove]


def _read_all(root: Path, *, train: bool) -> None:
    info = DatasetInfo.load(str(root))
    loader = make_loader(info, ["train"], ["10x", "5x"], batch_size=4, train=train,
                         num_workers=2, shuffle_buffer=8)  # fmt: skip
    try:
        for _ in range(3 if train else 1):
            for _batch in loader.epoch():
                pass
    finally:
        loader.close()


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_damaged_shard_stops_reading_with_one_line(tmp_path: Path, damage, train: bool) -> None:
    root = _dataset(tmp_path / "ds")
    damage(root / BAD)
    with pytest.raises(ShardError) as err:
        _read_all(root, train=train)
    message = str(err.value)
    assert "\n" not in message and BAD in message, message


def test_evaluate_prints_one_line_naming_the_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from resdistill.commands import evaluate
    from tests.test_evaluate import _cli, save_checkpoint

    root = _dataset(tmp_path / "ds")
    bad = shard_name("test", 0)
    _truncate(root / bad)
    info = DatasetInfo.load(str(root))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model("resnet18", 2), stage="teacher",
                           mag="10x", tile_px=info.tile_px["10x"])  # fmt: skip
    capsys.readouterr()
    rc = _cli(evaluate, [str(ckpt), "--data", str(root), "--split", "test", "--no-plots", "--out", str(tmp_path / "out"),
                         "--bench-seconds", "0.1", "--loader-workers", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([ln for ln in err if "error" in ln]) == 1 and bad in err[-1], err


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_close_after_a_damaged_read_stops_the_workers_at_once(tmp_path: Path, train: bool) -> None:
    """An epoch that ends in a ShardError leaves no loader worker running after ``close()``
    (left to the garbage collector, each would hold the process for torch's join timeout)."""
    root = _dataset(tmp_path / "ds")
    _garble_a_header(root / BAD)
    loader = make_loader(DatasetInfo.load(str(root)), ["train"], ["10x", "5x"], batch_size=4,
                         train=train, num_workers=2, shuffle_buffer=8)  # fmt: skip
    with pytest.raises(ShardError):
        for _ in range(3):
            for _batch in loader.epoch():
                pass
    workers = list(loader.loader._iterator._workers)
    loader.close()
    assert workers and not any(w.is_alive() for w in workers)
