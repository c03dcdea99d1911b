"""Augmentations of whole batches, one random draw per sample shared by all of its images.

The loader carries uint8 tiles; :class:`~resdistill.data.prepare.BatchPrep` augments each
collated batch in the training process (on its device), where one vectorised op over the batch
replaces a chain of per-sample ops in every loader worker:

* :class:`PairedAugment` - flips and 90-degree rotation (on uint8, before anything else), then
  HED stain jitter (:func:`~resdistill.data.stain.hed_jitter`) and colour jitter
  (:func:`colour_jitter`) on float [0, 1]: per sample one draw, applied to every magnification
  of that sample, so a student tile and its paired teacher tile see the same transform;
  :func:`paired_augment` builds it from a run's data config.
* :class:`GeometricAugment` - flips and rotation only, the same draw for a tile and a stored
  feature map (training on cached teacher targets, which belong to the un-jittered tile).

Draws come from the ``generator`` passed in (the loader seeds one per rank and starting epoch),
or torch's global RNG when it is None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from resdistill.config import DEFAULT_JITTER, DataConfig

from .stain import draw_hed, hed_jitter

#: An augmentation called on one sample's (or one batch's) images: the same number out, one draw
#: per sample.
Augment = Callable[..., tuple[torch.Tensor, ...]]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``(..., 3, H, W)``, keeping the channel dim."""
    return (0.299 * x[..., 0:1, :, :]) + (0.587 * x[..., 1:2, :, :]) + (0.114 * x[..., 2:3, :, :])


#: RGB -> YIQ and back; a hue shift is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def hue_matrix(shift: float | torch.Tensor) -> torch.Tensor:
    """RGB matrix rotating hue by ``shift`` turns: ``YIQ2RGB @ R(2 pi shift) @ RGB2YIQ``;
    ``(3, 3)`` for a number, ``(N, 3, 3)`` for a ``(N,)`` tensor of shifts."""
    theta = 2.0 * math.pi * torch.as_tensor(shift, dtype=torch.float64)
    c, s = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1),
         torch.stack([zero, s, c], -1)], -2,
    )  # fmt: skip
    return (_YIQ2RGB @ rot @ _RGB2YIQ).to(torch.float32)


