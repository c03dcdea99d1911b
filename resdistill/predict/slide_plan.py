"""Per-slide planning, the first stage of prediction: which regions to score, and the picture
the heatmaps are drawn on.

:func:`plan_slide` opens a slide (an ``s3://`` slide through the node's cached local copy,
pinned while it is open: :func:`opened_slide`), runs the sharding planner through
:func:`resdistill.read_chain.plan_tiles` (the grid of regions at the read chain's top
magnification, the regions with enough tissue kept) and reads a background image of the whole
slide with its long side ``heatmap_px`` pixels (``slide.get_thumbnail``). It never raises: a slide
that cannot be planned (unreadable, truncated, without tissue) gives a :class:`PlanFailure` with
the one line the user reads, so one bad slide never ends a run of ten thousand.

A :class:`SlidePlan` holds only the kept regions; :meth:`SlidePlan.grid` hands any run of them to
:func:`resdistill.read_chain.read_tiles`, the one place tiles are read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from resdistill.read_chain import ReadChain
    from sharding.regions import RegionGrid
    from sharding.slide import SlideInfo

__all__ = ["PlanFailure", "SlidePlan", "opened_slide", "plan_slide"]


@dataclass(frozen=True)
class SlidePlan:
    """The kept regions of one slide (grid order) and its heatmap background."""

    sid: str
    path: str
    info: SlideInfo
    size0: int  # level-0 side of a region
    rows: int
    cols: int
    cells: np.ndarray  # (n,) row-major index of each kept region in the rows x cols grid
    xs: np.ndarray  # (n,) level-0 x of each kept region
    ys: np.ndarray
    tissue: np.ndarray  # (n,) tissue fraction of each kept region
    background: np.ndarray  # (h, w, 3) uint8, the whole slide, long side about heatmap_px
    seconds: float  # planning time (open, tissue mask, grid, background)

    @property
    def n_tiles(self) -> int:
        return int(self.cells.size)

    def light(self) -> SlidePlan:
        """This plan without its background: what the read stages need, small to ship."""
        return replace(self, background=np.zeros((0, 0, 3), np.uint8))

    def grid(self, positions: np.ndarray) -> RegionGrid:
        """The regions at ``positions`` (indices into the kept regions) as a region grid whose
        cells ``0..len(positions)-1`` are those regions, for
        :func:`resdistill.read_chain.read_tiles`."""
        from sharding.regions import RegionGrid

        pos = np.asarray(positions, dtype=np.int64)
        return RegionGrid(
            info=self.info, size0=self.size0, xs=self.xs[pos], ys=self.ys[pos],
            tissue=self.tissue[pos], keep=np.ones(pos.size, bool), mask=None,  # type: ignore[arg-type]
        )  # fmt: skip


@dataclass(frozen=True)
class PlanFailure:
    """A slide that cannot be predicted, with the one line that says why."""

    sid: str
    path: str
    message: str


@contextmanager
def opened_slide(path: str) -> Iterator[Any]:
    """The OpenSlide handle of ``path`` for the ``with`` block, closed after it; an ``s3://``
    slide through this node's cached copy, pinned (never evicted) until the block ends
    (:func:`sharding.remote_slides.pinned_copy`), its errors naming the URL the user gave, not
    the cache file."""
    from contextlib import nullcontext

    from sharding.remote_slides import is_s3, pinned_copy
    from sharding.slide import SlideError, open_slide

    with pinned_copy(path) if is_s3(path) else nullcontext(path) as local:
        try:
            slide = open_slide(local)
        except SlideError as exc:
            raise SlideError(str(exc).replace(local, path)) from None
        try:
            yield slide
        finally:
            slide.close()


def plan_slide(sid: str, path: str, chain: ReadChain, heatmap_px: int) -> SlidePlan | PlanFailure:
    """Plan ``path`` for ``chain`` (module docstring); never raises for a bad slide."""
    from resdistill.read_chain import plan_tiles
    from sharding.slide import SlideError

    t0 = time.perf_counter()
    try:
        with opened_slide(path) as slide:
            plan = plan_tiles(slide, path, chain)
            background = _background(slide, heatmap_px)
    except SlideError as exc:
        return PlanFailure(sid, path, str(exc))
    except Exception as exc:  # noqa: BLE001 - OpenSlide's own errors on a damaged file
        return PlanFailure(
            sid, path,
            f"{path}: reading the slide failed ({exc}); the file may be truncated or damaged: "
            "copy it again",
        )  # fmt: skip
    keep = np.flatnonzero(plan.keep)
    return SlidePlan(
        sid=sid, path=path, info=plan.info, size0=int(plan.size0), rows=plan.rows,
        cols=plan.cols, cells=keep, xs=plan.xs[keep].astype(np.int64),
        ys=plan.ys[keep].astype(np.int64), tissue=plan.tissue[keep].astype(np.float32),
        background=background, seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _background(slide: Any, heatmap_px: int) -> np.ndarray:
    """The whole slide as ``(h, w, 3)`` uint8 with its long side ``heatmap_px`` (OpenSlide's
    thumbnail keeps the aspect ratio); an empty ``(0, 0, 3)`` array for ``heatmap_px == 0`` (no
    pictures are drawn)."""
    if heatmap_px <= 0:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    img = slide.get_thumbnail((int(heatmap_px), int(heatmap_px))).convert("RGB")
    return np.asarray(img, dtype=np.uint8)
