"""The two read modes of prediction and the matching sharding choice give the documented pixels.

One 40x slide (0.25 um/px) with pyramid levels at 10x and 2.5x subsampled without filtering (a
scanner's quick pyramid), so the 2.5x level's pixels differ from the 10x read box-reduced. It is
sharded twice at 10x, 5x and 2.5x (64/32/16 px, JPEG quality 80): with ``--low-mags-from top``
(2.5x reduced from the 10x read) through :func:`run_shard`, and with ``--low-mags-from native``
(2.5x read from the 2.5x level) through the ``shard`` command. A 2.5x checkpoint records each
dataset's read chain.

* ``--read native`` gives exactly :func:`read_region_at` at 2.5x, encoded and decoded as the
  dataset's tiles, on the same regions, and other pixels than ``as-trained`` on the top dataset;
* ``as-trained`` gives the shard's own tiles, decoded, for either dataset;
* the native dataset's 2.5x tiles are the native read's JPEG bytes, its 10x tiles the top
  dataset's;
* a resumed run with another ``--low-mags-from`` is refused; ``--help`` documents the option.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from resdistill.checkpoint import LoadedModel, load_model, read_chain
from resdistill.cli import main as cli_main
from resdistill.fields import ConfigError
from resdistill.models import build_model
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import save_checkpoint
from tests.test_predict_read_chain import shard_tiles

pytestmark = pytest.mark.timeout(300)

MAG, PX = "2p5x", 16
SHARD = dict(mags="10,5,2.5", tile_px=64, splits=(0, 0, 1), min_tissue=0.3, quality=80)
SHARD_ARGV = ["--mags", "10,5,2.5", "--tile-px", "64", "--splits", "0,0,1", "--min-tissue", "0.3",
              "--quality", "80", "--workers", "0", "--no-progress"]  # fmt: skip


def _checkpoint(folder: Path, ds: Path) -> Path:
    from resdistill.data import DatasetInfo

    desc = json.loads((ds / "dataset.json").read_text())
    # an all-test dataset has no training statistics: the fallback every reader applies
    mean, std = DatasetInfo.load(str(ds)).mean_std(MAG)
    torch.manual_seed(0)
    return save_checkpoint(
        folder, build_model("resnet18", 2), stage="student", mag=MAG, tile_px=PX,
        mean=list(mean), std=list(std),
        dataset=str(ds), read_chain=read_chain(desc),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The slide, its two datasets (``top``, ``native``) and a 2.5x checkpoint of each."""
    from sharding.pipeline import run_shard

    root = tmp_path_factory.mktemp("readmodes")
    slide = write_slide(root / "a.svs", blob_image(2048, 1536, seed=21), app_mag=40, mpp=0.25)
    (root / "labels.csv").write_text("slide,label\na,tumor\n")
    labels = root / "labels.csv"
    assert run_shard([slide], str(root / "top"), labels=labels, workers=0, progress=False, **SHARD)
    argv = [str(slide), "--out", str(root / "native"), "--labels", str(labels), *SHARD_ARGV]
    assert cli_main(["shard", *argv, "--low-mags-from", "native"]) == 0
    return {
        "slide": slide,
        "top": root / "top",
        "native": root / "native",
        "ckpt_top": _checkpoint(root / "ckpt_top", root / "top"),
        "ckpt_native": _checkpoint(root / "ckpt_native", root / "native"),
    }


def _read(slide_path: Path, model: LoadedModel, read: str) -> tuple[dict[str, np.ndarray], object]:
    """key -> the tile ``read_tiles`` gives with ``read``, for every kept cell; and the chain."""
    from resdistill.read_chain import chain_of, plan_tiles, read_tiles
    from sharding.slide import open_slide

    chain = chain_of(model, read=read)
    slide = open_slide(slide_path)
    try:
        plan = plan_tiles(slide, str(slide_path), chain)
        idx = np.flatnonzero(plan.keep)
        tiles = read_tiles(slide, plan, chain, idx)
    finally:
        slide.close()
    assert tiles.shape == (idx.size, PX, PX, 3) and tiles.dtype == np.uint8
    keys = [f"a_{plan.xs[i]}_{plan.ys[i]}" for i in idx]
    return dict(zip(keys, tiles, strict=True)), chain


def _native_jpegs(slide_path: Path, keys: list[str], model: LoadedModel) -> dict[str, bytes]:
    """key -> the JPEG of ``read_region_at`` at 2.5x (16 px) of that region, as sharding encodes."""
    from resdistill.read_chain import chain_of
    from sharding.extract import encode
    from sharding.slide import open_slide, read_region_at, slide_info

    opts = chain_of(model).opts
    slide = open_slide(slide_path)
    try:
        info = slide_info(slide, str(slide_path))
        size0 = 64 * 4  # 64 px at 10x of a 40x slide
        out = {}
        for key in keys:
            _, x, y = key.split("_")
            out[key] = encode(read_region_at(slide, info, int(x), int(y), size0, PX), opts)
    finally:
        slide.close()
    return out


