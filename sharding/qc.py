"""The QC picture of a slide's tissue detection: what a user looks at to trust the regions kept.

Three panels side by side, each the thumbnail scaled so its longer side is ``PANEL_PX``, in a
256-colour PNG:

1. the thumbnail as read;
2. the tissue mask's outline (green) and the ink removed (orange wash);
3. the regions kept (full colour, thin blue frames) over a faded thumbnail.

The sharding driver writes it to ``<out>/_state/qc/<slide>.png`` (:func:`qc_path`) when it plans a
slide; readers of the dataset ignore ``_state``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .layout import STATE_DIR
from .tissue_mask import TissueMask

PANEL_PX = 480
GAP_PX = 8
OUTLINE = (0, 200, 60)
INK_WASH = (255, 140, 0)
FRAME = (30, 90, 255)


def qc_path(slide: str) -> str:
    """Where the QC picture of slide ``slide`` lives, relative to the output root."""
    return f"{STATE_DIR}/qc/{slide}.png"


def write_qc(store, slide: str, png: bytes | None) -> None:
    """Write slide ``slide``'s QC picture into ``store`` (a :class:`sharding.storage.Storage`)."""
    if png is not None:
        store.write_bytes(qc_path(slide), png)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def qc_png(found: TissueMask, xs: np.ndarray, ys: np.ndarray, size0: int) -> bytes:
    """The QC picture (PNG bytes) of ``found`` (which must carry its thumbnail) and the kept
    regions ``(xs, ys, size0)`` in level-0 pixels."""
    if found.thumb is None:
        raise ValueError("the tissue mask carries no thumbnail to draw on")
    th, tw = found.thumb.shape[:2]
    zoom = PANEL_PX / max(th, tw)
    size = (max(1, round(tw * zoom)), max(1, round(th * zoom)))

    def up(mask: np.ndarray) -> np.ndarray:
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        return np.asarray(img) > 0

    thumb = np.asarray(Image.fromarray(found.thumb).resize(size, Image.Resampling.BILINEAR))
    overlay = thumb.copy()
    if found.ink is not None:
        ink = up(found.ink)
        overlay[ink] = (0.45 * overlay[ink] + 0.55 * np.array(INK_WASH)).astype(np.uint8)
    overlay[_outline(up(found.mask))] = OUTLINE

    faded = (0.35 * thumb + 0.65 * 255).astype(np.uint8)
    per_px = zoom / found.scale  # panel pixels per level-0 pixel
    boxes = [
        (int(x * per_px), int(y * per_px), int((x + size0) * per_px), int((y + size0) * per_px))
        for x, y in zip(np.asarray(xs).tolist(), np.asarray(ys).tolist(), strict=True)
    ]
    for x0, y0, x1, y1 in boxes:  # the kept regions in full colour (boxes lie inside the panel)
        faded[y0:y1, x0:x1] = thumb[y0:y1, x0:x1]
    kept = Image.fromarray(faded)
    draw = ImageDraw.Draw(kept)
    for x0, y0, x1, y1 in boxes:  # regions never overlap: drawing after pasting changes nothing
        if x1 - x0 >= 4:  # frames only where regions are big enough to see
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=FRAME)

    w, h = size
    sheet = Image.new("RGB", (3 * w + 2 * GAP_PX, h), (255, 255, 255))
    for i, panel in enumerate((Image.fromarray(thumb), Image.fromarray(overlay), kept)):
        sheet.paste(panel, (i * (w + GAP_PX), 0))
    buf = io.BytesIO()
    # A palette: a third of the bytes. zlib level 1 rather than PNG's optimize (level 9): several
    # times faster per slide, for slightly larger files.
    sheet.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
