"""The per-slide work, run as Ray tasks: plan a slide's regions, then cut and encode them in chunks.

``plan_slide`` lists the regions (level-0 squares covering one tile at the highest magnification)
whose tissue fraction is at least ``min_tissue``, each with its marker-ink fraction, with the
tiling plan prediction shares (:func:`sharding.regions.plan_regions`: base mpp, tissue and ink
detection by :func:`sharding.tissue.detect_tissue`, the region grid), and draws the slide's QC
picture (:mod:`sharding.qc`). ``extract_chunk`` cuts each region at every magnification with
:func:`region_images`: by default read once, from the best level for the highest magnification,
every lower magnification derived from that tile by anti-aliased reduction (the same region, exact
sizes, one ``read_region`` per sample); with ``--low-mags-from native`` each magnification read
from the best level at or above it (one ``read_region`` per magnification). A slide with region
annotations has its regions labelled and selected by them in the plan
(:mod:`sharding.region_labels`), so chunks only carry each region's label and class fractions.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from PIL import Image

from .annotation_set import AnnotationRef
from .annotations import AnnotationError
from .codec import channel_stats, encode
from .layout import image_member, sample_key
from .options import AnnotationOptions, ShardOptions
from .qc import qc_png
from .region_labels import ExtentError, slide_region_labels
from .regions import plan_regions
from .slide import SlideError, SlideInfo, downsample, open_slide, read_region_at, slide_info
from .slide_identity import SlideIdentity


@dataclass(frozen=True)
class SlideJob:
    """A slide as the driver hands it to tasks: where it is and what its samples carry."""

    path: str
    slide: str  # slide id
    split: str
    label: str | None  # the slide's label (labels CSV, else its annotations' majority class)
    patient: str | None
    annotation: AnnotationRef | None = None
    source: SlideIdentity | None = None  # where the slide lies and its fingerprint


class Region(NamedTuple):
    """One region to cut: level-0 corner, tissue fraction, label, its source, class fractions,
    ink fraction."""

    x: int
    y: int
    tissue: float
    label: str | None
    label_source: str | None
    fractions: dict[str, float] | None
    ink: float = 0.0


@dataclass(frozen=True)
class SlidePlan:
    """The regions of one slide: level-0 corners, tissue fractions and the region edge; with
    annotations that name classes, each region's label and class fractions too."""

    job: SlideJob
    size0: int
    base_mpp: float
    mpp_source: str
    xs: np.ndarray
    ys: np.ndarray
    tissue: np.ndarray
    width: int
    height: int
    labels: np.ndarray | None = None  # per region: class or None (annotation labels)
    origin: tuple[int, int] = (0, 0)  # SlideInfo.origin: where QuPath's pixel (0, 0) lies
    fractions: dict[str, np.ndarray] | None = None  # class -> fraction per region
    problems: list[str] = field(default_factory=list)  # one line each, the slide still sharded
    ink: np.ndarray | None = None  # per region: marker ink fraction
    qc: bytes | None = None  # the QC picture (PNG) of the tissue detection and kept regions

    @property
    def label_source(self) -> str | None:
        """``annotation`` when annotations label the regions, ``slide`` for a slide label."""
        if self.labels is not None:
            return "annotation"
        return "slide" if self.job.label else None

    def regions(self, done: Collection[str] = ()) -> list[Region]:
        """The regions whose sample key is not in ``done``, in plan order."""
        out = []
        source = self.label_source
        ink = np.zeros(self.xs.size) if self.ink is None else self.ink
        for i, (x, y, t, k) in enumerate(
            zip(self.xs.tolist(), self.ys.tolist(), self.tissue.tolist(), ink.tolist(), strict=True)
        ):
            if sample_key(self.job.slide, x, y) in done:
                continue
            label = self.job.label if self.labels is None else self.labels[i]
            fr = (
                None
                if self.fractions is None
                else {c: float(f[i]) for c, f in self.fractions.items()}
            )
            out.append(Region(x, y, t, label, source, fr, k))
        return out


@dataclass
class Sample:
    """One encoded region: tar members by extension, plus the manifest row (without shard)."""

    key: str
    members: dict[str, bytes]
    row: dict

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.members.values())


def plan_slide(
    job: SlideJob, opts: ShardOptions, ann_opts: AnnotationOptions | None = None
) -> SlidePlan:
    """Open, check and tile a slide, then apply its annotations (when the job names a file);
    raises :class:`SlideError` with a one-line reason."""
    slide = open_slide(job.path)
    try:
        found = plan_regions(slide, job.path, opts)
    finally:
        slide.close()
    info, keep, mask, size0 = found.info, found.keep, found.mask, found.size0
    plan = SlidePlan(
        job=job,
        size0=size0,
        base_mpp=info.base_mpp,
        mpp_source=info.mpp_source,
        xs=found.xs[keep],
        ys=found.ys[keep],
        tissue=found.tissue[keep].astype(np.float32),
        width=info.width,
        height=info.height,
        origin=info.origin,
        ink=mask.ink_fractions(found.xs[keep], found.ys[keep], size0).astype(np.float32),
    )
    if job.annotation is not None and ann_opts is not None:
        plan = annotate(plan, ann_opts)
    return replace(plan, qc=qc_png(mask, plan.xs, plan.ys, size0))


