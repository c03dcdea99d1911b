"""``resdistill export``: the exported file reproduces the checkpoint on real H&E tiles.

The real Aperio sample (CC0, ``real_slide``) is sharded at 10x and 2.5x (128/32 px, JPEG quality
80, ``min_tissue`` 0.3), and a 2.5x student checkpoint records that dataset's read chain and
normalisation. Its shard tiles (the pixels the model is trained and served on) are decoded as the
loader decodes them and fed, as uint8 NCHW, to the exported TorchScript file (loaded with plain
``torch.jit.load``, as a consumer without resdistill would) and ONNX file (``onnxruntime``; skipped
when the ``onnx`` extra is absent). Their logits must equal the checkpoint model's on the same
tiles normalised as ``predict`` does, within 1e-4; the metadata must give back the classes, the
magnification as users write it, the normalisation and the read chain.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resdistill.checkpoint import MODEL_FILE, load_model, read_chain
from resdistill.commands import export as export_cmd
from resdistill.export import METADATA_KEY
from resdistill.models import build_model
from tests.test_evaluate import save_checkpoint

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

CLASSES = ("benign", "stroma", "tumor")
MAG, PX = "2p5x", 32
ATOL = 1e-4
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def _cli(argv: list[str]) -> int:
    """``resdistill export ARGV``: its exit status (2 for an option the config refuses)."""
    from resdistill.commands.generate import main

    try:
        return main(export_cmd.SPEC, export_cmd.run, argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def real(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real slide's dataset, a 2.5x student checkpoint with its read chain, and the decoded
    2.5x shard tiles ``(N, 3, 32, 32)`` uint8."""
    from resdistill.data import decode_image
    from sharding.pipeline import run_shard

    root = tmp_path_factory.mktemp("export")
    run_shard(
        [real_slide], str(root / "ds"), mags="10,2.5", tile_px=128, min_tissue=0.3, quality=80,
        workers=0, progress=False,
    )  # fmt: skip
    desc = json.loads((root / "ds" / "dataset.json").read_text())
    norm = desc["normalization"][MAG]
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES))
    ckpt = save_checkpoint(
        root / "run" / "checkpoint_epoch0003", model, stage="student", mag=MAG, tile_px=PX,
        classes=CLASSES, mean=norm["mean"], std=norm["std"], dataset=str(root / "ds"),
        read_chain=read_chain(desc),
    )  # fmt: skip
    tiles = []
    for shard in sorted((root / "ds").glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(f".{MAG}.jpg"):
                    tiles.append(decode_image(tar.extractfile(m).read()))
    assert len(tiles) >= 20, "the real slide should give a few dozen tissue tiles"
    return {"root": root, "ckpt": ckpt, "desc": desc, "tiles": torch.stack(tiles).numpy()}


def reference_logits(ckpt: Path, tiles: np.ndarray) -> np.ndarray:
    """The checkpoint's model on ``tiles`` normalised as ``predict`` does."""
    model = load_model(ckpt)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in model.card.mean_std())
    x = torch.from_numpy(tiles).float()
    with torch.inference_mode():
        logits, _ = model.model((x / 255.0 - mean) / std)
    return logits.numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def check_metadata(meta: dict[str, Any], real: dict[str, Any]) -> None:
    desc, ckpt = real["desc"], real["ckpt"]
    assert meta["classes"] == list(CLASSES)
    assert meta["magnification"] == "2.5x"
    assert meta["tile_px"] == PX
    assert meta["input"] == {
        "name": "tiles", "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
        "shape": ["N", 3, PX, PX], "range": [0, 255],
    }  # fmt: skip
    assert meta["normalization"]["mean"] == pytest.approx(desc["normalization"][MAG]["mean"])
    assert meta["normalization"]["std"] == pytest.approx(desc["normalization"][MAG]["std"])
    assert meta["normalization"]["recorded"] is True
    assert meta["read_chain"] == read_chain(desc)
    assert meta["read_chain"]["quality"] == 80 and meta["read_chain"]["min_tissue"] == 0.3
    tile_read = meta["tile_read"]
    assert tile_read["source"] == "checkpoint"
    assert tile_read["magnifications"] == ["10x", MAG]
    assert tile_read["tile_px"] == {"10x": 128, MAG: PX}
    assert (tile_read["image_format"], tile_read["quality"]) == ("jpeg", 80)
    assert meta["source_checkpoint"] == str(ckpt)
    assert meta["resdistill_version"]
    assert meta["stage"] == "student" and meta["arch"] == "resnet18"


