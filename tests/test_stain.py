"""Stain augmentation (HED jitter) and stain normalisation (Reinhard, Macenko)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resdistill.commands import distill
from resdistill.config import DataConfig, TrainConfig, hed_pair
from resdistill.data.augment import PairedAugment, paired_augment
from resdistill.data.stain import HedJitter, draw_hed, hed_jitter, stain_matrix

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
    # the transform applies the same with its drawn parameters
    t = HedJitter(0.2, 0.2).transform(x, {"alpha": torch.tensor(alpha), "beta": torch.tensor(beta)})
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), want, atol=2e-5)
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
        args = distill.build_parser().parse_args(
            ["--data", "/nowhere", "--teacher", "/nowhere/t", "--student-mag", "2.5x", *extra]
        )
        return distill.build_config(args)

    assert cfg().data.hed_jitter == (0.0, 0.0)
    assert cfg("--hed-jitter", "0.05").data.hed_jitter == (0.05, 0.05)
    assert cfg("--hed-jitter", "0.2,0.02").data.hed_jitter == (0.2, 0.02)
    with pytest.raises(distill.UsageError, match="sigma must be in"):
        cfg("--hed-jitter", "1.5")
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
