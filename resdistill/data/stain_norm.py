"""Stain normalisation: map each tile's colours onto a reference estimated from training tiles.

Two methods, both on float RGB ``(..., 3, H, W)`` in [0, 1], vectorised over the leading dims,
each tile mapped with its own statistics onto the same reference (so every magnification of a
sample, and every tile at evaluation and prediction, gets the same treatment):

* ``reinhard`` (Reinhard et al. 2001, in CIELAB, D65): per channel ``k`` of the tile's LAB
  pixels, ``lab_k <- (lab_k - mean_k) / std_k * ref_std_k + ref_mean_k``, back to sRGB, clipped.
  Simple and robust; moves the overall colour, not the stains separately.
* ``macenko`` (Macenko et al. 2009): ``OD = -log(I + 1/255)`` (:func:`~resdistill.data.stain.
  rgb_to_od` with an 8-bit floor, so that the odd black JPEG pixel, OD 14 with a tiny eps, does
  not set the percentiles); keep the tissue pixels (every OD channel > ``beta`` = 0.15); the
  plane of the two largest eigenvectors ``e1, e2`` of their OD covariance; angles
  ``phi = atan2(OD.e2, OD.e1)``; stain vectors ``e(phi_1%)``, ``e(phi_99%)``, the one with more
  red OD first (haematoxylin), rows ``S`` (2x3); amounts ``C = OD @ pinv(S)``;
  ``C_k <- C_k * ref_max_k / max_k`` with ``max_k`` the 99th percentile of ``C_k`` over tissue;
  ``I = exp(-C @ S_ref) - 1/255``, clipped. A tile with under :data:`MIN_TISSUE_PIXELS` tissue
  pixels is left unchanged.

A reference is a plain dict (JSON- and ``weights_only``-safe, kept in configs and checkpoints):
``{"method": "reinhard", "mean": [L, a, b], "std": [L, a, b]}`` or ``{"method": "macenko",
"stains": [[r, g, b], [r, g, b]], "max_conc": [h, e]}``. :func:`estimate_reference` makes one
from a batch of tiles (:func:`resdistill.data.stain_reference.reference_from_dataset` from tiles
sampled over a dataset's training slides).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from resdistill.config import STAIN_NORMS

from .stain import rgb_to_od

#: Macenko: the intensity floor of its optical density (one 8-bit step).
OD_FLOOR = 1.0 / 255.0
#: Macenko: an OD channel at or below this is background (Macenko et al. use 0.15).
OD_BETA = 0.15
#: Macenko: the angle percentiles that pick the two stain vectors.
ANGLE_PERCENTILE = 0.01
#: Macenko: a tile with fewer tissue pixels than this is left as it is.
MIN_TISSUE_PIXELS = 64
#: Pixels pooled (at most) when a Macenko reference is estimated from many tiles.
REFERENCE_PIXELS = 1 << 20

_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169),
            (0.019334, 0.119193, 0.950227))  # fmt: skip
_WHITE = (0.950456, 1.0, 1.088754)  # D65
_DELTA = 6.0 / 29.0


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB ``(..., 3, H, W)`` in [0, 1] -> CIELAB (D65): L in [0, 100], a and b about +-100."""
    lin = torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB2XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, lin)
    xyz = xyz / torch.tensor(_WHITE, dtype=x.dtype, device=x.device).view(3, 1, 1)
    f = torch.where(
        xyz > _DELTA**3, xyz.clamp(min=1e-12) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29
    )
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    fy = (lab[..., 0, :, :] + 16) / 116
    f = torch.stack([fy + lab[..., 1, :, :] / 500, fy, fy - lab[..., 2, :, :] / 200], dim=-3)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29))
    xyz = xyz * torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    m_inv = torch.linalg.inv(torch.tensor(_RGB2XYZ, dtype=torch.float64)).to(lab)
    lin = torch.einsum("ij,...jhw->...ihw", m_inv, xyz).clamp(0.0, 1.0)
    rgb = torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return rgb.clamp(0.0, 1.0)


def lab_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile LAB ``(mean, std)``, each ``(..., 3)``, of RGB tiles ``(..., 3, H, W)``."""
    lab = rgb_to_lab(x).flatten(-2)
    return lab.mean(-1), lab.std(-1, correction=0)


def reinhard(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reinhard normalisation of ``x`` to the LAB ``mean`` / ``std`` (module docstring)."""
    lab = rgb_to_lab(x)
    mu, sd = (t[..., None, None] for t in lab_stats(x))
    ref_mu = mean.to(x)[..., None, None]
    ref_sd = std.to(x)[..., None, None]
    return lab_to_rgb((lab - mu) / sd.clamp(min=1e-6) * ref_sd + ref_mu)


