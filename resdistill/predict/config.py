"""The options of ``resdistill predict``: one typed, validated :class:`PredictConfig`.

The CLI is generated from these fields (:mod:`resdistill.commands.predict`); a config built in
Python, a ``--config`` YAML file and the flags all give the same object, which
:func:`resdistill.predict.driver.predict_command` runs and writes as ``<out>/config.yaml``.
Checks that need the checkpoint or matplotlib (classes of ``--heatmap``, ``--cmap``) are the
driver's; everything else is refused here, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from resdistill.cascade.rules import DEFAULT_ESCALATE, check_threshold
from resdistill.config import DEVICES, MODEL_FORMS
from resdistill.fields import ConfigError, check, check_choice, opt
from resdistill.predict.geojson import GEOJSON_MODES, GeoJSONOptions
from resdistill.predict.heatmaps import DEFAULT_HEATMAP_PX
from resdistill.read_chain import READ_MODES
from sharding.options import ON_CONFLICT

__all__ = ["S3_READS", "PredictConfig"]

#: ``--s3-reads`` choices (:mod:`sharding.slide_ranges`, :mod:`sharding.remote_slides`).
S3_READS = ("ranges", "copy")


@dataclass(frozen=True)
class PredictConfig:
    """Which model scores which slides, how they are read, and what is drawn and where."""

    checkpoint: str = opt(help=f"the model: {MODEL_FORMS}", positional=True, required=True,
                          metavar="CKPT")  # fmt: skip
    slides: tuple[str, ...] = opt(
        help="slide files, folders scanned for them, or s3:// slides or prefixes",
        positional=True, required=True, metavar="SLIDE")  # fmt: skip
    out: str = opt(help="output folder or s3://bucket/prefix", required=True)
    heatmap: str = opt(
        "predicted", "heatmap classes: 'predicted' (the slide's class), 'all', a comma list, or "
        "'none' (no pictures: the tables and the .npy heatmap only, for cohorts)")  # fmt: skip
    heatmap_px: int = opt(
        DEFAULT_HEATMAP_PX, "long side in pixels of the slide picture under the heatmaps"
    )
    batch_size: int | None = opt(
        None, "tiles per inference batch (default: as many pixels as 64 tiles of 56 px, 4 to "
        "1024 tiles: 256 at 28 px, 4 at 224 px; at least 64 on a GPU)")  # fmt: skip
    min_tissue: float | None = opt(
        None, "minimum tissue fraction of a region (default: the one the model's dataset was "
        "sharded with; 0.5 for a checkpoint without a read chain)")  # fmt: skip
    mpp: float | None = opt(None, "microns per level-0 pixel for slides that do not record it")
    read: str = opt(
        "as-trained", "as-trained: the pixels of the model's dataset (its read chain); native: "
        "the model's magnification from the best pyramid level at or above it, the cheap read",
        choices=READ_MODES)  # fmt: skip
    cascade: str | None = opt(
        None, "the cascade's teacher (any form CKPT takes): tiles the model is unsure of are "
        "scored by the teacher", metavar="TEACHER_CKPT")  # fmt: skip
    escalate: float | None = opt(
        None, "with --cascade: escalate tiles whose top probability is under T (default: "
        f"{DEFAULT_ESCALATE:g})", metavar="T")  # fmt: skip
    alpha: float = opt(0.55, "heatmap opacity over the slide picture")
    cmap: str = opt("viridis", "matplotlib colormap")
    device: str = opt(
        "auto",
        "where the inference actors run: auto is cuda when the Ray "
        "cluster has GPUs (one actor per GPU)",
        choices=DEVICES,
    )
    s3_reads: str = opt(
        "ranges", "s3:// slides: 'ranges' fetches only the byte ranges OpenSlide reads (tiled "
        "JPEG TIFF/SVS; other files are copied whole); 'copy' copies each slide whole to the "
        "node's slide cache first", choices=S3_READS)  # fmt: skip
    address: str | None = opt(
        None, "Ray cluster address ('auto' for the cluster this node belongs to; default: the "
        "submitted job's cluster, else a local Ray)")  # fmt: skip
    actors: int | None = opt(
        None, "inference actors per model (default: one per GPU on cuda, else a quarter of the "
        "CPUs, at least one)")  # fmt: skip
    annotations: str | None = opt(
        None, "folder or s3:// prefix of QuPath GeoJSON exports, one <slide>.geojson per slide "
        "(as for shard): their outlines are drawn over the slide's heatmaps; slides without a "
        "file are predicted without outlines", metavar="DIR_OR_URL")  # fmt: skip
    geojson: str = opt(
        "", "also write <slide>.geojson for QuPath's File > Import objects: 'tiles' (the flag "
        "alone) one detection per region with its class and p_<class> measurements; 'regions' "
        "one annotation per predicted class, merged; 'both'", choices=GEOJSON_MODES,
        const="tiles", metavar="{tiles,regions,both}")  # fmt: skip
    geojson_crop: bool = opt(
        True, "GeoJSON in the pixels of the slide as QuPath opens it by default, cropped to "
        "OpenSlide's bounds (openslide.bounds-x/-y: MIRAX and other sparse formats); "
        "--no-geojson-crop: level-0 pixels, for images added to QuPath with --no-crop")  # fmt: skip
    on_conflict: str = opt(
        "refuse", "a slide whose id (its file stem, '.' and spaces folded to '-') another slide "
        "with other bytes holds, in this run or in --out: 'refuse' stops the run naming both "
        "files; 'suffix' predicts it as <id>-<first 8 hex digits of its fingerprint>, the same "
        "id on every rerun", choices=ON_CONFLICT)  # fmt: skip

    def __post_init__(self) -> None:
        check(self.batch_size is None or self.batch_size >= 1, "--batch-size",
              "must be at least 1")  # fmt: skip
        check(self.heatmap_px >= 16, "--heatmap-px", f"must be at least 16, got {self.heatmap_px}")
        check_choice(PredictConfig, self, "device")
        check(self.actors is None or self.actors >= 1, "--actors", "must be at least 1")
        check_choice(PredictConfig, self, "read")
        check_choice(PredictConfig, self, "s3_reads")
        check_choice(PredictConfig, self, "on_conflict")
        check_choice(PredictConfig, self, "geojson")
        check(0.0 <= self.alpha <= 1.0, "--alpha", f"must be within 0..1, got {self.alpha}")
        check(self.min_tissue is None or 0.0 <= self.min_tissue <= 1.0, "--min-tissue",
              f"must be within 0..1, got {self.min_tissue}")  # fmt: skip
        check(self.mpp is None or self.mpp > 0, "--mpp", f"must be positive, got {self.mpp}")
        check(self.escalate is None or bool(self.cascade), "--escalate",
              "needs --cascade TEACHER_CKPT")  # fmt: skip
        if self.escalate is not None:
            try:
                check_threshold(self.escalate)
            except ValueError as exc:
                raise ConfigError(f"--escalate: {exc}") from None
        object.__setattr__(self, "slides", tuple(self.slides))

    @property
    def geojson_options(self) -> GeoJSONOptions | None:
        """What ``--geojson`` and ``--geojson-crop`` ask for (None: no GeoJSON)."""
        return GeoJSONOptions.of(self.geojson, self.geojson_crop)

    @property
    def threshold(self) -> float:
        """The cascade's escalation threshold: ``escalate``, else the default."""
        return DEFAULT_ESCALATE if self.escalate is None else float(self.escalate)
