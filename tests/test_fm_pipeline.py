"""The foundation-model path end to end, as a user types it: shard, ``teacher --arch timm:...
--weights FILE --freeze-backbone``, ``distill``, ``predict``; then the student's ``export`` file
gives the probabilities ``predict`` wrote, on the tiles predict read.

A randomly initialised two-block ViT (timm ``vit_tiny_patch16_224`` arguments shrunk, 32 px
input, a 2x2 patch grid) stands in for the foundation model; its weights are saved the way UNI's
are distributed (a ``.bin`` state dict), with a ``model.`` prefix and a pretraining head left
in. Nothing downloads: the test's network access is not needed and the weights file is local.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resdistill.commands import distill, predict, shard, teacher
from resdistill.commands import export as export_cmd
from tests.test_evaluate import _cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]  # fmt: skip

ARCH = "timm:vit_tiny_patch16_224"
ARGS = '{"depth": 2, "embed_dim": 32, "num_heads": 2}'


def fm_weights(path: Path) -> Path:
    """A UNI-like ``.bin``: keys prefixed ``model.``, a 1000-class head left in."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(ARCH[5:], num_classes=1000, img_size=32, **json.loads(ARGS))
    torch.save({f"model.{k}": v for k, v in vit.state_dict().items()}, path)
    return path


def _run(module: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = _cli(module, argv)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out + out.err


def _best(storage: Path, name: str) -> str:
    return json.loads((storage / f"{name}.json").read_text())["best_checkpoint"]


def test_shard_teacher_distill_predict_from_a_foundation_model(
    tmp_path: Path, ray_cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sharding.synthetic import LABELS_CSV, write_synthetic_slides

    slides = tmp_path / "slides"
    write_synthetic_slides(slides, 6, seed=3, size_um=(700.0, 560.0), base_mags=(20,),
                           labeled_fraction=1.0, slides_per_patient=1, formats=("svs",))  # fmt: skip
    weights = fm_weights(tmp_path / "pytorch_model.bin")
    data, runs = tmp_path / "ds", tmp_path / "runs"
    common = ["--storage", str(runs), "--workers", "1", "--batch-size", "16", "--epochs", "1",
              "--loader-workers", "0", "--address", ray_cluster, "--data", str(data)]  # fmt: skip

    # 1. shard
    _run(shard, [str(slides), "--out", str(data), "--labels", str(slides / LABELS_CSV),
                 "--mags", "10,2.5", "--tile-px", "64", "--splits", "0.5,0.5,0",
                 "--workers", "0"], capsys)  # fmt: skip
    # 2. the teacher: a head on the frozen foundation model, from cached embeddings
    fm = ["--arch", ARCH, "--weights", str(weights), "--freeze-backbone", "--backbone-args",
          ARGS, "--input-px", "32", "--weights-licence", "test weights, no licence"]  # fmt: skip
    printed = _run(teacher, [*common, *fm, "--name", "fm", "--summary-json",
                             str(runs / "fm.json"), "--lr", "0.01"], capsys)  # fmt: skip
    assert "embeddings: reusing" not in printed and "embeddings:" in printed
    t_ckpt = _best(runs, "fm")
    card = torch.load(Path(t_ckpt) / "model.pt", weights_only=True)
    assert card["backbone"]["weights"] == str(weights.resolve())
    from resdistill.backbones.spec import file_sha256

    assert card["backbone"]["sha256"] == file_sha256(weights)
    assert card["backbone"]["licence"] == "test weights, no licence"
    assert card["read_chain"]["model_input"]["px"] == 32
    assert set(card["state_dict"]) == {"in_scale", "in_shift", "classifier.weight",
                                       "classifier.bias"}  # fmt: skip
    run_files = [p for p in (runs / "fm").rglob("*") if p.is_file()]
    assert all(p.stat().st_size < weights.stat().st_size / 4 for p in run_files)

    # 3. distil a 2.5x ResNet student from it (online: the ViT runs on the 10x tiles)
    printed = _run(distill, [*common, "--teacher", t_ckpt, "--student-mag", "2.5x", "--arch",
                             "resnet-small", "--name", "student", "--summary-json",
                             str(runs / "student.json")], capsys)  # fmt: skip
    s_ckpt = _best(runs, "student")

    # 4. predict with the student; its exported file gives the same probabilities
    out = tmp_path / "pred"
    slide = sorted(slides.glob("*.svs"))[0]
    _run(predict, [s_ckpt, str(slide), "--out", str(out)], capsys)
    model_file = tmp_path / "student.torchscript"
    _run(export_cmd, [s_ckpt, "--out", str(model_file)], capsys)
    _check_export_matches_predict(s_ckpt, slide, out, model_file)


def _check_export_matches_predict(ckpt: str, slide: Path, out: Path, model_file: Path) -> None:
    import pyarrow.parquet as pq

    from resdistill.checkpoint import load_model
    from resdistill.export.files import run_file
    from resdistill.read_chain import chain_of, plan_tiles, read_tiles
    from sharding.slide import open_slide

    model = load_model(ckpt)
    chain = chain_of(model)
    handle = open_slide(str(slide))
    try:
        plan = plan_tiles(handle, str(slide), chain)
        cells = np.flatnonzero(plan.keep)
        tiles = read_tiles(handle, plan, chain, cells)
    finally:
        handle.close()
    _, probs = run_file(model_file.read_bytes(), "torchscript", tiles.transpose(0, 3, 1, 2))
    table = pq.read_table(out / "tiles.parquet").to_pandas()
    table = table[table["slide"] == slide.stem]
    by_xy = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(plan.xs[cells], plan.ys[cells],
                                                                strict=True))}  # fmt: skip
    assert len(table) == len(cells) > 0
    cols = [f"p_{c}" for c in model.classes]
    for _, row in table.iterrows():
        i = by_xy[(int(row["x"]), int(row["y"]))]
        np.testing.assert_allclose(row[cols].to_numpy(dtype=float), probs[i], atol=1e-5)