def test_torchscript_reproduces_the_checkpoint_on_real_tiles(
    real: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "student.torchscript"
    assert _cli([str(real["ckpt"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torchscript" in printed and "benign, stroma, tumor" in printed
    assert f"(N, 3, {PX}, {PX})" in printed and "at 2.5x" in printed

    extra = {METADATA_KEY: ""}
    module = torch.jit.load(str(out), _extra_files=extra)  # what a consumer runs
    check_metadata(json.loads(extra[METADATA_KEY]), real)
    tiles = real["tiles"]
    want = reference_logits(real["ckpt"], tiles)
    assert np.ptp(want, axis=0).max() > 1e-2  # the logits depend on the pixels
    with torch.inference_mode():
        logits, probs = module(torch.from_numpy(tiles))
        one, _ = module(torch.from_numpy(tiles[:1]))
    np.testing.assert_allclose(logits.numpy(), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(probs.numpy(), _softmax(want), atol=ATOL, rtol=0)
    np.testing.assert_allclose(one.numpy(), want[:1], atol=ATOL, rtol=0)


def test_onnx_reproduces_the_checkpoint_on_real_tiles(
    real: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ONNX_MODULES:
        pytest.importorskip(name, reason=f"the onnx extra is not installed ({name})")
    import onnxruntime as ort

    out = tmp_path / "student.onnx"
    assert _cli([str(real["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnx" in capsys.readouterr().out

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check_metadata(json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY]), real)
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("tiles", "tensor(uint8)", ["N", 3, PX, PX])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    tiles = real["tiles"]
    want = reference_logits(real["ckpt"], tiles)
    logits, probs = session.run(None, {"tiles": tiles})
    (one,) = session.run(["logits"], {"tiles": tiles[:1]})
    np.testing.assert_allclose(logits, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(probs, _softmax(want), atol=ATOL, rtol=0)
    np.testing.assert_allclose(one, want[:1], atol=ATOL, rtol=0)


def test_export_to_s3_by_default_name(
    real: dict[str, Any], s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resdistill.export.files import read_metadata, run_file
    from sharding.storage import open_storage

    url = f"{s3_bucket}/models/student.torchscript"
    assert _cli([str(real["ckpt"]), "--out", url]) == 0
    data = open_storage(f"{s3_bucket}/models").read_bytes("student.torchscript")
    check_metadata(read_metadata(data, "torchscript"), real)
    logits, _ = run_file(data, "torchscript", real["tiles"][:4])
    np.testing.assert_allclose(logits, reference_logits(real["ckpt"], real["tiles"][:4]), atol=ATOL)

    monkeypatch.chdir(tmp_path)  # no --out: <stage>-<magnification as users write it>.<suffix>
    assert _cli([str(real["ckpt"] / MODEL_FILE)]) == 0
    assert (tmp_path / "student-2.5x.torchscript").is_file()


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("export: error: ")
    return err


def test_errors_are_one_line(
    real: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = str(real["ckpt"])
    assert _cli([ckpt, "--format", "tflite", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # an option error: one line
    assert err == [
        "resdistill export: error: unknown --format 'tflite': choose torchscript or onnx "
        "(see --help)"
    ]

    assert _cli([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "no such checkpoint" in _one_line_error(capsys)

    assert _cli([str(real["root"] / "run"), "--out", str(tmp_path / "m")]) == 2
    assert "is a run folder, not a checkpoint" in _one_line_error(capsys)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were absent
    assert _cli([ckpt, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = _one_line_error(capsys)
    assert "onnxruntime" in err and "pip install 'resdistill[onnx]'" in err
    assert not list(tmp_path.glob("m*"))
