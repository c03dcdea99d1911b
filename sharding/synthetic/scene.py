"""A synthetic slide's scene: its class, tissue layout and staining, rendered to RGB pixels.

Colour: per-pixel hematoxylin and eosin amounts mixed by the Beer-Lambert model of the scene's
:class:`~sharding.synthetic.staining.Staining` (the lab's stain vectors, strengths and glass),
times the slide's own stain strengths, plus Gaussian sensor noise.

Classes (:data:`CLASSES`) carry their cue at different physical scales (:data:`CLASS_CUES`):

* ``benign``: the reference - fibrous pink stroma with scattered oval nuclei (smooth chromatin).
* ``glandular``: the same stroma and nuclei plus regular glands (75-95 um across on a 140 um
  grid, white lumen, pale epithelial rim lined by a ring of nuclei): architecture, which
  survives a 4-8x downsample. Glands are dense enough that any 128 um field of the tissue holds
  a good part of one, so a tile's slide label is true of the tile itself.
* ``atypia``: same nuclear density as ``benign``, but coarse clumped chromatin, nucleoli and an
  irregular contour (1-3 um detail): clear at 40x and 20x, fading at 10x, gone at 5x (a nucleus
  is ~3 pixels there). Its nuclei are also 40% larger and a little darker (nucleomegaly,
  hyperchromasia), a cue that survives at low magnification as slightly bigger, darker dots,
  partly masked by the regional variation of cellularity (0.7-1.3x): the kind of cue a
  low-magnification student must learn to see from the teacher. The ``subtle`` cohort weakens
  this low-magnification part (:data:`~sharding.synthetic.cohorts.SUBTLE_CUES`).
* ``inflamed``: small, very dark lymphocyte nuclei scattered through the tissue and packed into
  wide aggregates: darker and bluer at every scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from sharding.synthetic.cohorts import Cohort, cohort_named
from sharding.synthetic.layout import Island, TissueLayout
from sharding.synthetic.noise import mix, noise_grid, sensor_noise_window
from sharding.synthetic.nuclei import NuclearCues, place_nuclei, stamp_nuclei
from sharding.synthetic.optics import Optics
from sharding.synthetic.staining import REFERENCE, Staining

CLASSES: tuple[str, ...] = ("benign", "glandular", "atypia", "inflamed")

#: The visual cue of each class and the scale it lives at.
CLASS_CUES: dict[str, str] = {
    "benign": "reference: fibrous stroma, scattered oval nuclei with smooth chromatin",
    "glandular": "architecture: large regular glands with white lumens (low magnification)",
    "atypia": "nuclear detail: clumped chromatin, nucleoli, irregular contour (high magnification); "
    "slightly enlarged nuclei (a faint darkening at low magnification)",
    "inflamed": "nuclear density and colour: dark lymphocyte aggregates (every magnification)",
}


@dataclass(frozen=True)
class SlideScene(TissueLayout):
    """Everything needed to render one slide, in micrometres: the :class:`TissueLayout`, how
    atypical nuclei look (``cues``) and the staining; :meth:`render` draws any rectangle.

    ``stain`` is the slide's own (hematoxylin, eosin) strength, multiplied by the lab's
    (``staining``); ``optics`` is the scanner's blur and shading (ideal by default)."""

    stain: tuple[float, float] = (1.0, 1.0)
    fibre_angles: tuple[float, float] = (0.3, 1.9)
    staining: Staining = REFERENCE
    cues: NuclearCues = NuclearCues()
    optics: Optics = Optics()

    def nuclei(self, x0: float, y0: float, x1: float, y1: float) -> list[dict[str, np.ndarray]]:
        """Nuclei that may touch the um box, in groups sharing a drawing style (:func:`place_nuclei`)."""
        return place_nuclei(self, x0, y0, x1, y1, self.cues)

    # -- drawing --------------------------------------------------------------------------
    def render(
        self,
        x0: int,
        y0: int,
        w: int,
        h: int,
        mpp: float,
        noise_seed: int = 0,
        sensor_noise: bool = True,
    ) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the pixel rectangle at ``x0, y0`` of a raster with ``mpp``.

        Pixel ``(i, j)`` samples the scene at ``((x0 + j + 0.5) * mpp, (y0 + i + 0.5) * mpp)`` um.
        The Gaussian sensor noise (``sensor_noise``) is a window of a fixed noise bank chosen by
        ``(salt, x0, y0, noise_seed)``, so equal arguments give equal pixels. Everything else is
        a function of scene coordinates: rendering a rectangle at once or tile by tile gives the
        same pixels (up to the linear interpolation of the tissue edge between 8-px nodes).
        Non-ideal ``optics`` see the noise-free rectangle with a margin, then add the noise
        (:meth:`~sharding.synthetic.optics.Optics.apply`).
        """
        if not self.optics.ideal:
            m = self.optics.margin_px(mpp)
            ideal = replace(self, optics=Optics())
            clean = ideal.render(x0 - m, y0 - m, w + 2 * m, h + 2 * m, mpp, sensor_noise=False)
            noise = (sensor_noise_window(self.salt, x0, y0, w, h, noise_seed) if sensor_noise
                     else np.zeros((h, w, 3), np.float32))  # fmt: skip
            return self.optics.apply(clean, x0, mpp, noise)
        xs = ((x0 + np.arange(w) + 0.5) * mpp).astype(np.float32)
        ys = ((y0 + np.arange(h) + 0.5) * mpp).astype(np.float32)
        ux0, ux1, uy0, uy1 = xs[0], xs[-1], ys[0], ys[-1]
        noise = (
            sensor_noise_window(self.salt, x0, y0, w, h, noise_seed)
            if sensor_noise
            else np.zeros((h, w, 3), np.float32)
        )
        tissue = self.tissue_tile(x0, y0, w, h, mpp)
        if not tissue.any():
            return self.staining.blank(noise)

        # stroma: two families of thin wavy collagen fibres (the second one fainter), each bent
        # by its own smooth phase warp, whose mix drifts slowly over the tissue
        blend = np.clip((noise_grid(xs, ys, 140.0, self.field_salt(42)) - 0.4) / 0.2, 0.0, 1.0)
        fib = np.zeros((h, w), np.float32)
        for k, (theta, weight) in enumerate(
            zip(self.fibre_angles, (blend, 1.0 - blend), strict=True)
        ):
            warp = 14.0 * noise_grid(xs, ys, 45.0, self.field_salt(40 + 3 * k))
            warp += 2.5 * noise_grid(xs, ys, 9.0, self.field_salt(41 + 3 * k))
            proj = xs[None, :] * math.cos(theta) + ys[:, None] * math.sin(theta)
            band = (0.5 + 0.5 * np.sin((2 * np.pi / 5.0) * proj + warp)).astype(np.float32)
            fib += weight * band**3
        fib *= 0.55 + 0.9 * noise_grid(xs, ys, 4.0, self.field_salt(44))
        slow = 0.8 + 0.4 * noise_grid(xs, ys, 90.0, self.field_salt(43))
        e = 0.62 * (0.45 + 0.75 * fib) * slow
        hem = np.full((h, w), 0.10, np.float32)
        hole = self.holes(xs, ys, grid=True)
        e *= 1.0 - hole
        hem *= 1.0 - hole

        # glands: pale epithelial rim around a white lumen
        for gx, gy, ga, gb, gt in self.glands(ux0, uy0, ux1, uy1):
            j0, j1 = np.searchsorted(xs, [gx - ga - 2, gx + ga + 2])
            i0, i1 = np.searchsorted(ys, [gy - ga - 2, gy + ga + 2])
            if j1 <= j0 or i1 <= i0:
                continue
            c, s = math.cos(gt), math.sin(gt)
            dx, dy = xs[None, j0:j1] - gx, ys[i0:i1, None] - gy
            u = (dx * c + dy * s) / ga
            v = (-dx * s + dy * c) / gb
            rho = np.sqrt(u * u + v * v)
            scale_px = 0.5 * (ga + gb) / mpp
            inside = np.clip((1.0 - rho) * scale_px + 0.5, 0.0, 1.0).astype(np.float32)
            lumen = np.clip((0.6 - rho) * scale_px + 0.5, 0.0, 1.0).astype(np.float32)
            rim = inside - lumen
            sub_e, sub_h = e[i0:i1, j0:j1], hem[i0:i1, j0:j1]
            sub_e *= 1.0 - inside
            sub_h *= 1.0 - inside
            sub_e += 0.30 * rim + 0.05 * lumen
            sub_h += 0.20 * rim + 0.02 * lumen

        alpha = np.zeros(h * w, np.float32)
        nuc_h = np.zeros(h * w, np.float32)
        textures: dict[int, np.ndarray] = {}
        for group in self.nuclei(ux0, uy0, ux1, uy1):
            style = int(group["style"])
            if style not in textures:  # chromatin: fine and faint (0), clumped (1); mean 1
                scale, amp = (0.8, 1.1) if style else (1.2, 0.12)
                field = noise_grid(xs, ys, scale, self.field_salt(50 + style))
                textures[style] = (1.0 + amp * (field - 0.5)).ravel()
            stamp_nuclei(group, x0, y0, w, h, mpp, alpha, nuc_h, textures[style])
        alpha = alpha.reshape(h, w)
        nuc_h = nuc_h.reshape(h, w)

        hs = self.stain[0] * self.staining.h_strength
        es = self.stain[1] * self.staining.e_strength
        hem = tissue * (hem * (1.0 - alpha) + nuc_h) * hs
        e = tissue * e * (1.0 - 0.75 * alpha) * es
        return self.staining.compose(hem, e, noise)


def make_scene(
    label: str,
    *,
    seed: int,
    index: int,
    size_um: tuple[float, float],
    cohort: str | Cohort = "default",
    site: int = 0,
) -> SlideScene:
    """The scene of slide ``index`` of a set made with ``seed``: 1-3 islands filling ~half the glass.

    Islands sit in equal cells along the longer side; each is an ellipse of ~0.8 of its cell's
    half-size with random low harmonics, kept >= 3% of the short side away from the slide edge.
    The ``cohort`` (:mod:`~sharding.synthetic.cohorts`) sets how atypical nuclei look and the
    staining and optics of scanning site ``site``; layout and slide stain strength depend only on
    ``(seed, index)``, so slide ``index`` has the same tissue in every cohort.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}: use one of {CLASSES}")
    kind = cohort_named(cohort) if isinstance(cohort, str) else cohort
    width_um, height_um = float(size_um[0]), float(size_um[1])
    if width_um <= 0 or height_um <= 0:
        raise ValueError(f"size_um must be positive, got {size_um!r}")
    rng = np.random.default_rng([seed, index, 0x15])
    horizontal = width_um >= height_um
    long_side, short_side = (width_um, height_um) if horizontal else (height_um, width_um)
    k = int(np.clip(round(long_side / short_side * rng.uniform(0.7, 1.6)), 1, 3))
    cell_long = long_side / k
    margin = 0.03 * short_side
    islands = []
    for i in range(k):
        amps = tuple(
            float(v) for v in rng.uniform(-1, 1, 5) * np.array([0.14, 0.09, 0.06, 0.04, 0.03])
        )
        phases = tuple(float(v) for v in rng.uniform(0, 2 * np.pi, 5))
        grow = Island(0, 0, 1, 1, amps, phases).reach
        half_long = (cell_long / 2 - margin) / grow
        half_short = (short_side / 2 - margin) / grow
        c_long = (i + 0.5) * cell_long + rng.uniform(-0.02, 0.02) * cell_long
        c_short = short_side / 2 + rng.uniform(-0.02, 0.02) * short_side
        s_long = half_long * rng.uniform(0.95, 1.0) - abs(c_long - (i + 0.5) * cell_long) / grow
        s_short = half_short * rng.uniform(0.95, 1.0) - abs(c_short - short_side / 2) / grow
        if horizontal:
            islands.append(Island(c_long, c_short, s_long, s_short, amps, phases))
        else:
            islands.append(Island(c_short, c_long, s_short, s_long, amps, phases))
    return SlideScene(
        label=label,
        width_um=width_um,
        height_um=height_um,
        islands=tuple(islands),
        salt=mix(seed, index, 0xA11CE),
        stain=(float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.93, 1.07))),
        fibre_angles=(float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi))),
        staining=kind.staining(seed, site),
        cues=kind.cues,
        optics=kind.optics(seed, site),
    )
