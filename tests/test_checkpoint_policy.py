"""One reader, one policy: a checkpoint without normalisation statistics is scored on the same
inputs by evaluate, predict and export, and fed the same inputs as a distillation teacher.

The checkpoint is a random-initialised ``resnet-small`` written through
:func:`resdistill.checkpoint.write_checkpoint` with ``normalization=None``; the dataset (the
session's ``tiny_dataset``) records statistics that differ from the fallback, so a consumer that
fell back to the dataset's statistics, or refused, would fail here. Each path is taken at its
lowest level that turns tiles into probabilities: :func:`resdistill.eval.evaluate.predict_split`,
:class:`resdistill.predict.stages.Scorer` and :func:`resdistill.export.model.wrap`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from resdistill import checkpoint as C
from resdistill import data as D
from resdistill.models import build_model

MAG, SPLIT = "5x", "val"


def _write(folder: Path, info: D.DatasetInfo, normalization: Any = None) -> Path:
    """A random ``resnet-small`` checkpoint at :data:`MAG` written by the project's writer."""
    torch.manual_seed(0)
    net = build_model("resnet-small", info.num_classes)
    card = C.ModelCard(
        stage="student", arch="resnet-small", classes=info.classes, mag=MAG,
        tile_px=int(info.tile_px[MAG]), normalization=normalization, dataset=info.url,
        read_chain=C.read_chain(info.raw),
    )  # fmt: skip
    folder.mkdir(parents=True)
    C.write_checkpoint(folder, card=card, state_dict=net.state_dict(), trainer={}, epoch=1,
                       metrics={})  # fmt: skip
    return folder


def _tiles(info: D.DatasetInfo) -> tuple[list[str], np.ndarray]:
    """Keys and uint8 NHWC tiles of the labelled :data:`SPLIT` samples at :data:`MAG`, as decoded."""
    ident = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    raw = replace(info, normalization={m: ident for m in info.magnifications})
    loader = D.make_loader(raw, [SPLIT], [MAG], batch_size=256, train=False, num_workers=0,
                           labelled_only=True)  # fmt: skip
    batch = next(iter(loader.epoch()))
    tiles = (batch.images[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(batch.keys), tiles


def test_a_checkpoint_without_statistics_scores_alike_everywhere(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resdistill.eval.evaluate import predict_split
    from resdistill.export.model import metadata, wrap
    from resdistill.predict.stages import Scorer

    info = D.DatasetInfo.load(str(tiny_dataset))
    assert info.mean_std(MAG) != (C.FALLBACK_MEAN, C.FALLBACK_STD)  # so the dataset's would show
    folder = _write(tmp_path / "run" / "checkpoint_epoch0001", info)
    model = C.load_model(folder)
    assert model.card.normalization is None
    keys, tiles = _tiles(info)
    n = len(keys)

    mean = torch.tensor(C.FALLBACK_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.FALLBACK_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        want = torch.softmax(model.model((x - mean) / std)[0], 1).numpy()
    assert np.ptp(want, axis=0).max() > 1e-3  # the probabilities depend on the pixels

    preds = predict_split(model, info, SPLIT, batch_size=8, num_workers=0, device="cpu")
    assert sorted(preds.keys) == sorted(keys)
    row = {k: i for i, k in enumerate(keys)}
    np.testing.assert_allclose(preds.probs, want[[row[k] for k in preds.keys]], atol=1e-5)
    batch = {"tile": tiles, "error": np.array([""] * n), "slide": np.array(["s"] * n),
             "seconds": np.zeros(n)}  # fmt: skip
    np.testing.assert_allclose(Scorer(str(folder), "cpu")(batch)["probs"], want, atol=1e-5)
    with torch.inference_mode():
        exported = wrap(C.load_model(folder))(torch.from_numpy(tiles).permute(0, 3, 1, 2))[1]
    np.testing.assert_allclose(exported.numpy(), want, atol=1e-5)
    norm = metadata(model)["normalization"]
    assert (norm["mean"], norm["std"]) == (list(C.FALLBACK_MEAN), list(C.FALLBACK_STD))
    assert norm["recorded"] is False
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warned) == 1 and str(folder) in warned[0], warned  # once per checkpoint


def test_the_teacher_gets_the_same_inputs(tiny_dataset: Path, tmp_path: Path) -> None:
    """Distillation reads the teacher through the same reader and policy: fed the dataset's
    normalised tiles, it renormalises them onto the fallback, as evaluation would feed it."""
    from resdistill.train.preflight import teacher_ref
    from resdistill.train.teacher_net import stream_teacher

    info = D.DatasetInfo.load(str(tiny_dataset))
    folder = _write(tmp_path / "t" / "checkpoint_epoch0001", info)
    ref = teacher_ref(str(folder), info.classes)
    assert ref.checkpoint == str(folder) and ref.arch == "resnet-small" and ref.mag == MAG
    assert ref.normalization == {"mean": list(C.FALLBACK_MEAN), "std": list(C.FALLBACK_STD)}
    assert teacher_ref(str(folder / C.MODEL_FILE), info.classes).checkpoint == str(folder)

    stream = info.mean_std(MAG)
    x = torch.rand(4, 3, 16, 16)
    s_mean, s_std = (torch.tensor(v).view(1, 3, 1, 1) for v in stream)
    f_mean, f_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (C.FALLBACK_MEAN, C.FALLBACK_STD))
    net = C.load_model(folder).model
    with torch.inference_mode():
        want = net((x - f_mean) / f_std)[0]
        for norm in (ref.normalization, None):  # as planned, or read from the checkpoint
            got = stream_teacher(str(folder), norm, stream)((x - s_mean) / s_std)[0]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_recorded_statistics_win_and_datasets_share_the_fallback(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = D.DatasetInfo.load(str(tiny_dataset))
    stats = {"mean": [0.6, 0.5, 0.7], "std": [0.2, 0.0, 0.3]}
    model = C.load_model(_write(tmp_path / "c", info, stats))
    assert C.normalization_of(model) == ([0.6, 0.5, 0.7], [0.2, 1e-3, 0.3])  # std floored
    assert "warning" not in capsys.readouterr().err
    bare = replace(info, normalization={})
    assert bare.mean_std(MAG) == (C.FALLBACK_MEAN, C.FALLBACK_STD)
