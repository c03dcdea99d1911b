"""Named synthetic cohorts that differ the way real cohorts do (``resdistill synth --cohort``).

A :class:`Cohort` changes how slides are stained and how atypical nuclei look, never where the
tissue is: slide ``i`` of seed ``s`` has the same layout, glands, nuclei positions and slide
stain jitter in every cohort. The cohorts (:data:`COHORTS`):

* ``default``: the embedded demo and test slides, one lab (:data:`~sharding.synthetic.staining.REFERENCE`).
* ``sites``: :data:`SITES` scanning sites, each with its own stain vectors, stain strengths and
  glass tint (:meth:`Cohort.staining`): a batch effect that is nuisance, not signal (each
  patient is scanned at one site and every site scans every class; see
  :func:`~sharding.synthetic.slides.slide_plan`). 24 slides by default: with two slides per
  patient, every class has one patient at each site.
* ``subtle``: atypical nuclei keep their high-magnification detail (clumped chromatin, nucleoli,
  irregular contour) but are enlarged 15% instead of 40% and start from 1.25 hematoxylin
  instead of 1.30 (benign nuclei: 1.35; :data:`SUBTLE_CUES`). Atypical tissue seen at 5x is
  then ~3.5 grey levels darker than benign tissue instead of ~10.5: the only atypia cue that
  survives downsampling is a third as strong, so the classes are harder at low magnification
  and not at high.
* ``unlabeled``: four times the slides with a quarter of them labelled: as many labelled slides
  as ``default`` plus three times as many unlabelled ones.
* ``chromatin``: other cues and another site effect. Atypia is told by its chromatin alone
  (clumps, membrane, nucleoli: detail of 1-3 um seen at 20x and above): its nuclei keep the
  benign size and their base hematoxylin is lowered so that atypical tissue is as dark as
  benign tissue at low magnification (:data:`CHROMATIN_CUES`); no class has a colour cue for
  atypia at 5x or below. Its :data:`SITES` scanners share one staining and differ in their
  optics (:mod:`~sharding.synthetic.optics`): focus blur up to :data:`BLUR_UM` um, which erases
  exactly that chromatin detail, and stripe shading up to :data:`SHADING`. 24 slides, as
  ``sites``.

Names combine with ``+`` (``sites+subtle``): the sites of one, the cues of the other, the most
slides and the smallest labelled share; two different site effects (stain and optics) or two
different cues are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sharding.synthetic.nuclei import NuclearCues
from sharding.synthetic.optics import Optics
from sharding.synthetic.staining import REFERENCE, Staining, unit

#: Scanning sites of the ``sites`` cohort.
SITES = 3
#: Site stain strengths are ``exp(STRENGTH_SPREAD * q)`` and site stain hues turn by
#: ``HUE_SPREAD * q`` degrees, with ``q`` evenly spaced in (-1/2, 1/2) (:meth:`Cohort.staining`).
STRENGTH_SPREAD = 1.0
HUE_SPREAD = 30.0
#: Largest change of a site's glass colour, per RGB channel.
GLASS_JITTER = 6.0
#: The ``subtle`` cohort's atypical nuclei (the default is ``NuclearCues()``: 1.4, 1.30).
SUBTLE_CUES = NuclearCues(atypia_scale=1.15, atypia_h=1.25)
#: The ``chromatin`` cohort's atypical nuclei: benign size, and a base hematoxylin (1.20 against
#: the benign 1.35) that offsets what clumps, membrane and nucleoli add: atypical tissue seen at
#: 5x is as dark as benign tissue (within 0.1 grey level on the renderer, against ~10.5 in
#: ``default``); set from the renderer alone, before any training
CHROMATIN_CUES = NuclearCues(atypia_scale=1.0, atypia_h=1.20)
#: The ``chromatin`` cohort's scanners: blur sigma and shading levels ``k / (sites - 1)`` of these
BLUR_UM = 0.6
SHADING = 0.12
#: site effects a cohort may have
SITE_EFFECTS = ("stain", "optics")


@dataclass(frozen=True)
class Cohort:
    """A kind of slide set. ``sites`` scanning sites (1: every slide has the reference
    staining and ideal optics) differing in ``site_effect`` (their ``stain``, or their
    ``optics``), ``cues`` for atypical nuclei, and the set's default size (``slides``) and
    labelled share (``labeled_fraction``), which explicit arguments override."""

    name: str
    models: str
    sites: int = 1
    cues: NuclearCues = field(default_factory=NuclearCues)
    slides: int = 6
    labeled_fraction: float = 1.0
    site_effect: str = "stain"

    def optics(self, seed: int, site: int) -> Optics:
        """The scanner optics of site ``site`` of a set made with ``seed``: ideal unless the
        site effect is ``optics``. Then blur and shading each take their own seeded
        permutation of the levels ``k / (sites - 1)``, ``k = 0 .. sites - 1``, of
        :data:`BLUR_UM` and :data:`SHADING`: one site is sharp, one evenly lit."""
        if not 0 <= site < self.sites:
            raise ValueError(f"site must be within [0, {self.sites}), got {site}")
        if self.sites == 1 or self.site_effect != "optics":
            return Optics()
        order = np.random.default_rng([seed, 0x0B71C5])
        q = [int(order.permutation(self.sites)[site]) / (self.sites - 1) for _ in range(2)]
        return Optics(blur_um=BLUR_UM * q[0], shading=SHADING * q[1])

    def staining(self, seed: int, site: int) -> Staining:
        """The staining of scanning site ``site`` (``0 <= site < sites``) of a set made with ``seed``.

        One site: :data:`REFERENCE`. Several: each of four properties takes its own seeded
        permutation of the levels ``q = (k + 1/2) / sites - 1/2``, ``k = 0 .. sites - 1``, so
        any two sites differ in every property by at least ``1 / sites`` of its spread:
        hematoxylin and eosin strengths ``exp(STRENGTH_SPREAD * q)`` (0.72-1.40 for 3 sites)
        and the hues of their OD vectors, turned about the grey axis by ``HUE_SPREAD * q``
        degrees (purple to blue hematoxylin, pink to orange eosin). The glass colour moves by up
        to :data:`GLASS_JITTER` levels per channel (a uniform draw seeded by ``(seed, site)``).
        """
        if not 0 <= site < self.sites:
            raise ValueError(f"site must be within [0, {self.sites}), got {site}")
        if self.sites == 1 or self.site_effect != "stain":
            return REFERENCE
        order = np.random.default_rng([seed, 0x5173])
        q = [(int(order.permutation(self.sites)[site]) + 0.5) / self.sites - 0.5 for _ in range(4)]
        tint = np.random.default_rng([seed, site, 0x5173]).uniform(-1, 1, 3) * GLASS_JITTER
        glass = np.minimum(np.asarray(REFERENCE.glass) + tint, 252.0)
        return Staining(
            h_od=turned(REFERENCE.h_od, HUE_SPREAD * q[0]),
            e_od=turned(REFERENCE.e_od, HUE_SPREAD * q[1]),
            h_strength=math.exp(STRENGTH_SPREAD * q[2]),
            e_strength=math.exp(STRENGTH_SPREAD * q[3]),
            glass=(float(glass[0]), float(glass[1]), float(glass[2])),
        )


def turned(od: tuple[float, float, float], degrees: float) -> tuple[float, float, float]:
    """The unit OD vector ``od`` turned by ``degrees`` about the grey axis ``(1, 1, 1)``: its hue
    changes, its darkness (the component along the axis) does not (Rodrigues' rotation);
    components are kept >= 0.01 (no stain adds light)."""
    v = np.asarray(od, np.float64)
    k = np.full(3, 1 / math.sqrt(3))
    t = math.radians(degrees)
    v = v * math.cos(t) + np.cross(k, v) * math.sin(t) + k * (k @ v) * (1 - math.cos(t))
    return unit(tuple(np.maximum(v, 0.01)))


COHORTS: dict[str, Cohort] = {
    c.name: c
    for c in (
        Cohort("default", "one lab; the embedded demo and test slides"),
        Cohort(
            "sites",
            f"{SITES} scanning sites with their own stain vectors, strengths and glass tint",
            sites=SITES,
            slides=24,
        ),
        Cohort(
            "subtle",
            "atypia's low-magnification darkening cut to a third; its nuclear detail kept",
            cues=SUBTLE_CUES,
        ),
        Cohort(
            "chromatin",
            f"atypia told by chromatin texture alone (no low-magnification cue); {SITES} "
            "scanners differing in focus blur and stripe shading, one staining",
            sites=SITES,
            cues=CHROMATIN_CUES,
            slides=24,
            site_effect="optics",
        ),
        Cohort(
            "unlabeled",
            "4x the slides, a quarter labelled (the default's labelled slides plus 3x unlabelled)",
            slides=24,
            labeled_fraction=0.25,
        ),
    )
}


def cohort_named(name: str) -> Cohort:
    """The cohort called ``name``, or the combination of several joined by ``+``.

    A combination takes the most sites, the non-default cues (two different ones are refused),
    the most slides and the smallest labelled share of its parts.
    """
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in COHORTS]
    if unknown or not parts:
        raise ValueError(f"unknown cohort {name!r}: use one of {', '.join(COHORTS)} (or a+b)")
    if len(parts) == 1:
        return COHORTS[parts[0]]
    chosen = [COHORTS[p] for p in dict.fromkeys(parts)]
    cues = {c.cues for c in chosen} - {NuclearCues()}
    if len(cues) > 1:
        raise ValueError(f"cohorts {name!r} set different nuclear cues")
    effects = {c.site_effect for c in chosen if c.sites > 1}
    if len(effects) > 1:
        raise ValueError(f"cohorts {name!r} set different site effects")
    return Cohort(
        name="+".join(c.name for c in chosen),
        models="; ".join(c.models for c in chosen if c.name != "default"),
        sites=max(c.sites for c in chosen),
        cues=cues.pop() if cues else NuclearCues(),
        slides=max(c.slides for c in chosen),
        labeled_fraction=min(c.labeled_fraction for c in chosen),
        site_effect=effects.pop() if effects else "stain",
    )
