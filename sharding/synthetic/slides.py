"""Sets of synthetic slides on disk: pyramidal SVS / TIFF files plus ``labels.csv`` and ``truth.csv``.

The project's demo and test data (``resdistill synth OUT --slides N --seed S``). Each slide's
scene (:func:`sharding.synthetic.scene.make_scene`) is rendered tile by tile at the slide's base
resolution and written by :func:`sharding.synthetic.pyramid.write_pyramid`, whose lower levels
are area averages of level 0, so memory use does not grow with slide size.

Slide ``i`` of a set gets class ``CLASSES[i % len(CLASSES)]`` (round robin), format
``formats[i % len(formats)]`` and base magnification ``base_mags[(i // len(formats)) % len(base_mags)]``
(so four slides cover both formats at both magnifications); slides ``i`` and ``i + len(CLASSES)``
(same class) share a patient, so a patient has at most two slides and one class. A cohort
(:mod:`~sharding.synthetic.cohorts`) with several scanning sites assigns each patient a site.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharding.magnification import Magnification
from sharding.synthetic.cohorts import COHORTS, Cohort, cohort_named
from sharding.synthetic.config import SynthConfig
from sharding.synthetic.pyramid import write_pyramid
from sharding.synthetic.scene import CLASSES, SlideScene, make_scene

LABELS_CSV = "labels.csv"
TRUTH_CSV = "truth.csv"
CSV_HEADER = ("slide", "label", "patient")
#: The column ``truth.csv`` adds when the cohort has several scanning sites.
SITE_COLUMN = "site"


def site_name(site: int) -> str:
    """How ``truth.csv`` names scanning site ``site``: ``S0``, ``S1``, ..."""
    return f"S{site}"


@dataclass(frozen=True)
class SynthSlide:
    """One written slide. ``slide`` is the file stem; ``labeled`` says whether labels.csv lists
    it; ``site`` is its scanning site in ``cohort``."""

    path: Path
    slide: str
    label: str
    patient: str
    format: str
    base_mag: float
    mpp: float
    width: int
    height: int
    labeled: bool = True
    index: int = 0
    seed: int = 0
    size_um: tuple[float, float] = (0.0, 0.0)
    cohort: Cohort = COHORTS["default"]
    site: int = 0

    def scene(self) -> SlideScene:
        """The scene this slide was rendered from (islands in um, fields hashed from the seed)."""
        return make_scene(
            self.label, seed=self.seed, index=self.index, size_um=self.size_um,
            cohort=self.cohort, site=self.site,
        )  # fmt: skip


def slide_plan(
    n_slides: int,
    seed: int = 0,
    *,
    formats: Sequence[str] = ("svs", "tiff"),
    base_mags: Sequence[float] = (40, 20),
    labeled_fraction: float = 1.0,
    prefix: str = "synth",
    slides_per_patient: int = 2,
    sites: int = 1,
) -> list[dict[str, object]]:
    """Name, class, patient, site, format, base magnification and labelled flag of each slide.

    Slide ``i``: class ``CLASSES[i % C]``; patient ``P{(i // (S * C)) * C + i % C:03d}`` with
    ``S = slides_per_patient`` (with S = 2, slides ``i`` and ``i + C`` share one); format
    ``formats[i % F]``; base magnification ``base_mags[(i // F) % M]``. The labelled slides are
    the first ``round(f * n)`` (at least one when ``f > 0``), which cycle through the classes,
    so every class is labelled as soon as ``round(f * n) >= C``.

    Scanning site ``(i % C + i // (S * C)) % sites``: one per patient, and each class moves on
    one site per patient, so every site scans every class (equally when there are a multiple of
    ``S * C * sites`` slides) and the first slides of the classes, the first ones labelled, are
    spread over the sites, as when a few labelled slides are gathered from several hospitals.
    """
    if n_slides < 0:
        raise ValueError(f"n_slides must be >= 0, got {n_slides}")
    if not 0.0 <= labeled_fraction <= 1.0:
        raise ValueError(f"labeled_fraction must be in [0, 1], got {labeled_fraction}")
    if not formats or not base_mags:
        raise ValueError("formats and base_mags must not be empty")
    if slides_per_patient < 1:
        raise ValueError(f"slides_per_patient must be >= 1, got {slides_per_patient}")
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    c, f = len(CLASSES), len(formats)
    n_lab = round(labeled_fraction * n_slides)
    if labeled_fraction > 0 and n_slides:
        n_lab = max(1, n_lab)
    plan = []
    for i in range(n_slides):
        plan.append(
            {
                "index": i,
                "slide": f"{prefix}_{seed}_{i:03d}",
                "label": CLASSES[i % c],
                "patient": f"P{(i // (slides_per_patient * c)) * c + i % c:03d}",
                "site": (i % c + i // (slides_per_patient * c)) % sites,
                "format": formats[i % f],
                "base_mag": float(base_mags[(i // f) % len(base_mags)]),
                "labeled": i < n_lab,
            }
        )
    return plan


def write_slide(
    path: str | Path,
    scene: SlideScene,
    *,
    fmt: str,
    base_mag: float,
    tile: int = 256,
    factor: int = 4,
    min_level_px: int = 1000,
    quality: int = 80,
) -> tuple[int, int]:
    """Render ``scene`` at ``base_mag`` (``mpp = 10 / base_mag``) into ``path``; return (w, h) px."""
    mpp = Magnification(float(base_mag)).mpp
    width = int(round(scene.width_um / mpp))
    height = int(round(scene.height_um / mpp))

    def read_tile(x: int, y: int, w: int, h: int) -> np.ndarray:
        return scene.render(x, y, w, h, mpp)

    write_pyramid(
        path,
        width,
        height,
        read_tile,
        mpp=mpp,
        fmt=fmt,
        app_mag=float(base_mag),
        tile=tile,
        factor=factor,
        min_level_px=min_level_px,
        quality=quality,
    )
    return width, height


def write_synthetic_slides(
    out_dir: str | Path,
    n_slides: int,
    seed: int = 0,
    *,
    size_um: tuple[float, float] = (4000.0, 3000.0),
    labeled_fraction: float | None = None,
    formats: Sequence[str] = ("svs", "tiff"),
    base_mags: Sequence[float] = (40, 20),
    tile: int = 256,
    factor: int = 4,
    min_level_px: int = 1000,
    quality: int = 80,
    prefix: str = "synth",
    progress: Callable[[SynthSlide], None] | None = None,
    workers: int = 1,
    slides_per_patient: int = 2,
    cohort: str | Cohort = "default",
) -> list[SynthSlide]:
    """Write ``n_slides`` synthetic slides of ``cohort`` plus ``labels.csv`` and ``truth.csv``.

    Files are ``<prefix>_<seed>_<iii>.<format>``. ``labels.csv`` (``slide,label,patient``) lists
    the labelled slides only; ``truth.csv`` (same columns, plus ``site`` when the cohort has
    several scanning sites) lists every slide with its true class. ``labeled_fraction``
    defaults to the cohort's. Same arguments give identical pixels. ``progress`` is called after each slide is written;
    ``workers > 1`` writes slides in that many processes (same files, in the same order).
    See :func:`slide_plan` for the assignment of classes, patients, formats and magnifications.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        if fmt not in ("svs", "tiff"):
            raise ValueError(f"unknown slide format {fmt!r}: use 'svs' or 'tiff'")
    kind = cohort_named(cohort) if isinstance(cohort, str) else cohort
    if labeled_fraction is None:
        labeled_fraction = kind.labeled_fraction
    plan = slide_plan(
        n_slides, seed, formats=formats, base_mags=base_mags,
        labeled_fraction=labeled_fraction, prefix=prefix, slides_per_patient=slides_per_patient,
        sites=kind.sites,
    )  # fmt: skip
    common = {"out": out, "seed": seed, "size_um": size_um, "tile": tile, "factor": factor,
              "min_level_px": min_level_px, "quality": quality, "cohort": kind}  # fmt: skip
    slides: list[SynthSlide] = []
    if workers > 1 and len(plan) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork would copy the parent's threads (Ray, torch); spawn starts clean.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(plan)), mp_context=ctx) as pool:
            for slide in pool.map(_write_one, plan, [common] * len(plan)):
                slides.append(slide)
                if progress is not None:
                    progress(slide)
    else:
        for entry in plan:
            slide = _write_one(entry, common)
            slides.append(slide)
            if progress is not None:
                progress(slide)
    _write_csv(out / LABELS_CSV, [s for s in slides if s.labeled])
    _write_csv(out / TRUTH_CSV, slides, with_site=kind.sites > 1)
    return slides


def synthesize(cfg: SynthConfig, progress: Callable[[SynthSlide], None] | None = None
               ) -> list[SynthSlide]:  # fmt: skip
    """The slide set ``cfg`` describes (``resdistill synth``), written with
    :func:`write_synthetic_slides`: the cohort's slide count and labelled share apply where
    ``cfg`` leaves them unset; ``workers=0`` is one process per core."""
    kind = cfg.cohort_kind()
    size = {"size_um": tuple(cfg.size_um)} if cfg.size_um is not None else {}
    return write_synthetic_slides(
        cfg.out, kind.slides if cfg.slides is None else cfg.slides, seed=cfg.seed,
        labeled_fraction=cfg.labeled_fraction, workers=cfg.workers or os.cpu_count() or 1,
        cohort=kind, progress=progress, **size,
    )  # fmt: skip


def _write_one(entry: dict, common: dict) -> SynthSlide:
    """Render and write one slide of a :func:`slide_plan` (a process-pool task)."""
    label, fmt, mag = str(entry["label"]), str(entry["format"]), float(entry["base_mag"])
    scene = make_scene(
        label, seed=common["seed"], index=int(entry["index"]), size_um=common["size_um"],
        cohort=common["cohort"], site=int(entry["site"]),
    )  # fmt: skip
    path = common["out"] / f"{entry['slide']}.{fmt}"
    width, height = write_slide(
        path, scene, fmt=fmt, base_mag=mag, tile=common["tile"], factor=common["factor"],
        min_level_px=common["min_level_px"], quality=common["quality"],
    )  # fmt: skip
    return SynthSlide(
        path=path,
        slide=str(entry["slide"]),
        label=label,
        patient=str(entry["patient"]),
        format=fmt,
        base_mag=mag,
        mpp=Magnification(mag).mpp,
        width=width,
        height=height,
        labeled=bool(entry["labeled"]),
        index=int(entry["index"]),
        seed=common["seed"],
        size_um=common["size_um"],
        cohort=common["cohort"],
        site=int(entry["site"]),
    )


def _write_csv(path: Path, slides: Sequence[SynthSlide], with_site: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow((*CSV_HEADER, SITE_COLUMN) if with_site else CSV_HEADER)
        for s in slides:
            site = (site_name(s.site),) if with_site else ()
            writer.writerow((s.slide, s.label, s.patient, *site))
    tmp.replace(path)
