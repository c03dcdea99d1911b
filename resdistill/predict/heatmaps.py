"""Heatmap pictures of one slide's prediction (contract; implementation pending).

:func:`heatmap_pngs` is what the prediction pipeline calls once per slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sharding.annotations import Outline

__all__ = ["CLASS_MAP", "DEFAULT_HEATMAP_PX", "LEFT_PX", "TOP_PX", "heatmap_pngs"]

#: Long side, in pixels, of the slide picture under a heatmap (``--heatmap-px``).
DEFAULT_HEATMAP_PX = 1600
#: The name of the argmax class map among the pictures.
CLASS_MAP = "classes"
#: Where the slide image's top left pixel lies in every PNG.
LEFT_PX, TOP_PX = 0, 0


def heatmap_pngs(
    background: np.ndarray,
    slide_size: tuple[int, int],
    xs: np.ndarray,
    ys: np.ndarray,
    size0: int,
    tile_probs: np.ndarray,
    classes: Sequence[str],
    *,
    slide_id: str,
    mag: str,
    which: Sequence[str],
    cmap: str = "viridis",
    alpha: float = 0.55,
    escalated: np.ndarray | None = None,
    outlines: Sequence[Outline] | None = None,
    mpp: float | None = None,
    confidence_opacity: bool = False,
) -> dict[str, bytes]:
    """PNG bytes per picture: ``{class_name: png}`` for each class in ``which`` (its probability
    over every tissue tile, with a colorbar, titled with the slide, the class and the
    magnification as users write it, e.g. 2.5x) and ``{"classes": png}``, the argmax class map with
    a legend. ``background`` is the slide image (``(h, w, 3)`` uint8, long side about
    ``--heatmap-px``) covering level-0 ``slide_size`` ``(width, height)``; tile ``i`` covers level-0
    ``[xs[i], xs[i] + size0) x [ys[i], ys[i] + size0)`` and has ``tile_probs[i]`` ``(K,)``;
    ``escalated[i]`` marks tiles the cascade sent to the teacher; ``outlines`` are annotation
    outlines drawn over every picture.

    Temporary body (the heatmap work replaces it): each class's probability painted over the
    background (:func:`resdistill.eval.plots.render_heatmap`), the argmax map as class index
    over ``K - 1`` (only when ``which`` names :data:`CLASS_MAP`), escalated tiles not marked, no
    scale bar, outlines with their legend strip."""
    from io import BytesIO

    from PIL import Image

    from resdistill.eval.plots import draw_annotations, render_heatmap

    size = (int(slide_size[0]), int(slide_size[1]))
    probs = np.asarray(tile_probs)
    values = {
        name: probs.argmax(axis=1) / max(1, len(classes) - 1)
        if name == CLASS_MAP
        else probs[:, list(classes).index(name)]
        for name in which
    }
    out: dict[str, bytes] = {}
    for name, v in values.items():
        img = render_heatmap(background, size, xs, ys, size0, v, alpha=alpha, cmap=cmap)
        if outlines:
            img = draw_annotations(img, size, outlines, classes)
        buf = BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out