def _decode(data: bytes) -> np.ndarray:
    from resdistill.data import decode_image

    return decode_image(data).permute(1, 2, 0).numpy()


def test_dataset_and_checkpoint_record_how_low_mags_were_cut(data: dict[str, Path]) -> None:
    for name in ("top", "native"):
        assert json.loads((data[name] / "dataset.json").read_text())["low_mags_from"] == name
        assert load_model(data[f"ckpt_{name}"]).card.read_chain["low_mags_from"] == name


def test_native_read_is_the_pyramid_read_at_the_model_magnification(
    data: dict[str, Path],
) -> None:
    model = load_model(data["ckpt_top"])
    native, chain = _read(data["slide"], model, "native")
    trained, _ = _read(data["slide"], model, "as-trained")
    assert sorted(native) == sorted(trained)  # the same region grid
    want = _native_jpegs(data["slide"], list(native), model)
    for key, tile in native.items():
        np.testing.assert_array_equal(tile, _decode(want[key]))
    differ = [k for k in native if not np.array_equal(native[k], trained[k])]
    assert len(differ) > len(native) // 2, "the quick 2.5x level should give other pixels"
    doc = chain.to_json()
    assert (doc["read"], doc["pixels_from"], doc["low_mags_from"]) == ("native", "native", "top")


@pytest.mark.parametrize("name", ["top", "native"])
def test_as_trained_gives_the_shard_tiles(data: dict[str, Path], name: str) -> None:
    tiles, chain = _read(data["slide"], load_model(data[f"ckpt_{name}"]), "as-trained")
    stored = shard_tiles(data[name], f"{MAG}.jpg")
    assert sorted(tiles) == sorted(stored)
    for key, tile in tiles.items():
        np.testing.assert_array_equal(tile, _decode(stored[key]))
    assert (chain.to_json()["read"], chain.to_json()["pixels_from"]) == ("as-trained", name)


def test_native_dataset_cuts_low_mags_from_the_pyramid(data: dict[str, Path]) -> None:
    model = load_model(data["ckpt_native"])
    native = shard_tiles(data["native"], f"{MAG}.jpg")
    assert native == _native_jpegs(data["slide"], list(native), model)
    top = shard_tiles(data["top"], f"{MAG}.jpg")
    assert sorted(top) == sorted(native) and any(top[k] != native[k] for k in top)
    # the top magnification is read the same way in both
    assert shard_tiles(data["native"], "10x.jpg") == shard_tiles(data["top"], "10x.jpg")
    # served native, the native-trained student sees its training pixels
    served, _ = _read(data["slide"], model, "native")
    for key, tile in served.items():
        np.testing.assert_array_equal(tile, _decode(native[key]))


def test_read_chain_without_the_key_is_top(data: dict[str, Path]) -> None:
    """A checkpoint of a dataset sharded before the option existed reads as ``top``."""
    model = load_model(data["ckpt_top"])
    old = {k: v for k, v in model.card.read_chain.items() if k != "low_mags_from"}
    model = replace(model, card=replace(model.card, read_chain=old))
    tiles, chain = _read(data["slide"], model, "as-trained")
    assert chain.opts.low_mags_from == "top"
    stored = shard_tiles(data["top"], f"{MAG}.jpg")
    for key, tile in tiles.items():
        np.testing.assert_array_equal(tile, _decode(stored[key]))


def test_resume_with_another_low_mags_from_is_refused(data: dict[str, Path]) -> None:
    from sharding.pipeline import ShardError, run_shard

    labels = data["slide"].parent / "labels.csv"
    kw = dict(labels=labels, workers=0, progress=False, **SHARD)
    for out, other in ((data["top"], "native"), (data["native"], "top")):
        with pytest.raises(ShardError, match=r"other settings \(low_mags_from\)"):
            run_shard([data["slide"]], str(out), low_mags_from=other, **kw)
    assert run_shard([data["slide"]], str(data["top"]), **kw).done_before == 1
    again = run_shard([data["slide"]], str(data["native"]), low_mags_from="native", **kw)
    assert again.done_before == 1


def test_bad_low_mags_from_is_a_usage_error(tmp_path: Path) -> None:
    from sharding.pipeline import run_shard

    with pytest.raises(ConfigError, match="--low-mags-from must be one of top, native"):
        run_shard([tmp_path], str(tmp_path / "o"), low_mags_from="level", workers=0)


def test_help_documents_low_mags_from() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "resdistill", "shard", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    text = " ".join(out.split())
    assert "--low-mags-from {top,native}" in text
    assert "'native' reads each from the slide's best pyramid level" in text
    assert "predict --read native" in text
