"""Synthetic H&E-like whole-slide images: real pyramidal SVS / TIFF files that OpenSlide opens.

Layers, each importing only those above it:

* :mod:`~sharding.synthetic.pyramid`: a tiled JPEG pyramid writer in bounded memory (any pixels).
* :mod:`~sharding.synthetic.noise`: hashed value noise and sensor noise (pure functions of
  coordinates, so tiles agree at their borders).
* :mod:`~sharding.synthetic.layout`: where tissue, vacuoles and glands are (the scene's truth).
* :mod:`~sharding.synthetic.nuclei`: where nuclei are and how one is drawn.
* :mod:`~sharding.synthetic.staining`: the colour model (a lab's stain vectors, strengths, glass).
* :mod:`~sharding.synthetic.optics`: a scanner's focus blur and stripe shading.
* :mod:`~sharding.synthetic.cohorts`: named cohorts (scanning sites, subtle cues, unlabelled,
  chromatin cues with scanner optics).
* :mod:`~sharding.synthetic.config`: the options of ``resdistill synth`` (:class:`SynthConfig`).
* :mod:`~sharding.synthetic.scene`: the classes and the renderer of a scene.
* :mod:`~sharding.synthetic.slides`: slide sets on disk with ``labels.csv`` / ``truth.csv``
  (:func:`synthesize` takes a :class:`SynthConfig`).
"""

from sharding.synthetic.cohorts import COHORTS, Cohort, cohort_named
from sharding.synthetic.config import SynthConfig
from sharding.synthetic.layout import Island, TissueLayout
from sharding.synthetic.nuclei import NuclearCues
from sharding.synthetic.optics import Optics
from sharding.synthetic.pyramid import (
    APERIO_PREFIX,
    FORMATS,
    PyramidInfo,
    TileReader,
    aperio_description,
    box_downsample,
    level_sizes,
    require_jpeg_codec,
    write_pyramid,
)
from sharding.synthetic.scene import CLASS_CUES, CLASSES, SlideScene, make_scene
from sharding.synthetic.slides import (
    CSV_HEADER,
    LABELS_CSV,
    SITE_COLUMN,
    TRUTH_CSV,
    SynthSlide,
    site_name,
    slide_plan,
    synthesize,
    write_slide,
    write_synthetic_slides,
)
from sharding.synthetic.staining import REFERENCE, Staining

__all__ = [
    "APERIO_PREFIX",
    "CLASSES",
    "CLASS_CUES",
    "COHORTS",
    "CSV_HEADER",
    "FORMATS",
    "LABELS_CSV",
    "REFERENCE",
    "SITE_COLUMN",
    "TRUTH_CSV",
    "Cohort",
    "Island",
    "NuclearCues",
    "Optics",
    "PyramidInfo",
    "SlideScene",
    "Staining",
    "SynthConfig",
    "SynthSlide",
    "TileReader",
    "TissueLayout",
    "aperio_description",
    "box_downsample",
    "cohort_named",
    "level_sizes",
    "make_scene",
    "require_jpeg_codec",
    "site_name",
    "slide_plan",
    "synthesize",
    "write_pyramid",
    "write_slide",
    "write_synthetic_slides",
]
