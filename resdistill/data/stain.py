"""Stain colour augmentation: HED jitter by colour deconvolution (Ruifrok & Johnston 2001).

Brightfield slides obey Beer-Lambert: a pixel's optical density is a sum of stain amounts times
the stains' OD colour vectors. Perturbing the amounts, not the RGB values, mimics how slides
from other labs and scanners differ (more or less haematoxylin, a bluer or pinker eosin), which
is the augmentation Tellez et al. (Med. Image Anal. 2019, "Quantifying the effects of data
augmentation and stain color normalization") found to generalise best across centres.

With ``I`` an RGB pixel in [0, 1] (``I0 = 1``, the blank glass) and ``M`` the 3x3 matrix whose
rows are the unit OD vectors of haematoxylin, eosin and DAB (:data:`HED_FROM_RGB_INV`)::

    OD = -log((I + eps) / I0)                         per channel, eps = OD_EPS
    C  = OD @ inv(M)                                  stain amounts (H, E, D)
    C_k <- C_k * alpha_k + beta_k                     alpha_k ~ U(1-sigma, 1+sigma),
                                                      beta_k  ~ U(-bias, bias), per stain
    I  = clip(I0 * exp(-C @ M), 0, 1)

One draw of ``(alpha, beta)`` per sample is shared by every magnification of the sample (the
paired contract of :class:`~resdistill.data.augment.PairedAugment`, which draws with
:func:`draw_hed`): the map is applied pixel by pixel, so a student tile and its teacher tile see
the same stain change.
"""

from __future__ import annotations

import torch

#: Ruifrok & Johnston's stain OD vectors (rows: haematoxylin, eosin, DAB), before normalisation.
RUIFROK_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
#: Added to intensities before the logarithm so that black pixels keep a finite OD.
OD_EPS = 1e-6


def stain_matrix(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``M``: :data:`RUIFROK_HED` with each row scaled to unit length."""
    m = torch.tensor(RUIFROK_HED, dtype=torch.float64)
    return (m / m.norm(dim=1, keepdim=True)).to(dtype)


def rgb_to_od(x: torch.Tensor, eps: float = OD_EPS) -> torch.Tensor:
    """``OD = -log(I + eps)`` of float RGB in [0, 1] (``I0 = 1``), any shape."""
    return -torch.log(x + eps)


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The module formula on float RGB ``x`` of shape ``(..., 3, H, W)`` in [0, 1].

    ``alpha`` and ``beta`` are ``(3,)`` (one draw for all of ``x``) or ``(..., 3)`` matching
    ``x``'s leading dims (one draw per image of a batch). Computed in ``x``'s dtype.
    """
    m = stain_matrix(torch.float64)
    m_inv = torch.linalg.inv(m).to(x.dtype)
    m = m.to(x.dtype)
    alpha = alpha.to(dtype=x.dtype, device=x.device)[..., None, None]
    beta = beta.to(dtype=x.dtype, device=x.device)[..., None, None]
    conc = torch.einsum("...chw,ck->...khw", rgb_to_od(x), m_inv.to(x.device))
    conc = conc * alpha + beta
    od = torch.einsum("...khw,kc->...chw", conc, m.to(x.device))
    return torch.exp(-od).clamp_(0.0, 1.0)


def draw_hed(
    sigma: float, bias: float, n: int | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)``, each ``(3,)`` (``n`` None) or ``(n, 3)``: ``alpha ~ U(1-sigma,
    1+sigma)``, ``beta ~ U(-bias, bias)``, from ``generator`` (torch's global RNG if None)."""
    shape = (3,) if n is None else (n, 3)
    u = torch.rand((2, *shape), generator=generator, dtype=torch.float64)
    return (1.0 + sigma * (2 * u[0] - 1)).float(), (bias * (2 * u[1] - 1)).float()
