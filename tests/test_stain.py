"""Stain augmentation (HED jitter) and stain normalisation (Reinhard, Macenko)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from resdistill.commands import distill
from resdistill.commands.generate import parse
from resdistill.config import DataConfig, TrainConfig, hed_pair
from resdistill.data.augment import PairedAugment, paired_augment
from resdistill.data.stain import draw_hed, hed_jitter, stain_matrix
from resdistill.errors import UsageError

RJ = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def _numpy_hed(img: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The formula written out in numpy, float64, on ``(H, W, 3)`` pixels in [0, 1]."""
    m = RJ / np.linalg.norm(RJ, axis=1, keepdims=True)
    od = -np.log((img + 1e-6) / 1.0)
    conc = od.reshape(-1, 3) @ np.linalg.inv(m)
    conc = conc * alpha + beta
    out = 1.0 * np.exp(-(conc @ m))
    return np.clip(out, 0.0, 1.0).reshape(img.shape)


def _he_image(h: int = 24, w: int = 20, seed: int = 0) -> np.ndarray:
    """H&E-like pixels: random haematoxylin and eosin amounts through Beer-Lambert."""
    rng = np.random.default_rng(seed)
    m = RJ / np.linalg.norm(RJ, axis=1, keepdims=True)
    conc = np.stack([rng.uniform(0, 1.2, (h, w)), rng.uniform(0, 0.8, (h, w)),
                     rng.uniform(0, 0.05, (h, w))], -1)  # fmt: skip
    return np.exp(-(conc @ m))


def test_hed_jitter_equals_its_formula() -> None:
    img = _he_image()
    img[0, 0] = 0.0  # black and white pixels keep finite OD
    img[0, 1] = 1.0
    alpha = np.array([1.18, 0.87, 1.04])
    beta = np.array([0.05, -0.11, 0.02])
    want = _numpy_hed(img, alpha, beta)
    x = torch.from_numpy(img).permute(2, 0, 1).float()
    got = hed_jitter(x, torch.tensor(alpha), torch.tensor(beta)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    # a batch with one draw per image
    batch = torch.stack([x, x.flip(-1)])
    alphas = torch.tensor(np.stack([alpha, np.ones(3)]))
    betas = torch.tensor(np.stack([beta, np.zeros(3)]))
    out = hed_jitter(batch, alphas, betas)
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), want, atol=2e-5)
    np.testing.assert_allclose(out[1].numpy(), batch[1].numpy(), atol=2e-5)


def test_hed_jitter_scales_the_haematoxylin_of_a_pure_haematoxylin_pixel() -> None:
    """Known answer independent of the code's layout: I = exp(-c h) with h the unit H vector;
    doubling the H amount gives exp(-2 c h), and the eosin/DAB factors leave it alone."""
    h = RJ[0] / np.linalg.norm(RJ[0])
    x = torch.tensor(np.exp(-0.4 * h), dtype=torch.float32).view(3, 1, 1)
    out = hed_jitter(x, torch.tensor([2.0, 0.5, 3.0]), torch.zeros(3)).view(3).numpy()
    np.testing.assert_allclose(out, np.exp(-0.8 * h), atol=1e-5)
    assert torch.allclose(stain_matrix().norm(dim=1), torch.ones(3))


def test_zero_sigma_and_bias_is_the_identity() -> None:
    x = torch.from_numpy(_he_image()).permute(2, 0, 1).float()
    alpha, beta = draw_hed(0.0, 0.0)
    assert torch.equal(alpha, torch.ones(3)) and torch.equal(beta, torch.zeros(3))
    assert torch.allclose(hed_jitter(x, alpha, beta), x, atol=1e-5)
    img = (x * 255).round().to(torch.uint8)
    torch.manual_seed(3)
    plain = PairedAugment((0, 0, 0, 0))(img)
    torch.manual_seed(3)
    zero = PairedAugment((0, 0, 0, 0), hed=(0.0, 0.0))(img)
    assert torch.equal(plain[0], zero[0])


