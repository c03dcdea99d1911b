"""Per-slide planning, the first stage of prediction: which regions to score, and the picture
the heatmaps are drawn on.

:func:`plan_slide` opens a slide (an ``s3://`` slide through the node's cached local copy,
pinned while it is open: :func:`opened_slide`), runs the sharding planner through
:func:`resdistill.read_chain.plan_tiles` (the grid of regions at the read chain's top
magnification, the regions with enough tissue kept) and makes the background image of the whole
slide the heatmaps are drawn on: exactly ``slide.get_thumbnail((heatmap_px, heatmap_px))``, from
the pixels the tissue detector read when it read the pyramid level the thumbnail is made from
(:class:`_LevelKeeper`; the usual case at scan sizes: one pass over the slide), else read again.
It never raises: a slide that cannot be planned (unreadable, truncated, without tissue) gives a
:class:`PlanFailure` with the one line the user reads, so one bad slide never ends a run of ten
thousand.

A :class:`SlidePlan` holds only the kept regions; :meth:`SlidePlan.grid` hands any run of them to
:func:`resdistill.read_chain.read_tiles`, the one place tiles are read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from resdistill.read_chain import ReadChain
    from sharding.regions import RegionGrid
    from sharding.slide import SlideInfo

__all__ = ["PlanFailure", "ReadPlans", "SlidePlan", "opened_slide", "plan_slide"]


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
    version: str = ""  # the bytes planned (resdistill.predict.slide_handles.slide_version)
    opened: str = "local"  # how the slide is read: local, copy or ranges (an s3:// slide)

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


class ReadPlans:
    """The light plans (:meth:`SlidePlan.light`) of a wave's slides, by slide id, as the read
    stages receive them. Deliberately not a ``Mapping`` nor a dataclass: Ray Data describes
    every stage's arguments for its dashboard when a dataset starts, recursing into mappings
    and dataclasses and printing each numpy array in full (every region's coordinates, in the
    driver, for every slide of a wave); this object it prints as its one-line ``repr``."""

    def __init__(self, plans: Mapping[str, SlidePlan]) -> None:
        self._plans = {sid: p.light() for sid, p in plans.items()}

    def __getitem__(self, sid: str) -> SlidePlan:
        return self._plans[sid]

    def __len__(self) -> int:
        return len(self._plans)

    def __repr__(self) -> str:
        return f"ReadPlans({len(self._plans)} slides)"


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
    with _opened(path) as (slide, _, _):
        yield slide


@contextmanager
def _opened(path: str, s3_reads: str = "copy") -> Iterator[tuple[Any, str, str]]:
    """:func:`opened_slide`, the local file it opened and how: ``local``, ``copy``, or
    ``ranges`` (an ``s3://`` slide with ``s3_reads="ranges"`` that can be read by ranges,
    :func:`sharding.slide_ranges.open_ranged`; one that cannot is copied)."""
    from contextlib import nullcontext

    from sharding.remote_slides import is_s3, pinned_copy
    from sharding.slide import SlideError, open_slide
    from sharding.slide_ranges import open_ranged, rangeable

    if is_s3(path) and s3_reads == "ranges" and rangeable(path):
        try:
            ranged = open_ranged(path)
        except SlideError:
            pass  # not a tiled JPEG TIFF: copied whole below
        else:
            try:
                yield ranged, ranged.path, "ranges"
            finally:
                ranged.close()
            return
    how = "copy" if is_s3(path) else "local"
    with pinned_copy(path) if is_s3(path) else nullcontext(path) as local:
        try:
            slide = open_slide(local)
        except SlideError as exc:
            raise SlideError(str(exc).replace(local, path)) from None
        try:
            yield slide, local, how
        finally:
            slide.close()


def plan_slide(
    sid: str, path: str, chain: ReadChain, heatmap_px: int, s3_reads: str = "copy"
) -> SlidePlan | PlanFailure:
    """Plan ``path`` for ``chain`` (module docstring), an ``s3://`` slide read as ``s3_reads``
    says (:func:`_opened`); never raises for a bad slide."""
    from resdistill.predict.slide_handles import slide_version
    from resdistill.read_chain import plan_tiles
    from sharding.slide import SlideError

    t0 = time.perf_counter()
    try:
        with _opened(path, s3_reads) as (slide, local, how):
            keeper = _LevelKeeper(slide, heatmap_px)
            plan = plan_tiles(keeper, path, chain)
            background = keeper.background()
            version = slide_version(path, local)
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
        background=background, seconds=time.perf_counter() - t0, version=version, opened=how,
    )  # fmt: skip


class _LevelKeeper:
    """An open slide whose reads of the pyramid level ``slide.get_thumbnail((px, px))`` is made
    from are also pasted into a picture of that level, when that level's downsample is a whole
    number (so a read at level-0 ``(x, y)`` is the level's pixels from ``(x / ds, y / ds)``,
    exactly). The tissue detector reads its level whole, block by block: when that is the
    thumbnail's level, :meth:`background` is the thumbnail made from the kept pixels (the same
    steps as OpenSlide's ``get_thumbnail``: each region over the slide's background colour by its
    alpha, then Lanczos: the same pixels) instead of a second read."""

    def __init__(self, slide: Any, heatmap_px: int) -> None:
        self._slide = slide
        self._px = int(heatmap_px)
        self._level = -1
        self._canvas: Any = None
        self._covered = 0
        if heatmap_px > 0:
            down = max(d / heatmap_px for d in slide.dimensions)
            level = slide.get_best_level_for_downsample(down)
            if float(slide.level_downsamples[level]).is_integer():
                from openslide import PROPERTY_NAME_BACKGROUND_COLOR

                self._level = level
                self._colour = "#" + slide.properties.get(PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
                prefetch = getattr(slide, "prefetch", None)  # a slide read by byte ranges:
                if prefetch is not None:  # the level the tissue detector reads, in one go
                    prefetch(level, [((0, 0), slide.level_dimensions[level])])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slide, name)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        region = self._slide.read_region(location, level, size)
        if level == self._level:
            from PIL import Image

            ds = int(self._slide.level_downsamples[level])
            x, y = location
            if x % ds == 0 and y % ds == 0:
                if self._canvas is None:  # OpenSlide's background colour, each region over it
                    dims = self._slide.level_dimensions[level]
                    self._canvas = Image.new("RGB", dims, self._colour)
                self._canvas.paste(region, (x // ds, y // ds), region)
                self._covered += size[0] * size[1]
        return region

    def background(self) -> np.ndarray:
        """The slide picture (:func:`_background`), from the kept level when it was read whole."""
        if self._px <= 0:
            return np.zeros((0, 0, 3), dtype=np.uint8)
        w, h = self._slide.level_dimensions[self._level] if self._level >= 0 else (0, 0)
        if self._canvas is None or self._covered != w * h:
            return _background(self._slide, self._px)
        from PIL import Image

        thumb, self._canvas = self._canvas, None  # composited as read: resized in place
        thumb.thumbnail((self._px, self._px), Image.Resampling.LANCZOS)
        return np.asarray(thumb, dtype=np.uint8)


def _background(slide: Any, heatmap_px: int) -> np.ndarray:
    """The whole slide as ``(h, w, 3)`` uint8 with its long side ``heatmap_px`` (OpenSlide's
    thumbnail keeps the aspect ratio); an empty ``(0, 0, 3)`` array for ``heatmap_px == 0`` (no
    pictures are drawn)."""
    if heatmap_px <= 0:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    img = slide.get_thumbnail((int(heatmap_px), int(heatmap_px))).convert("RGB")
    return np.asarray(img, dtype=np.uint8)
