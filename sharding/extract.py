"""The per-slide work, run as Ray tasks: plan a slide's regions, then cut and encode them in chunks.

``plan_slide`` opens the slide, finds its base mpp, detects tissue on a thumbnail and lists the
regions (level-0 squares covering one tile at the highest magnification) whose tissue fraction is
at least ``min_tissue``. ``extract_chunk`` reads each region once, from the best level for the
highest magnification, and derives every lower magnification from that tile by anti-aliased
reduction: the same region, exact sizes, one ``read_region`` per sample.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .layout import image_member, sample_key
from .options import ShardOptions
from .slide import (
    SlideError,
    check_magnification,
    downsample,
    open_slide,
    read_region_at,
    slide_info,
)
from .tissue import detect_tissue, grid, region_size0


@dataclass(frozen=True)
class SlideJob:
    """A slide as the driver hands it to tasks: where it is and what its samples carry."""

    path: str
    slide: str  # slide id
    split: str
    label: str | None
    patient: str | None


@dataclass(frozen=True)
class SlidePlan:
    """The regions of one slide: level-0 corners, tissue fractions and the region edge."""

    job: SlideJob
    size0: int
    base_mpp: float
    mpp_source: str
    xs: np.ndarray
    ys: np.ndarray
    tissue: np.ndarray
    width: int
    height: int


@dataclass
class Sample:
    """One encoded region: tar members by extension, plus the manifest row (without shard)."""

    key: str
    members: dict[str, bytes]
    row: dict

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.members.values())


def plan_slide(job: SlideJob, opts: ShardOptions) -> SlidePlan:
    """Open, check and tile a slide; raises :class:`SlideError` with a one-line reason."""
    slide = open_slide(job.path)
    try:
        info = slide_info(slide, job.path, opts.mpp_override)
        check_magnification(info, opts.mags[0])
        size0 = region_size0(info, opts.mags[0].mpp, opts.tile_px)
        try:
            mask = detect_tissue(slide, info)
        except Exception as exc:  # OpenSlide raises on a truncated level
            raise SlideError(
                f"{job.path}: reading the slide failed ({exc}); the file may be truncated: copy it "
                "again"
            ) from None
    finally:
        slide.close()
    xs, ys = grid(info.width, info.height, size0)
    if xs.size == 0:
        raise SlideError(
            f"{job.path}: the slide ({info.width}x{info.height} px) is smaller than one region "
            f"({size0} px at level 0): lower --tile-px or the top magnification"
        )
    frac = mask.fractions(xs, ys, size0)
    keep = frac >= opts.min_tissue
    if not keep.any():
        raise SlideError(
            f"{job.path}: no region has a tissue fraction >= {opts.min_tissue:g} (best "
            f"{frac.max():.2f}): check the slide is not blank, or lower --min-tissue"
        )
    return SlidePlan(
        job=job,
        size0=size0,
        base_mpp=info.base_mpp,
        mpp_source=info.mpp_source,
        xs=xs[keep],
        ys=ys[keep],
        tissue=frac[keep].astype(np.float32),
        width=info.width,
        height=info.height,
    )


def encode(image: Image.Image, opts: ShardOptions) -> bytes:
    buf = io.BytesIO()
    if opts.fmt == "jpeg":
        image.save(
            buf, format="JPEG", quality=opts.quality, subsampling=0 if opts.quality >= 90 else 2
        )
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def channel_stats(image: Image.Image) -> tuple[list[float], list[float]]:
    """Per-channel mean of the RGB image and of its square, RGB scaled to [0, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    flat = arr.reshape(-1, 3)
    return flat.mean(0).tolist(), (flat * flat).mean(0).tolist()


def extract_chunk(
    job: SlideJob,
    base_mpp: float,
    size0: int,
    regions: list[tuple[int, int, float]],
    opts: ShardOptions,
) -> list[Sample]:
    """Cut and encode ``regions`` (level-0 x, y, tissue fraction) of one slide."""
    slide = open_slide(job.path)
    try:
        # Use the mpp the plan settled on, even when it came from --mpp.
        info = replace(slide_info(slide, job.path, base_mpp), base_mpp=base_mpp)
        top_px = opts.sizes[opts.mags[0].name]
        out: list[Sample] = []
        for x, y, tissue in regions:
            try:
                top = read_region_at(slide, info, x, y, size0, top_px)
            except Exception as exc:
                raise SlideError(
                    f"{job.path}: reading the region at ({x}, {y}) failed ({exc}); the file may "
                    "be truncated: copy it again"
                ) from None
            key = sample_key(job.slide, x, y)
            members: dict[str, bytes] = {}
            row: dict = {
                "key": key,
                "slide": job.slide,
                "x": int(x),
                "y": int(y),
                "split": job.split,
                "label": job.label,
                "patient": job.patient,
                "tissue": float(tissue),
            }
            mpps: dict[str, float] = {}
            for mag in opts.mags:
                img = downsample(top, opts.sizes[mag.name])
                members[image_member(mag.name, opts.fmt)] = encode(img, opts)
                mean, sqmean = channel_stats(img)
                row[f"mean_{mag.name}"] = mean
                row[f"sqmean_{mag.name}"] = sqmean
                # The real scale: the region's level-0 extent over the image's pixels.
                mpps[mag.name] = round(size0 * base_mpp / opts.sizes[mag.name], 6)
            meta = {
                "slide": job.slide,
                "x": int(x),
                "y": int(y),
                "size0": int(size0),
                "mpp": mpps,
                "tissue": round(float(tissue), 4),
                "label": job.label,
                "split": job.split,
                "patient": job.patient,
            }
            members["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append(Sample(key=key, members=members, row=row))
        return out
    finally:
        slide.close()
