"""``resdistill predict`` at scale: the Ray Data engine on the session's Ray cluster.

Slides of 1024 x 768 level-0 pixels at 2 um/px (5x) are read through a recorded read chain with
regions of 32 px at 2.5x (64 level-0 px: a 16 x 12 grid). Among good slides, one is truncated (it
cannot be opened: the planner's failure) and one has the second half of its level-0 tiles
destroyed (it plans, then its region reads fail inside the dataset's read tasks): each gets a
status row and one line, the others are predicted, the exit code is 1. The same runs from the S3
endpoint. A rerun skips the slides done (their files untouched). The cascade escalates exactly the
tiles whose student top probability is under the threshold, compared with the student's own
probabilities from a run without the cascade, and takes the teacher's probabilities for them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch

from resdistill.commands import predict as predict_cmd
from resdistill.models import build_model
from sharding.storage import open_storage
from tests.cli_lines import error_lines
from tests.slide_factory import blob_image, truncate, write_slide
from tests.test_evaluate import _cli, save_checkpoint

pytestmark = pytest.mark.timeout(600)

CLASSES = ("benign", "tumor")
GOOD = ("a", "b", "c")


def chain(min_tissue: float = 0.5, top: str = "2p5x") -> dict:
    """A read chain as a dataset.json records it: 2.5x (32 px) and 1.25x (16 px)."""
    return {
        "magnifications": [top, "1p25x"], "tile_px": {top: 32, "1p25x": 16},
        "image_format": "jpeg", "quality": 90, "min_tissue": min_tissue,
    }  # fmt: skip


def model(seed: int, scale: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model("resnet18", len(CLASSES))
    with torch.no_grad():  # logits that spread the probabilities over the tiles
        net.net.fc.weight.mul_(scale)
    return net


def damage_level0(src: Path, dst: Path) -> Path:
    """``src`` with the second half of its level-0 tiles zeroed: it opens and plans (the pyramid
    levels are intact), but reading those regions fails."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    for offset, count in spans[len(spans) // 2 :]:
        data[offset : offset + count] = bytes(count)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """slides/{a,b,c}.svs good, t.svs truncated, d.svs damaged mid-way; a 1.25x student and a 2.5x
    teacher on one read chain, and a teacher whose dataset's top magnification is 5x."""
    root = tmp_path_factory.mktemp("scale")
    (root / "slides").mkdir()
    for i, name in enumerate(GOOD):
        write_slide(
            root / "slides" / f"{name}.svs", blob_image(1024, 768, seed=i), app_mag=5, mpp=2.0
        )
    truncate(root / "slides" / "a.svs", root / "slides" / "t.svs", keep=0.6)
    damage_level0(root / "slides" / "b.svs", root / "slides" / "d.svs")
    save_checkpoint(
        root / "student", model(0, 0.2), stage="student", mag="1p25x", tile_px=16,
        read_chain=chain(),
    )  # fmt: skip
    save_checkpoint(
        root / "teacher", model(1, 0.2), stage="teacher", mag="2p5x", tile_px=32,
        read_chain=chain(),
    )  # fmt: skip
    save_checkpoint(
        root / "other", model(1, 0.2), stage="teacher", mag="2p5x", tile_px=32,
        read_chain={**chain(), "magnifications": ["5x", "2p5x"], "tile_px": {"5x": 64, "2p5x": 32}},
    )  # fmt: skip
    return root


def predict(address: str, ckpt: Path | str, slides: list[str], out: str, *extra: str) -> int:
    argv = [str(ckpt), *slides, "--out", out, "--address", address, "--heatmap-px", "256"]
    return _cli(predict_cmd, [*argv, "--batch-size", "32", *extra])


def table(out: str, name: str):
    return pq.read_table(io.BytesIO(open_storage(out).read_bytes(name))).to_pandas()


