"""Predict whole slides: tile probabilities at the model's magnification, the slide's class, heatmaps.

For a slide file and a model (see :func:`resdistill.checkpoint.load_model`) trained at magnification
``M`` on tiles of ``tile_px`` pixels, the slide is read exactly as the dataset the model was trained
on was sharded (:mod:`resdistill.eval.tiling`, from the checkpoint's read chain):

1. the region grid of the sharding planner at the dataset's top magnification, the regions with a
   tissue fraction ``>= min_tissue`` (the dataset's) kept;
2. each kept region read at the top magnification, reduced to ``M``, encoded and decoded as in
   the shards;
3. batched inference in eval mode, normalised with the checkpoint's mean/std,
   ``p(tile) = softmax(logits)``;
4. the slide's probabilities ``P(slide) = mean over kept tiles of p(tile)`` and its class
   ``argmax P(slide)``.

A checkpoint without a read chain is read from the slide's pyramid at ``M`` as before
(:func:`resdistill.eval.tiling.chain_of` says so in its notes).

The heatmap is a ``(rows, cols, K)`` array of tile probabilities (NaN where no tissue). Its PNG
is the slide thumbnail (same size as :func:`sharding.tissue.thumbnail` gives) with each tissue
tile's probability of one class painted over the thumbnail pixels it covers, through a colormap
blended at ``alpha`` (:func:`resdistill.eval.plots.render_heatmap`). With annotations
(:mod:`resdistill.eval.annotation_overlay`) the slide's outlines are drawn over every heatmap PNG,
with a legend strip below it (:func:`resdistill.eval.plots.draw_annotations`).

Errors are one line: :class:`sharding.slide.SlideError` for a slide that cannot be predicted (the
caller skips it), :class:`resdistill.errors.UsageError` for a model or option that cannot work
for any slide.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resdistill.checkpoint import LoadedModel
from resdistill.errors import UsageError
from resdistill.eval.plots import DEFAULT_CMAP, draw_annotations, render_heatmap
from resdistill.eval.tiling import ReadChain, TilePlan, chain_of, plan_tiles, read_tiles, tile_px_of

if TYPE_CHECKING:
    from resdistill.eval.annotation_overlay import AnnotationOverlays, SlideOverlay

__all__ = [
    "SlidePrediction",
    "heatmap_classes",
    "predict_slide",
    "predict_slides",
    "tile_px_of",
    "write_prediction",
]

DEFAULT_ALPHA = 0.55


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
    chain: ReadChain
    tile_probs: np.ndarray  # (n_kept, K), in grid order of the kept cells
    probs: np.ndarray  # (K,) mean of tile_probs
    seconds: float

    @property
    def min_tissue(self) -> float:
        return float(self.chain.opts.min_tissue)

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
            "read_chain": self.chain.to_json(),
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


def _slide_id(path: str) -> str:
    import re

    from sharding.layout import UnsafeNameError, slide_id

    stem = Path(path).stem
    try:
        return slide_id(stem)
    except UnsafeNameError:
        return re.sub(r"[^A-Za-z0-9_-]", "-", stem.strip(". ")) or "slide"


def predict_slide(
    model: LoadedModel,
    path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    min_tissue: float | None = None,
    mpp: float | None = None,
    device: str | None = None,
    slide_id: str | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
    chain: ReadChain | None = None,
) -> SlidePrediction:
    """Predict one slide with a :class:`resdistill.checkpoint.LoadedModel` (module docstring).

    ``chain`` defaults to :func:`resdistill.eval.tiling.chain_of` ``(model, min_tissue, mpp)``.
    ``on_tiles(done, total)`` is called after each batch. Raises
    :class:`sharding.slide.SlideError` for an unreadable slide and
    :class:`resdistill.checkpoint.CheckpointError` for a checkpoint that cannot tile a slide.
    """
    import torch

    from sharding.slide import open_slide

    path = os.fspath(path)
    chain = chain or chain_of(model, min_tissue=min_tissue, mpp=mpp)
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
        plan = plan_tiles(slide, path, chain)
        idx = np.flatnonzero(plan.keep)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, idx.size, batch_size):
                tiles = read_tiles(slide, plan, chain, idx[start : start + batch_size])
                x = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float()
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
        tile_px=chain.tile_px,
        classes=model.classes,
        plan=plan,
        chain=chain,
        tile_probs=tile_probs,
        probs=tile_probs.mean(axis=0),
        seconds=time.perf_counter() - t0,
    )


def heatmap_classes(which: str | Sequence[str] | None, classes: Sequence[str]) -> list[str] | None:
    """The classes ``--heatmap`` names among ``classes``: ``None`` for ``None``/``"predicted"``
    (each slide's own class), every class for ``"all"``, else the names of a list or of a comma
    list; :class:`UsageError` naming an unknown one."""
    if which is None or which == "predicted":
        return None
    if which == "all":
        return list(classes)
    names = [which] if isinstance(which, str) else list(which)
    names = [n.strip() for part in names for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise UsageError(
            f"--heatmap: unknown class(es) {unknown}: the model's classes are {list(classes)}"
        )
    return names


def write_prediction(
    pred: SlidePrediction,
    out: str,
    *,
    classes: str | Sequence[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    overlay: SlideOverlay | None = None,
) -> dict[str, str]:
    """Write ``<slide_id>.json``, ``<slide_id>.heatmap.npy`` (the ``(rows, cols, K)`` array) and
    ``<slide_id>.heatmap-<class>.png`` per class of :func:`heatmap_classes` (default: the slide's
    class) to ``out`` (a local folder or ``s3://``). Returns ``{kind: url}``, also listed in the
    JSON under ``files``. With an ``overlay`` its outlines are drawn on every PNG and the JSON
    records it under ``annotations``."""
    from PIL import Image

    from sharding.storage import open_storage

    store = open_storage(out)
    files: dict[str, str] = {}
    buf = io.BytesIO()
    np.save(buf, pred.heatmap)
    rel = f"{pred.slide_id}.heatmap.npy"
    store.write_bytes(rel, buf.getvalue())
    files["heatmap_npy"] = store.child_url(rel)
    p = pred.plan
    for name in heatmap_classes(classes, pred.classes) or [pred.predicted]:
        img = render_heatmap(
            p.thumbnail, (p.info.width, p.info.height), p.xs[p.keep], p.ys[p.keep], p.size0,
            pred.tile_probs[:, pred.classes.index(name)], alpha=alpha, cmap=cmap,
        )  # fmt: skip
        if overlay is not None and overlay.outlines:
            img = draw_annotations(
                img, (p.info.width, p.info.height), overlay.outlines, pred.classes
            )
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
    if overlay is not None:
        doc["annotations"] = overlay.to_json(pred.classes)
    store.write_bytes(rel, json.dumps(doc, indent=1).encode())
    return files


def predict_slides(
    model: LoadedModel,
    slides: Mapping[str, str | os.PathLike[str]],
    out: str,
    *,
    heatmap: str | Sequence[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    batch_size: int = 64,
    min_tissue: float | None = None,
    mpp: float | None = None,
    device: str | None = None,
    on_skip: Callable[[str], None] | None = None,
    annotations: AnnotationOverlays | None = None,
    chain: ReadChain | None = None,
) -> Iterator[SlidePrediction]:
    """:func:`predict_slide` then :func:`write_prediction` for each ``{slide_id: path}``, yielding
    each prediction once its files are written. The read chain (``chain``, else
    :func:`resdistill.eval.tiling.chain_of` ``(model, min_tissue, mpp)``) is settled once, before
    any slide: a checkpoint that cannot tile a slide raises
    :class:`resdistill.checkpoint.CheckpointError`.

    A slide that cannot be predicted (:class:`sharding.slide.SlideError`, or a
    :class:`UsageError`) is skipped: ``on_skip(message)`` and the next slide. A
    :class:`sharding.storage.StorageError` (the output cannot be written) propagates: every later
    slide would fail the same way. With ``annotations`` each slide's outlines are drawn.
    """
    from sharding.slide import SlideError

    chain = chain or chain_of(model, min_tissue=min_tissue, mpp=mpp)
    for sid, path in slides.items():
        try:
            pred = predict_slide(
                model, path, batch_size=batch_size, device=device, slide_id=sid, chain=chain
            )
            overlay = annotations.for_slide(sid) if annotations is not None else None
            write_prediction(pred, out, classes=heatmap, alpha=alpha, cmap=cmap, overlay=overlay)
        except (SlideError, UsageError) as exc:
            if on_skip is not None:
                on_skip(str(exc))
            continue
        yield pred