def annotate(plan: SlidePlan, ann_opts: AnnotationOptions) -> SlidePlan:
    """The plan's regions that the slide's annotations keep, labelled by them when they name a
    class (see :mod:`sharding.region_labels`)."""
    job = plan.job
    try:
        found, problems = slide_region_labels(ann_opts, job.annotation, plan.width, plan.height,
                                              plan.xs, plan.ys, plan.size0, plan.origin)  # fmt: skip
    except (AnnotationError, ExtentError) as exc:
        raise SlideError(f"{job.path}: {exc}") from None
    keep = found.keep
    if not keep.any():
        raise SlideError(
            f"{job.path}: its annotations ({job.annotation.name}) leave no region with tissue: "
            "check the polygons and --ignore-classes"
            + (", or drop --annotated-only" if ann_opts.annotated_only else "")
        )
    labelled = job.annotation.labels_regions
    return replace(
        plan,
        xs=plan.xs[keep],
        ys=plan.ys[keep],
        tissue=plan.tissue[keep],
        ink=None if plan.ink is None else plan.ink[keep],
        labels=found.labels[keep] if labelled else None,
        fractions={c: f[keep] for c, f in found.fractions.items()} if labelled else None,
        problems=problems,
    )


def region_images(
    slide, info: SlideInfo, x: int, y: int, size0: int, opts: ShardOptions,
    names: Sequence[str] | None = None,
) -> dict[str, Image.Image]:  # fmt: skip
    """The level-0 square ``(x, y, size0)`` at the magnifications ``names`` (default: all of
    ``opts.mags``), each ``opts.sizes[name]`` px, as ``opts.low_mags_from`` says
    (:data:`sharding.options.LOW_MAGS_FROM`):

    * the top magnification, and every one with ``native``: ``read_region_at`` at its size (the
      best pyramid level at or above it, then :func:`sharding.slide.downsample`);
    * a lower magnification with ``top``: the top magnification's image (read once) reduced by
      :func:`sharding.slide.downsample` (a box average for whole factors).

    :class:`SlideError` (one line) when a read fails.
    """
    top_name = opts.mags[0].name
    top: Image.Image | None = None

    def read(px: int) -> Image.Image:
        try:
            return read_region_at(slide, info, x, y, size0, px)
        except Exception as exc:
            raise SlideError(
                f"{info.path}: reading the region at ({x}, {y}) failed ({exc}); the file may be "
                "truncated: copy it again"
            ) from None

    out: dict[str, Image.Image] = {}
    for name in [m.name for m in opts.mags] if names is None else names:
        px = opts.sizes[name]
        if name == top_name or opts.low_mags_from == "native":
            out[name] = read(px)
            if name == top_name:
                top = out[name]
        else:
            if top is None:
                top = read(opts.sizes[top_name])
            out[name] = downsample(top, px)
    return out


def source_columns(source: SlideIdentity | None) -> dict:
    """A manifest row's record of the slide it was cut from (see sharding.layout)."""
    if source is None:
        return {}
    return {"slide_uri": source.uri, "slide_size": source.size, "slide_sha256": source.sha256}


def extract_chunk(
    job: SlideJob,
    base_mpp: float,
    size0: int,
    regions: list[Region],
    opts: ShardOptions,
) -> list[Sample]:
    """Cut and encode ``regions`` of one slide (see :meth:`SlidePlan.regions`)."""
    names = [m.name for m in opts.mags]
    member = {n: image_member(n, opts.fmt) for n in names}
    # The real scale: the region's level-0 extent over the image's pixels.
    mpps = {n: round(size0 * base_mpp / opts.sizes[n], 6) for n in names}
    slide = open_slide(job.path)
    try:
        # Use the mpp the plan settled on, even when it came from --mpp.
        info = replace(slide_info(slide, job.path, base_mpp), base_mpp=base_mpp)
        out: list[Sample] = []
        for x, y, tissue, label, source, fractions, ink in regions:
            images = region_images(slide, info, x, y, size0, opts, names)
            key = sample_key(job.slide, x, y)
            members = {member[n]: encode(images[n], opts) for n in names}
            row: dict = {
                "key": key,
                "slide": job.slide,
                "x": int(x),
                "y": int(y),
                "split": job.split,
                "label": label,
                "label_source": source,
                "patient": job.patient,
                "tissue": float(tissue),
                "ink": float(ink),
                "ann": fractions,
                **source_columns(job.source),
            }
            means, sqmeans = channel_stats([images[n] for n in names])
            for n, mean, sqmean in zip(names, means.tolist(), sqmeans.tolist(), strict=True):
                row[f"mean_{n}"] = mean
                row[f"sqmean_{n}"] = sqmean
            meta = {
                "slide": job.slide,
                "x": int(x),
                "y": int(y),
                "size0": int(size0),
                "mpp": mpps,
                "tissue": round(float(tissue), 4),
                "label": label,
                "label_source": source,
                "split": job.split,
                "patient": job.patient,
            }
            members["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append(Sample(key=key, members=members, row=row))
        return out
    finally:
        slide.close()