def test_draws_are_seeded_and_in_range() -> None:
    a1, b1 = draw_hed(0.2, 0.05, n=500, generator=torch.Generator().manual_seed(5))
    a2, b2 = draw_hed(0.2, 0.05, n=500, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == (500, 3) and a1.min() >= 0.8 and a1.max() <= 1.2
    assert b1.min() >= -0.05 and b1.max() <= 0.05 and b1.std() > 0.01
    torch.manual_seed(9)
    first = PairedAugment((0, 0, 0, 0), hed=(0.2, 0.2))(
        torch.full((3, 4, 4), 120, dtype=torch.uint8)
    )
    torch.manual_seed(9)
    again = PairedAugment((0, 0, 0, 0), hed=(0.2, 0.2))(
        torch.full((3, 4, 4), 120, dtype=torch.uint8)
    )
    assert torch.equal(first[0], again[0])


@pytest.mark.parametrize("seed", range(6))
def test_one_draw_for_every_magnification(seed: int) -> None:
    """The teacher tile is the student tile with every pixel a 4x4 block, so flips, rotations
    and a shared per-pixel stain map commute with that upsampling: jittering both together must
    give the upsampled jittered student tile exactly. Two independent draws would not."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy((_he_image(8, 8, seed) * 255).round().astype(np.uint8)).permute(2, 0, 1)
    low = low.contiguous()
    high = low.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    aug = PairedAugment((0, 0, 0, 0), hed=(0.3, 0.1))
    torch.manual_seed(int(rng.integers(1 << 30)))
    out_high, out_low = aug(high, low)
    up = out_low.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert torch.equal(out_high, up)
    # the stain really changed (not a no-op passing the test trivially)
    plain = low.float() / 255
    assert min((out_low - plain.rot90(k, (1, 2)).flip(f)).abs().max().item()
               for k in range(4) for f in ((), (1,), (2,), (1, 2))) > 1e-3  # fmt: skip
    # and a second, independent call on the student tile alone draws different factors
    again = aug(low)[0]
    assert not torch.equal(again, out_low)


def test_cli_option_and_config_record() -> None:
    def cfg(*extra: str) -> TrainConfig:
        args = parse(
            distill.SPEC,
            ["--data", "/nowhere", "--teacher", "/nowhere/t", "--student-mag", "2.5x", *extra],
        )
        return args

    assert cfg().data.hed_jitter == (0.0, 0.0)
    assert cfg("--hed-jitter", "0.05").data.hed_jitter == (0.05, 0.05)
    assert cfg("--hed-jitter", "0.2,0.02").data.hed_jitter == (0.2, 0.02)
    with pytest.raises(SystemExit):  # the command line: one line naming the flag, exit 2
        cfg("--hed-jitter", "1.5")
    with pytest.raises(UsageError, match="--hed-jitter sigma must be in"):
        DataConfig(url="/x", hed_jitter=(1.5, 1.5))  # a config built in Python is checked too
    with pytest.raises(ValueError, match="SIGMA"):
        hed_pair((0.1, 0.1, 0.1))
    c = cfg("--hed-jitter", "0.1,0.03")
    assert TrainConfig.from_dict(c.to_dict()).data.hed_jitter == (
        0.1,
        0.03,
    )  # as checkpoints keep it
    assert paired_augment(c.data).hed == (0.1, 0.03)
    assert paired_augment(DataConfig(url="/x")).hed == (0.0, 0.0)


def test_hed_jitter_with_cached_targets_is_refused_in_one_line(capsys) -> None:
    argv = ["--data", "/nowhere", "--teacher", "/nowhere/t", "--student-mag", "2.5x", "--targets", "/nowhere/targets",
            "--hed-jitter", "0.05", "--jitter", "0"]  # fmt: skip
    assert distill.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--hed-jitter is not allowed with --targets" in err and "without --targets" in err


# ------------------------------------------------------------------------ stain normalisation


@pytest.fixture(scope="module")
def he_tiles(real_slide) -> torch.Tensor:
    """Float 224 px tiles of the real H&E slide CMU-1-Small-Region, in [0, 1]."""
    import openslide

    with openslide.OpenSlide(str(real_slide)) as slide:
        img = np.array(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    x = torch.from_numpy(img[:2016, :2912]).permute(2, 0, 1).float() / 255
    return x.unfold(1, 224, 224).unfold(2, 224, 224).permute(1, 2, 0, 3, 4).reshape(-1, 3, 224, 224)


def _tissue(tiles: torch.Tensor) -> torch.Tensor:
    """Tiles that are mostly tissue (Macenko's mask covers a third of the pixels or more)."""
    from resdistill.data.stain import rgb_to_od

    frac = (rgb_to_od(tiles, 1 / 255) > 0.15).all(1).float().mean((1, 2))
    return tiles[frac > 0.33]


def _restain(x: torch.Tensor, h: float, e: float) -> torch.Tensor:
    """``x`` as another lab might stain it: haematoxylin x ``h``, eosin x ``e``."""
    return hed_jitter(x, torch.tensor([h, e, 1.0]), torch.zeros(3))


def test_lab_round_trip_and_reinhard_matches_the_reference(he_tiles: torch.Tensor) -> None:
    from resdistill.data.stain_norm import (
        estimate_reference,
        lab_stats,
        lab_to_rgb,
        normalizer,
        rgb_to_lab,
    )

    tiles = _tissue(he_tiles)
    assert len(tiles) >= 8
    assert torch.allclose(lab_to_rgb(rgb_to_lab(tiles[:4])), tiles[:4], atol=1e-4)
    white = rgb_to_lab(torch.ones(3, 1, 1)).view(3)
    assert torch.allclose(white, torch.tensor([100.0, 0.0, 0.0]), atol=0.05)  # D65 white
    ref = estimate_reference(tiles, "reinhard")
    assert ref["method"] == "reinhard" and 50 < ref["mean"][0] < 95
    shifted = _restain(tiles[:6], 1.4, 0.7)
    before = lab_stats(shifted)[0]
    assert (before - torch.tensor(ref["mean"])).abs().max() > 5  # the restain moved the colours
    mean, std = lab_stats(normalizer(ref)(shifted))
    np.testing.assert_allclose(mean.numpy(), np.tile(ref["mean"], (6, 1)), atol=1.0)
    np.testing.assert_allclose(std.numpy(), np.tile(ref["std"], (6, 1)), atol=1.0)


def test_macenko_maps_stains_and_amounts_to_the_reference(he_tiles: torch.Tensor) -> None:
    from resdistill.data.stain_norm import estimate_reference, macenko_stains, normalizer

    tiles = _tissue(he_tiles)
    ref = estimate_reference(tiles, "macenko", torch.Generator().manual_seed(0))
    stains = torch.tensor(ref["stains"])
    assert stains[0, 0] > stains[1, 0]  # haematoxylin (more red OD) first
    assert torch.allclose(stains.norm(dim=1), torch.ones(2), atol=1e-5)
    norm = normalizer(ref)
    a, b = _restain(tiles[:6], 1.4, 0.7), _restain(tiles[:6], 0.7, 1.3)
    got_stains, got_max, ok = macenko_stains(norm(a))
    assert bool(ok.all())
    assert (got_stains - stains).abs().max() < 0.1
    np.testing.assert_allclose(got_max.numpy(), np.tile(ref["max_conc"], (6, 1)), rtol=0.15)
    # two stainings of the same tissue come out far closer than they went in
    assert (norm(a) - norm(b)).abs().mean() < 0.6 * (a - b).abs().mean()
    # a blank tile has no stains to estimate: left as it is
    blank = torch.full((3, 32, 32), 0.95)
    assert torch.equal(norm(blank), blank)
    with pytest.raises(ValueError, match="unknown stain"):
        normalizer({"method": "vahadane"})


def _raw(info: Any) -> Any:
    """``info`` whose per-magnification normalisation is the identity (pixels / 255)."""
    ident = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    return replace(info, normalization={m: ident for m in info.magnifications})


def test_stain_normalisation_is_planned_recorded_and_applied(tiny_dataset, tmp_path) -> None:
    """The teacher stage estimates a reference from the training tiles; the loaders apply it to
    every magnification, in evaluation too; the model card keeps it; evaluation and prediction
    apply it; a student inherits it, and the combinations that cannot hold are refused."""
    from resdistill import data as D
    from resdistill.checkpoint import load_model
    from resdistill.commands import teacher as teacher_cmd
    from resdistill.data.stain_norm import normalizer
    from resdistill.data.stain_reference import reference_from_dataset
    from resdistill.eval.evaluate import predict_split
    from resdistill.models import build_model
    from resdistill.predict.stages import Scorer
    from resdistill.train.preflight import prepare
    from resdistill.train.worker import model_card
    from tests.test_distill import save_checkpoint, teacher_payload

    args = parse(
        teacher_cmd.SPEC,
        [
            "--data",
            str(tiny_dataset),
            "--stain-norm",
            "reinhard",
            "--workers",
            "1",
            "--batch-size",
            "8",
        ],
    )
    notes: list[str] = []
    cfg = prepare((args), notes=notes)
    ref = cfg.data.stain_reference
    assert cfg.data.stain_norm == "reinhard" and ref["method"] == "reinhard"
    assert any("stain normalisation (reinhard)" in n for n in notes)
    dataset = D.Dataset.open(str(tiny_dataset))
    info = dataset.info
    assert reference_from_dataset(dataset, ["train"], "10x", "reinhard") == ref  # one fixed draw
    assert TrainConfig.from_dict(cfg.to_dict()).data.stain_reference == ref

    norm = normalizer(ref)
    kw = {"batch_size": 64, "train": False, "num_workers": 0, "labelled_only": True}
    plain = next(iter(D.make_loader(_raw(info), ["val"], ["10x", "5x"], **kw).epoch()))
    normed = next(iter(D.make_loader(_raw(info), ["val"], ["10x", "5x"], stain=ref, **kw).epoch()))
    assert normed.keys == plain.keys
    for m in range(2):
        assert torch.allclose(normed.images[m], norm(plain.images[m]), atol=1e-6)
        assert not torch.allclose(normed.images[m], plain.images[m], atol=1e-2)

    class _Stage:
        network = build_model("resnet18", info.num_classes)  # a ResNet: no model_input record

        def card_fields(self) -> dict[str, Any]:
            return {"teacher": None, "loss": None}

    card = model_card(cfg, info, _Stage())
    assert card.stain_reference() == ref
    torch.manual_seed(0)
    net = build_model("resnet18", info.num_classes).eval()
    folder = save_checkpoint(
        tmp_path / "stained" / "checkpoint_epoch0001",
        {**card.to_dict(), "state_dict": net.state_dict()},
    )
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in info.mean_std("10x"))
    with torch.inference_mode():
        want = torch.softmax(net((norm(plain.images[0]) - mean) / std)[0], 1).numpy()
        unnormed = torch.softmax(net((plain.images[0] - mean) / std)[0], 1).numpy()
    assert not np.allclose(want, unnormed, atol=1e-3)
    preds = predict_split(load_model(folder), info, "val", batch_size=8, num_workers=0,
                          device="cpu")  # fmt: skip
    row = {k: i for i, k in enumerate(plain.keys)}
    order = [row[k] for k in preds.keys]
    np.testing.assert_allclose(preds.probs, want[order], atol=1e-5)
    n = len(plain.keys)
    tiles = (plain.images[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    batch = {"tile": tiles, "error": np.array([""] * n), "slide": np.array(["s"] * n),
             "seconds": np.zeros(n)}  # fmt: skip
    np.testing.assert_allclose(Scorer(folder, "cpu")(batch)["probs"], want, atol=1e-5)
    from resdistill.checkpoint import CheckpointError
    from resdistill.export.model import export_normalization

    with pytest.raises(CheckpointError, match="stain-normalised tiles"):
        export_normalization(load_model(folder))  # export cannot carry the step: refused

    bare = save_checkpoint(tmp_path / "bare" / "checkpoint_epoch0001",
                           teacher_payload(net, info, "10x"))  # fmt: skip

    def student(teacher: str, *extra: str) -> TrainConfig:
        argv = ["--data", str(tiny_dataset), "--teacher", teacher, "--student-mag", "5x",
                "--workers", "1", "--batch-size", "8", *extra]  # fmt: skip
        return parse(distill.SPEC, argv)

    notes = []
    inherited = prepare(student(folder), notes=notes)
    assert inherited.data.stain_norm == "reinhard" and inherited.data.stain_reference == ref
    assert any("as the teacher was trained with" in n for n in notes)
    with pytest.raises(UsageError, match="trained without stain normalisation"):
        prepare(student(bare, "--stain-norm", "reinhard"))
    with pytest.raises(UsageError, match="trained with --stain-norm reinhard"):
        prepare(student(folder, "--stain-norm", "macenko"))
    with pytest.raises(UsageError, match="--targets with a stain-normalised teacher"):
        prepare(student(folder, "--targets", str(tmp_path / "targets"), "--jitter", "0"))
    assert prepare(student(bare)).data.stain_reference is None