def colour_jitter(
    x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """Colour jitter of float RGB ``x`` ``(N, 3, H, W)`` in [0, 1], IN PLACE, with per-sample
    factors ``(N,)``: ``x <- b x``; ``x <- c x + (1 - c) mean(gray(x))``; ``x <- s x + (1 - s)
    gray(x)``; ``x <- hue_matrix(h) x`` (rotation of the YIQ chroma plane); clamp to [0, 1].

    The effects of torchvision's ``ColorJitter`` in a fixed order, with a linear hue rotation
    instead of an HSV round trip (whose hue step alone costs milliseconds per 224 px tile). In
    place because a batch of 224 px tiles is tens of MB: every fresh tensor of that size is a
    new mapping and its page faults, which cost more than the arithmetic.
    """
    shape = (-1, 1, 1, 1)
    b, c, s = (v.to(x).view(shape) for v in (b, c, s))
    x.mul_(b)
    x.mul_(c).add_((1.0 - c) * _gray(x).mean(dim=(-3, -2, -1), keepdim=True))
    x.mul_(s).add_((1.0 - s) * _gray(x))
    if bool((h != 0).any()):
        n = x.shape[0]
        x.copy_(torch.bmm(hue_matrix(h.double()).to(x), x.reshape(n, 3, -1)).view_as(x))
    return x.clamp_(0.0, 1.0)


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> a new float32 tensor ``x / 255`` in [0, 1]; float ones as they are."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _uniform(n: int, half_width: float, generator: torch.Generator | None) -> torch.Tensor:
    """``(n,)`` draws of ``U(-half_width, half_width)``."""
    return half_width * (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)


def flip_rotate(x: torch.Tensor, hflip: bool, vflip: bool, k: int) -> torch.Tensor:
    """``rot90(vflip(hflip(x)), k)`` on dims (-2, -1): one element of the dihedral group D4."""
    if hflip:
        x = torch.flip(x, dims=(-1,))
    if vflip:
        x = torch.flip(x, dims=(-2,))
    if k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x


def flip_rotate_batch(
    x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """:func:`flip_rotate` of every sample ``x[i]`` with its own ``(hflip[i], vflip[i], k[i])``,
    IN PLACE (square images): one op per group of samples sharing an element, at most 7."""
    code = hflip.long() * 8 + vflip.long() * 4 + k.long()
    if x.shape[-1] != x.shape[-2]:  # a quarter turn changes the shape: one image only
        if x.shape[0] != 1:
            raise ValueError(f"batched flips and rotations need square images, got {x.shape}")
        c = int(code[0])
        return flip_rotate(x, bool(c & 8), bool(c & 4), c & 3)
    for c in torch.unique(code).tolist():
        if c == 0:
            continue
        idx = (code == c).nonzero().flatten().to(x.device)
        x[idx] = flip_rotate(x[idx], bool(c & 8), bool(c & 4), c & 3)
    return x


class PairedAugment:
    """Per sample one draw of: horizontal flip (p=0.5), vertical flip (p=0.5), rotation by
    ``k * 90`` degrees (``k`` uniform in {0, 1, 2, 3}), HED jitter ``(sigma, bias)`` when ``hed``
    is not zero, then colour jitter ``(brightness, contrast, saturation, hue)`` when not zero;
    the draw is shared by every tile (magnification) of the sample.

    :class:`~resdistill.data.prepare.BatchPrep` calls :meth:`geometry` (tiles and stored feature
    maps) and :meth:`colour` (tiles) separately, with stain normalisation between them;
    ``__call__`` runs both on copies of one sample's or one batch's images.
    """

    def __init__(
        self,
        jitter: Sequence[float] = DEFAULT_JITTER,
        *,
        flips: bool = True,
        hed: Sequence[float] = (0.0, 0.0),
    ) -> None:
        b, c, s, h = (tuple(float(v) for v in jitter) + (0.0, 0.0, 0.0, 0.0))[:4]
        if not 0 <= h <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {h}")
        for name, v in (("brightness", b), ("contrast", c), ("saturation", s)):
            if v < 0:
                raise ValueError(f"{name} jitter must be >= 0, got {v}")
        hed_sigma, hed_bias = (tuple(float(v) for v in hed) + (0.0, 0.0))[:2]
        self.jitter = (b, c, s, h)
        self.hed = (hed_sigma, hed_bias)
        self.flips = flips

    @property
    def changes_colour(self) -> bool:
        return any(self.jitter) or any(self.hed)

    def geometry(
        self, tiles: Sequence[torch.Tensor], maps: Sequence[torch.Tensor] = (),
        generator: torch.Generator | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
        """The flips and rotation of each sample, the same for its tiles and maps (any dtype;
        in place: the caller owns them)."""
        if not self.flips or not tiles:
            return list(tiles), list(maps)
        n = tiles[0].shape[0]
        u = torch.rand(2, n, generator=generator)
        k = torch.randint(0, 4, (n,), generator=generator)
        hflip, vflip = u[0] < 0.5, u[1] < 0.5
        flip = [flip_rotate_batch(t, hflip, vflip, k) for t in tiles]
        return flip, [flip_rotate_batch(m, hflip, vflip, k) for m in maps]

    def colour(
        self, tiles: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """HED then colour jitter of float ``(N, 3, H, W)`` tiles in [0, 1] (in place: the caller
        owns them), one draw per sample."""
        tiles = list(tiles)
        if not tiles or not self.changes_colour:
            return tiles
        n = tiles[0].shape[0]
        if any(self.hed):
            alpha, beta = draw_hed(*self.hed, n=n, generator=generator)
            tiles = [hed_jitter(t, alpha, beta) for t in tiles]
        b, c, s, h = self.jitter
        if any((b, c, s, h)):
            draws = [1.0 + _uniform(n, v, generator) for v in (b, c, s)]
            hue = _uniform(n, h, generator)
            tiles = [colour_jitter(t, *draws, hue) for t in tiles]
        return tiles

    def __call__(
        self, *images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The whole transform on copies of ``images``: one sample ``(C, H, W)`` each, or batches
        ``(N, C, H, W)``; uint8 images come back as float32 in [0, 1], float ones (in [0, 1],
        or feature maps when colour is off) keep their scale."""
        single = bool(images) and images[0].dim() == 3
        batch = [(i[None] if single else i).clone() for i in images]
        batch, _ = self.geometry(batch, (), generator)
        out = self.colour([unit_float(t) for t in batch], generator)
        return tuple(t[0] for t in out) if single else tuple(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(jitter={self.jitter}, hed={self.hed}, flips={self.flips})"


def paired_augment(data: DataConfig) -> PairedAugment:
    """The :class:`PairedAugment` of a run's data section (flips, HED and colour jitter). A
    section outside a :class:`~resdistill.config.TrainConfig` has no stage preset: its unset
    jitter (None) is none."""
    return PairedAugment(data.jitter or (), flips=data.flips, hed=data.hed_jitter)


class GeometricAugment(PairedAugment):
    """Flips and rotation only (no colour change: stored teacher outputs belong to the
    un-jittered tile), one draw for a sample's tile and its stored feature map.

    Exactness: ``adaptive_max_pool2d`` to a square size commutes with every D4 element, so
    ``g(pool(f_t)) == pool(g(f_t))`` bit for bit; the stored map, transformed, is the teacher's
    un-augmented map pooled after the same flip/rotation the student tile got.
    """

    def __init__(self, flips: bool = True) -> None:
        super().__init__((0.0, 0.0, 0.0, 0.0), flips=flips)

    apply = staticmethod(flip_rotate)

    def __repr__(self) -> str:
        return f"GeometricAugment(flips={self.flips})"
