"""Predict whole slides: tile probabilities at the model's magnification, the slide's class, heatmaps.

For a slide file and a model (see :func:`resdistill.evaluate.load_model`) trained at magnification
``M`` on tiles of ``tile_px`` pixels, the slide is tiled exactly as the sharding planner tiles it
(:mod:`sharding.extract`):

1. base microns per pixel from the slide (or ``mpp``), refused when ``M`` would need upsampling;
2. the tissue mask of a thumbnail (:func:`sharding.tissue.thumbnail` + ``tissue_mask``);
3. the region grid: level-0 squares of ``size0 = round(tile_px * mpp(M) / base_mpp)`` pixels,
   centred on the slide (:func:`sharding.tissue.grid`), ``cols = width // size0`` by
   ``rows = height // size0``; regions with a tissue fraction ``>= min_tissue`` are kept;
4. each kept region read from the best pyramid level at or above ``M`` and reduced with an
   anti-aliasing filter to ``tile_px`` (:func:`sharding.slide.read_region_at`);
5. batched inference in eval mode, normalised with the checkpoint's mean/std,
   ``p(tile) = softmax(logits)``;
6. the slide's probabilities ``P(slide) = mean over kept tiles of p(tile)`` and its class
   ``argmax P(slide)``.

The heatmap is a ``(rows, cols, K)`` array of tile probabilities (NaN where no tissue). Its PNG
is the slide thumbnail (same size as :func:`sharding.tissue.thumbnail` gives) with each tissue
tile's probability of one class painted over the thumbnail pixels it covers, through a colormap
blended at ``alpha``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SlidePrediction",
    "heatmap_classes",
    "plan_tiles",
    "predict_slide",
    "render_heatmap",
    "write_prediction",
]

DEFAULT_MIN_TISSUE = 0.5
DEFAULT_CMAP = "viridis"


@dataclass
class TilePlan:
    """The region grid of one slide at one magnification and its tissue regions."""

    info: Any  # sharding.slide.SlideInfo
    size0: int
    rows: int
    cols: int
    xs: np.ndarray  # (rows * cols,) level-0 x of every grid cell, row-major
    ys: np.ndarray
    tissue: np.ndarray  # (rows * cols,) tissue fraction of every cell
    keep: np.ndarray  # (rows * cols,) bool: tissue >= min_tissue
    thumbnail: np.ndarray  # (th, tw, 3) uint8
    thumb_scale: float  # level-0 pixels per thumbnail pixel (x)


@dataclass
class SlidePrediction:
    """What :func:`predict_slide` found for one slide."""

    path: str
    slide_id: str
    model_name: str
    checkpoint: str
    mag: str
    tile_px: int
    classes: list[str]
    plan: TilePlan
    tile_probs: np.ndarray  # (n_kept, K), in grid order of the kept cells
    probs: np.ndarray  # (K,) mean of tile_probs
    min_tissue: float
    seconds: float

    @property
    def predicted(self) -> str:
        """The slide's class: ``classes[argmax(probs)]``."""
        return self.classes[int(np.argmax(self.probs))]

    @property
    def n_tiles(self) -> int:
        return int(self.tile_probs.shape[0])

    @property
    def heatmap(self) -> np.ndarray:
        """``(rows, cols, K)`` float32: tile probabilities, NaN on cells without tissue."""
        p = self.plan
        out = np.full((p.rows * p.cols, len(self.classes)), np.nan, dtype=np.float32)
        out[p.keep] = self.tile_probs
        return out.reshape(p.rows, p.cols, len(self.classes))

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        idx = np.flatnonzero(p.keep)
        return {
            "slide": self.path,
            "slide_id": self.slide_id,
            "model": self.model_name,
            "checkpoint": self.checkpoint,
            "mag": self.mag,
            "tile_px": self.tile_px,
            "classes": self.classes,
            "class": self.predicted,
            "probabilities": {c: float(v) for c, v in zip(self.classes, self.probs, strict=True)},
            "n_tiles": self.n_tiles,
            "min_tissue": self.min_tissue,
            "seconds": round(self.seconds, 3),
            "slide_info": {
                "width": p.info.width,
                "height": p.info.height,
                "base_mpp": p.info.base_mpp,
                "mpp_source": p.info.mpp_source,
            },
            "grid": {
                "rows": p.rows,
                "cols": p.cols,
                "size0": p.size0,
                "x0": int(p.xs[0]) if p.xs.size else 0,
                "y0": int(p.ys[0]) if p.ys.size else 0,
            },
            "thumbnail": {
                "width": int(p.thumbnail.shape[1]),
                "height": int(p.thumbnail.shape[0]),
                "scale": p.thumb_scale,
            },
            "tiles": [
                {
                    "x": int(p.xs[i]),
                    "y": int(p.ys[i]),
                    "row": int(i // p.cols),
                    "col": int(i % p.cols),
                    "tissue": round(float(p.tissue[i]), 4),
                    "probs": [round(float(v), 6) for v in probs],
                }
                for i, probs in zip(idx, self.tile_probs, strict=True)
            ],
        }


def plan_tiles(
    slide: Any,
    path: str,
    mag: Any,
    tile_px: int,
    *,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    mpp: float | None = None,
) -> TilePlan:
    """Steps 1-3 of the module docstring for an open OpenSlide ``slide``.

    Raises :class:`sharding.slide.SlideError` (one line) for a slide without mpp, a magnification
    above the slide's, a slide smaller than one region, or a slide without tissue.
    """
    from sharding.magnification import Magnification
    from sharding.slide import SlideError, check_magnification, slide_info
    from sharding.tissue import TissueMask, grid, region_size0, thumbnail, tissue_mask

    info = slide_info(slide, path, mpp)
    magnification = Magnification.parse(mag)
    check_magnification(info, magnification)
    size0 = region_size0(info, magnification.mpp, tile_px)
    try:
        thumb, scale = thumbnail(slide, info)
    except Exception as exc:  # OpenSlide raises on a truncated level
        raise SlideError(
            f"{path}: reading the slide failed ({exc}); the file may be truncated: copy it again"
        ) from None
    found = tissue_mask(thumb)
    mask = TissueMask(mask=found.mask, scale=scale, threshold=found.threshold)
    xs, ys = grid(info.width, info.height, size0)
    if xs.size == 0:
        raise SlideError(
            f"{path}: the slide ({info.width}x{info.height} px) is smaller than one "
            f"{tile_px} px tile at {magnification} ({size0} px at level 0)"
        )
    frac = mask.fractions(xs, ys, size0)
    keep = frac >= min_tissue
    if not keep.any():
        raise SlideError(
            f"{path}: no region has a tissue fraction >= {min_tissue:g} (best {frac.max():.2f}): "
            "check the slide is not blank, or lower --min-tissue"
        )
    return TilePlan(
        info=info,
        size0=size0,
        rows=info.height // size0,
        cols=info.width // size0,
        xs=xs,
        ys=ys,
        tissue=frac,
        keep=keep,
        thumbnail=thumb,
        thumb_scale=float(scale),
    )


def _slide_id(path: str) -> str:
    import re

    from sharding.layout import UnsafeNameError, slide_id

    stem = Path(path).stem
    try:
        return slide_id(stem)
    except UnsafeNameError:
        return re.sub(r"[^A-Za-z0-9_-]", "-", stem.strip(". ")) or "slide"


def predict_slide(
    model: Any,
    path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    mpp: float | None = None,
    device: str | None = None,
    slide_id: str | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> SlidePrediction:
    """Predict one slide with a :class:`resdistill.evaluate.LoadedModel` (module docstring).

    ``on_tiles(done, total)`` is called after each batch. Raises
    :class:`sharding.slide.SlideError` for an unreadable slide and
    :class:`resdistill.checkpoint.CheckpointError` for a checkpoint without ``tile_px``.
    """
    import torch

    from resdistill.checkpoint import CheckpointError
    from sharding.slide import SlideError, open_slide, read_region_at

    path = os.fspath(path)
    tile_px = model.tile_px
    if not tile_px:
        raise CheckpointError(
            f"{model.url}: the checkpoint does not record tile_px, needed to tile a slide"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ms = model.mean_std()
    mean, std = ms if ms is not None else ([0.5] * 3, [0.25] * 3)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    net = model.model
    net.eval().to(device)

    t0 = time.perf_counter()
    slide = open_slide(path)
    try:
        plan = plan_tiles(slide, path, model.mag, tile_px, min_tissue=min_tissue, mpp=mpp)
        # The tiles are read at the plan's base mpp (an --mpp override included).
        info = plan.info
        idx = np.flatnonzero(plan.keep)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, idx.size, batch_size):
                chunk = idx[start : start + batch_size]
                tiles = []
                for i in chunk:
                    try:
                        img = read_region_at(
                            slide, info, int(plan.xs[i]), int(plan.ys[i]), plan.size0, tile_px
                        )
                    except Exception as exc:
                        raise SlideError(
                            f"{path}: reading the region at ({plan.xs[i]}, {plan.ys[i]}) failed "
                            f"({exc}); the file may be truncated: copy it again"
                        ) from None
                    tiles.append(np.asarray(img, dtype=np.uint8))
                x = torch.from_numpy(np.stack(tiles)).to(device).permute(0, 3, 1, 2).float()
                x = (x / 255.0 - mean_t) / std_t
                logits, _ = net(x)
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
                if on_tiles is not None:
                    on_tiles(min(start + batch_size, idx.size), idx.size)
    finally:
        slide.close()
    tile_probs = np.concatenate(out).astype(np.float64)
    return SlidePrediction(
        path=path,
        slide_id=slide_id or _slide_id(path),
        model_name=model.name,
        checkpoint=model.url,
        mag=model.mag,
        tile_px=int(tile_px),
        classes=model.classes,
        plan=plan,
        tile_probs=tile_probs,
        probs=tile_probs.mean(axis=0),
        min_tissue=min_tissue,
        seconds=time.perf_counter() - t0,
    )


def render_heatmap(
    pred: SlidePrediction,
    class_index: int,
    *,
    alpha: float = 0.55,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """The thumbnail ``(th, tw, 3)`` uint8 with ``p(class_index)`` of each tissue tile painted on.

    Tile ``(x, y)`` covers thumbnail columns ``round(x / sx) .. round((x + size0) / sx)`` and rows
    ``round(y / sy) .. round((y + size0) / sy)`` with ``sx = width / tw``, ``sy = height / th``
    (adjacent tiles share edges, no gaps); there the pixel becomes
    ``(1 - alpha) * thumbnail + alpha * colormap(p)``. Cells without tissue keep the thumbnail.
    """
    import matplotlib

    p = pred.plan
    thumb = p.thumbnail.astype(np.float32)
    th, tw = thumb.shape[:2]
    sx, sy = p.info.width / tw, p.info.height / th
    colours = matplotlib.colormaps[cmap](pred.tile_probs[:, class_index])[:, :3] * 255.0
    out = thumb.copy()
    for i, colour in zip(np.flatnonzero(p.keep), colours, strict=True):
        x, y = int(p.xs[i]), int(p.ys[i])
        x0, x1 = int(round(x / sx)), int(round((x + p.size0) / sx))
        y0, y1 = int(round(y / sy)), int(round((y + p.size0) / sy))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        region = out[y0:y1, x0:x1]
        region[:] = (1.0 - alpha) * thumb[y0:y1, x0:x1] + alpha * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def heatmap_classes(pred: SlidePrediction, which: str | Sequence[str] | None) -> list[str]:
    """Classes to draw: ``None``/``"predicted"`` -> the slide's class, ``"all"`` -> every class,
    else the named classes (ValueError for an unknown one)."""
    if which is None or which == "predicted":
        return [pred.predicted]
    if which == "all":
        return list(pred.classes)
    names = [which] if isinstance(which, str) else list(which)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in pred.classes]
    if unknown:
        raise ValueError(
            f"--heatmap: unknown class(es) {unknown}: the model's classes are {pred.classes}"
        )
    return names


def write_prediction(
    pred: SlidePrediction,
    out: str,
    *,
    classes: str | Sequence[str] | None = None,
    alpha: float = 0.55,
    cmap: str = DEFAULT_CMAP,
) -> dict[str, str]:
    """Write ``<slide_id>.json``, ``<slide_id>.heatmap.npy`` (the ``(rows, cols, K)`` array) and
    ``<slide_id>.heatmap-<class>.png`` per class of :func:`heatmap_classes` to ``out`` (a local
    folder or ``s3://``). Returns ``{kind: url}``, also listed in the JSON under ``files``."""
    from PIL import Image

    from sharding.storage import open_storage

    store = open_storage(out)
    files: dict[str, str] = {}
    buf = io.BytesIO()
    np.save(buf, pred.heatmap)
    rel = f"{pred.slide_id}.heatmap.npy"
    store.write_bytes(rel, buf.getvalue())
    files["heatmap_npy"] = store.child_url(rel)
    for name in heatmap_classes(pred, classes):
        img = render_heatmap(pred, pred.classes.index(name), alpha=alpha, cmap=cmap)
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        rel = f"{pred.slide_id}.heatmap-{name}.png"
        store.write_bytes(rel, png.getvalue())
        files[f"heatmap:{name}"] = store.child_url(rel)
    doc = pred.to_json()
    rel = f"{pred.slide_id}.json"
    files["json"] = store.child_url(rel)
    doc["files"] = files
    doc["heatmap"] = {"colormap": cmap, "alpha": alpha, "shape": list(pred.heatmap.shape)}
    store.write_bytes(rel, json.dumps(doc, indent=1).encode())
    return files