def _quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of ``values`` (``(..., P)``), the ``q`` quantile (nearest rank) of the entries
    where ``mask`` is set; 0 for rows with none (callers discard them)."""
    count = mask.sum(-1, keepdim=True)
    ranked = values.masked_fill(~mask, float("inf")).sort(-1).values
    idx = ((count - 1).clamp(min=0).to(values.dtype) * q).round().long()
    out = ranked.gather(-1, idx).squeeze(-1)
    return torch.where(count.squeeze(-1) > 0, out, torch.zeros_like(out))


def macenko_stains(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(stains (..., 2, 3), max_conc (..., 2), ok (...))`` of tiles ``(..., 3, H, W)`` (the
    module docstring's steps); ``ok`` is False where a tile has too little tissue."""
    od = rgb_to_od(x, OD_FLOOR).flatten(-2).transpose(-1, -2)  # (..., P, 3)
    mask = (od > OD_BETA).all(-1)  # (..., P)
    w = mask.to(od.dtype)[..., None]
    count = w.sum(-2).clamp(min=1)  # (..., 1)
    centred = (od - (od * w).sum(-2, keepdim=True) / count[..., None]) * w
    cov = centred.transpose(-1, -2) @ centred / count[..., None]
    _, vecs = torch.linalg.eigh(cov.double())
    plane = vecs[..., 1:].to(od.dtype)  # (..., 3, 2): the two largest, ascending
    plane = plane * torch.where(plane.sum(-2, keepdim=True) < 0, -1.0, 1.0)  # point into OD > 0
    proj = od @ plane
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    lo = _quantile(phi, mask, ANGLE_PERCENTILE)
    hi = _quantile(phi, mask, 1.0 - ANGLE_PERCENTILE)
    ends = torch.stack([torch.stack([a.cos(), a.sin()], -1) for a in (lo, hi)], -2)  # (..., 2, 2)
    stains = ends @ plane.transpose(-1, -2)  # (..., 2, 3)
    stains = stains / stains.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    swap = stains[..., 0, 0] < stains[..., 1, 0]  # haematoxylin (more red OD) first
    stains = torch.where(swap[..., None, None], stains.flip(-2), stains)
    conc = od @ torch.linalg.pinv(stains)  # (..., P, 2)
    max_conc = torch.stack([_quantile(conc[..., k], mask, 0.99) for k in range(2)], -1)
    ok = (mask.sum(-1) >= MIN_TISSUE_PIXELS) & (max_conc > 1e-6).all(-1)
    return stains, max_conc, ok


def macenko(x: torch.Tensor, stains: torch.Tensor, max_conc: torch.Tensor) -> torch.Tensor:
    """Macenko normalisation of ``x`` to the reference ``stains`` (2x3) and ``max_conc`` (2,)."""
    own, own_max, ok = macenko_stains(x)
    od = rgb_to_od(x, OD_FLOOR).flatten(-2).transpose(-1, -2)
    conc = od @ torch.linalg.pinv(own)
    conc = conc * (max_conc.to(x) / own_max.clamp(min=1e-6))[..., None, :]
    out = (
        (torch.exp(-(conc @ stains.to(x))) - OD_FLOOR)
        .clamp(0.0, 1.0)
        .transpose(-1, -2)
        .reshape(x.shape)
    )
    return torch.where(ok[..., None, None, None], out, x)


def estimate_reference(
    tiles: torch.Tensor, method: str, generator: torch.Generator | None = None
) -> dict[str, Any]:
    """The reference of ``method`` for float RGB tiles ``(N, 3, H, W)``: Reinhard, the mean over
    tiles of their LAB means and stds (the typical tile); Macenko, the stains and 99th-percentile
    amounts of the tiles' pixels pooled (at most :data:`REFERENCE_PIXELS`, drawn by
    ``generator``). ValueError for an unknown method or tiles with too little tissue."""
    tiles = tiles.to(torch.float32)
    if method == "reinhard":
        mean, std = lab_stats(tiles)
        return {"method": method, "mean": mean.mean(0).tolist(), "std": std.mean(0).tolist()}
    if method == "macenko":
        pixels = tiles.permute(1, 0, 2, 3).reshape(3, 1, -1)
        if pixels.shape[-1] > REFERENCE_PIXELS:
            pick = torch.randperm(pixels.shape[-1], generator=generator)[:REFERENCE_PIXELS]
            pixels = pixels[..., pick]
        stains, max_conc, ok = macenko_stains(pixels)
        if not bool(ok):
            raise ValueError("too few tissue pixels to estimate Macenko stain vectors")
        return {"method": method, "stains": stains.tolist(), "max_conc": max_conc.tolist()}
    raise ValueError(f"unknown stain normalisation {method!r}; choose from {STAIN_NORMS}")


def normalizer(reference: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function applying ``reference`` to float RGB ``(..., 3, H, W)`` in [0, 1]."""
    method = reference.get("method")
    if method == "reinhard":
        mean, std = torch.tensor(reference["mean"]), torch.tensor(reference["std"])
        return lambda x: reinhard(x, mean, std)
    if method == "macenko":
        stains, max_conc = torch.tensor(reference["stains"]), torch.tensor(reference["max_conc"])
        return lambda x: macenko(x, stains, max_conc)
    raise ValueError(f"unknown stain normalisation {method!r}; choose from {STAIN_NORMS}")