def check_run(out: str, slides: Path | str, err: str) -> None:
    """a, b, c predicted; t and d failed with a status row and one ``skipped`` line each."""
    s = table(out, "slides.parquet").set_index("slide")
    assert sorted(s.index) == ["a", "b", "c", "d", "t"]
    assert (s.loc[list(GOOD), "status"] == "ok").all()
    assert "not a slide OpenSlide can read" in s.loc["t", "status"]
    assert "reading the region at" in s.loc["d", "status"]
    for sid in ("t", "d"):
        assert f"{slides}/{sid}.svs" in s.loc[sid, "status"]
        lines = [x for x in err.splitlines() if "skipped" in x and f"{sid}.svs" in x]
        assert len(lines) == 1, err
    tiles = table(out, "tiles.parquet")
    assert sorted(set(tiles["slide"])) == list(GOOD)
    for sid in GOOD:
        mine = tiles[tiles["slide"] == sid]
        assert len(mine) == s.loc[sid, "tiles"] > 20
        probs = mine[[f"p_{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        mean = probs.mean(axis=0)
        assert s.loc[sid, "class"] == CLASSES[int(mean.argmax())]
        np.testing.assert_allclose(s.loc[sid, [f"p_{c}" for c in CLASSES]].astype(float), mean)
        assert ((mine["x"] - mine["x"].min()) % 64 == 0).all()


def test_slides_with_a_truncated_one_and_resume(
    setup: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    slides = setup / "slides"
    rc = predict(ray_cluster, setup / "student", [str(slides)], out)
    err = capsys.readouterr().err
    assert rc == 1
    check_run(out, slides, err)
    assert not (tmp_path / "out" / "t.json").exists()
    assert not (tmp_path / "out" / "d.json").exists()

    # the rerun predicts nothing again: the done slides' files stay as they were
    files = sorted(
        p for p in (tmp_path / "out").rglob("*") if p.name.startswith(GOOD) and p.suffix != ".yaml"
    )  # the slides' files (config.yaml holds each run's options, rewritten by the rerun)
    before = {p: p.stat().st_mtime_ns for p in files}
    rc = predict(ray_cluster, setup / "student", [str(slides)], out)
    captured = capsys.readouterr()
    assert rc == 1
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert "3 done before (skipped)" in captured.out.replace("\n", " ")
    check_run(out, slides, captured.err)

    # another checkpoint into the same output: refused before any slide
    rc = predict(ray_cluster, setup / "teacher", [str(slides)], out)
    assert rc == 2 and "other settings" in capsys.readouterr().err


def test_slides_from_s3(
    setup: Path, ray_cluster: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_storage(f"{s3_bucket}/cohort")
    for name in (*GOOD, "t", "d"):
        store.put_file(f"{name}.svs", setup / "slides" / f"{name}.svs")
    out = f"{s3_bucket}/predictions"
    rc = predict(ray_cluster, setup / "student", [store.url], out)
    assert rc == 1
    check_run(out, store.url, capsys.readouterr().err)
    assert open_storage(out).exists("a.heatmap-classes.png")


def test_cascade_escalates_exactly_the_unsure_tiles(
    setup: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = [str(setup / "slides" / f"{s}.svs") for s in GOOD]
    cols = [f"p_{c}" for c in CLASSES]
    assert predict(ray_cluster, setup / "student", slides, str(tmp_path / "s")) == 0
    assert (
        predict(ray_cluster, setup / "teacher", slides, str(tmp_path / "t"), "--heatmap", "none")
        == 0
    )
    assert not list((tmp_path / "t").glob("*.png"))  # --heatmap none: tables and .npy only
    assert (tmp_path / "t" / "a.heatmap.npy").exists()
    student = table(str(tmp_path / "s"), "tiles.parquet").set_index(["slide", "x", "y"])
    teacher = table(str(tmp_path / "t"), "tiles.parquet").set_index(["slide", "x", "y"])
    assert list(student.index) == list(teacher.index)  # the same region grid
    top = student[cols].to_numpy().max(axis=1)
    threshold = float(np.quantile(top, 0.4))
    capsys.readouterr()

    rc = predict(
        ray_cluster, setup / "student", slides, str(tmp_path / "c"),
        "--cascade", str(setup / "teacher"), "--escalate", f"{threshold!r}",
    )  # fmt: skip
    shown = capsys.readouterr().out.replace("\n", " ")
    assert rc == 0
    mixed = table(str(tmp_path / "c"), "tiles.parquet").set_index(["slide", "x", "y"])
    assert list(mixed.index) == list(student.index)
    want = top < threshold
    assert 0 < want.sum() < want.size
    assert mixed["escalated"].to_numpy().tolist() == want.tolist()
    np.testing.assert_allclose(
        mixed[cols].to_numpy()[want], teacher[cols].to_numpy()[want], atol=1e-5
    )
    np.testing.assert_allclose(
        mixed[cols].to_numpy()[~want], student[cols].to_numpy()[~want], atol=1e-5
    )

    from resdistill.checkpoint import load_model
    from resdistill.measures.compute import count_flops

    f_s = count_flops(load_model(setup / "student").model, (3, 16, 16))
    f_t = count_flops(load_model(setup / "teacher").model, (3, 32, 32))
    s = table(str(tmp_path / "c"), "slides.parquet").set_index("slide")
    for sid in GOOD:
        mine = mixed.loc[sid]
        assert s.loc[sid, "escalated"] == pytest.approx(mine["escalated"].mean())
        assert s.loc[sid, "flops"] == len(mine) * f_s + int(mine["escalated"].sum()) * f_t
        np.testing.assert_allclose(s.loc[sid, cols].astype(float), mine[cols].to_numpy().mean(0))
    assert f"escalated {want.mean():.1%}" in shown


def test_cascade_refuses_another_grid(
    setup: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = predict(
        ray_cluster, setup / "student", [str(setup / "slides" / "a.svs")], str(tmp_path / "o"),
        "--cascade", str(setup / "other"),
    )  # fmt: skip
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1, err
    assert "32 px at 2.5x" in err[0] and "64 px at 5x" in err[0] and "same region grid" in err[0]
    assert not (tmp_path / "o").exists()


def test_escalate_needs_a_teacher(setup: Path, tmp_path: Path, capsys) -> None:
    slide = str(setup / "slides" / "a.svs")
    rc = _cli(
        predict_cmd,
        [str(setup / "student"), slide, "--out", str(tmp_path / "o"), "--escalate", "0.5"],
    )
    err = capsys.readouterr().err  # an option error: usage, then one line
    errors = error_lines(err)
    assert rc == 2 and len(errors) == 1 and "--escalate needs --cascade" in errors[0], err
