"""How ``predict`` turns a slide into a model's input tiles (and what ``export`` records of it): the
read chain of the dataset the model was trained on, replayed with the sharding code itself, or the
cheap native read.

A checkpoint's ``read_chain`` (:data:`resdistill.checkpoint.READ_CHAIN_KEYS` of its dataset.json:
magnifications, tile sizes, how lower magnifications were cut (``low_mags_from``), image format,
JPEG quality, ``min_tissue``) says how its training tiles were made, and :func:`chain_of` turns it
back into the sharding settings (:class:`sharding.options.ShardOptions`). Then, as sharding does:

1. :func:`plan_tiles`: the regions of the slide at the *top* magnification of the dataset, those
   with a tissue fraction ``>= min_tissue`` kept (:func:`sharding.regions.plan_regions`, the one
   tiling plan), plus the thumbnail the heatmap is drawn on; the same grid for both read modes;
2. :func:`read_tiles`: each region's pixels at the model's magnification, by the read mode
   (:data:`READ_MODES`), from :func:`sharding.extract.region_images`:

   * ``as-trained`` (default): the pixels of the model's shards. For a dataset cut with
     ``--low-mags-from top`` (and every dataset.json that does not record it), the region read
     once at the top magnification from the best pyramid level
     (:func:`sharding.slide.read_region_at`) and reduced to the model's magnification
     (:func:`sharding.slide.downsample`: a box average for whole factors); for one cut
     ``--low-mags-from native``, the ``native`` read below;
   * ``native``: the region read at the model's magnification directly, from the slide's best
     pyramid level at or above it, then reduced to the tile size
     (:func:`sharding.slide.read_region_at` at ``tile_px``): a fraction of the pixels of the top
     read when the slide has a level near the model's magnification. For a model at the dataset's
     top magnification both modes give the same pixels.

   Then encoded as the shards are (:func:`sharding.extract.encode`: format and quality) and
   decoded as the loader decodes it (:func:`resdistill.data.decode_image`), in both modes: only the
   source pixels differ. With ``as-trained`` the model sees the very pixels of its shards.
3. a timm backbone (a foundation-model teacher) then maps each tile onto its own input inside
   the model (renormalised, resized to its input edge: :mod:`resdistill.backbones.geometry`);
   the checkpoint's read chain records that step as ``model_input`` and :meth:`ReadChain.to_json`
   reports it.

A checkpoint without a read chain (written before checkpoints recorded one) is read as before:
regions planned at the model's own magnification and tile size, read from the best pyramid level
at or above it and reduced (both modes alike), not encoded, ``min_tissue``
:data:`DEFAULT_MIN_TISSUE` unless given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from resdistill.checkpoint import CheckpointError, LoadedModel
from resdistill.errors import UsageError
from sharding.magnification import display_mag
from sharding.regions import RegionGrid

if TYPE_CHECKING:
    from sharding.options import ShardOptions

__all__ = [
    "DEFAULT_MIN_TISSUE",
    "READ_MODES",
    "ReadChain",
    "TilePlan",
    "chain_of",
    "plan_tiles",
    "read_tiles",
]

#: ``--read`` choices: ``as-trained`` replays the dataset's read chain (the pixels the model was
#: trained on); ``native`` reads the model's magnification from the best pyramid level at or above
#: it (the cheap read).
READ_MODES = ("as-trained", "native")

DEFAULT_MIN_TISSUE = 0.5
#: JPEG quality assumed for a read chain from a dataset.json that did not record it (the
#: sharding default, which every dataset of that time used unless --quality was given).
DEFAULT_QUALITY = 90


@dataclass(frozen=True)
class ReadChain:
    """The settings that make a model's input tile from a slide region (module docstring)."""

    opts: ShardOptions  # top magnification first, tile sizes, format, quality, min_tissue
    mag: str  # the model's magnification name, one of opts.mags
    source: str  # "checkpoint" (the dataset's read chain) or "pyramid" (no read chain recorded)
    notes: tuple[str, ...] = ()  # one line each, for the user (said once per run)
    read: str = "as-trained"  # one of READ_MODES
    #: how a timm backbone maps the tile to its input (resdistill.backbones.geometry), or None
    model_input: dict[str, Any] | None = None

    @property
    def tile_px(self) -> int:
        return int(self.opts.sizes[self.mag])

    @property
    def encoded(self) -> bool:
        """Whether tiles go through the dataset's image encoding (not for old checkpoints)."""
        return self.source == "checkpoint"

    @property
    def pixels_from(self) -> str:
        """How the model's magnification is cut (:data:`sharding.options.LOW_MAGS_FROM`):
        ``native`` for the ``native`` read, the dataset's ``low_mags_from`` for ``as-trained``."""
        return "native" if self.read == "native" else self.opts.low_mags_from

    def to_json(self) -> dict[str, Any]:
        """The chain as predict records it: ``read`` the mode, ``pixels_from`` what it read
        (``top``: the top magnification reduced; ``native``: the model's own magnification)."""
        o = self.opts
        out: dict[str, Any] = {
            "source": self.source,
            "read": self.read,
            "pixels_from": self.pixels_from,
            "magnifications": [m.name for m in o.mags],
            "tile_px": dict(o.sizes),
            "min_tissue": o.min_tissue,
        }
        if self.encoded:
            out.update(image_format=o.fmt, quality=o.quality, low_mags_from=o.low_mags_from)
        if self.model_input:
            out["model_input"] = dict(self.model_input)
        return out


@dataclass(frozen=True)
class TilePlan(RegionGrid):
    """The sharding planner's region grid of one slide, with the thumbnail the heatmap is drawn
    on."""

    thumbnail: np.ndarray  # (th, tw, 3) uint8
    thumb_scale: float  # level-0 pixels per thumbnail pixel (x)


def tile_px_of(model: LoadedModel) -> int:
    """The tile size ``model`` was trained on; :class:`CheckpointError` when its card lacks it
    (a slide cannot be tiled without it)."""
    if not model.tile_px:
        raise CheckpointError(
            f"{model.url}: the checkpoint does not record tile_px, needed to tile a slide"
        )
    return int(model.tile_px)


def chain_of(
    model: LoadedModel,
    *,
    min_tissue: float | None = None,
    mpp: float | None = None,
    read: str = "as-trained",
) -> ReadChain:
    """The read chain to predict with ``model``: its checkpoint's, else the pyramid read.

    ``min_tissue`` overrides the chain's; ``mpp`` is the base mpp for slides that record none
    (:class:`UsageError` when either is out of range). :class:`CheckpointError` for a card
    without ``tile_px`` or a read chain that cannot have made the model's tiles (its
    magnification missing, another tile size).
    """
    from sharding.magnification import Magnification
    from sharding.options import ShardOptions

    if min_tissue is not None and not 0.0 <= min_tissue <= 1.0:
        raise UsageError(f"--min-tissue must be within 0..1, got {min_tissue}")
    if mpp is not None and not mpp > 0:
        raise UsageError(f"--mpp must be positive, got {mpp}")
    if read not in READ_MODES:
        raise UsageError(f"--read must be one of {', '.join(READ_MODES)}, got {read!r}")
    px = tile_px_of(model)
    recorded = dict(model.card.read_chain or {})
    notes: list[str] = []
    try:
        if not recorded.get("magnifications"):
            opts = ShardOptions.make(
                [Magnification.parse(model.mag)], px,
                min_tissue=DEFAULT_MIN_TISSUE if min_tissue is None else min_tissue,
                mpp_override=mpp,
            )  # fmt: skip
            notes.append(
                f"{model.url}: the checkpoint records no read chain (written before checkpoints "
                f"did): tiles are read from the slide's pyramid at {display_mag(model.mag)}, not encoded, "
                f"min_tissue {opts.min_tissue:g}"
            )
            return ReadChain(opts, model.mag, "pyramid", tuple(notes), read)
        mags = [Magnification.parse(m) for m in recorded["magnifications"]]
        quality = recorded.get("quality")
        if recorded.get("image_format", "jpeg") == "jpeg" and quality is None:
            notes.append(
                f"{model.url}: the read chain does not record the JPEG quality (a dataset "
                f"sharded before it was recorded): assuming the default {DEFAULT_QUALITY}"
            )
        opts = ShardOptions.make(
            mags,
            int(recorded["tile_px"][mags[0].name]),
            str(recorded.get("image_format", "jpeg")),
            int(quality or DEFAULT_QUALITY),
            float(recorded.get("min_tissue", DEFAULT_MIN_TISSUE))
            if min_tissue is None
            else min_tissue,
            mpp,
            str(recorded.get("low_mags_from", "top")),  # datasets before the option: top
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{model.url}: unusable read chain {recorded} ({exc})") from None
    if opts.sizes.get(model.mag) != px:
        raise CheckpointError(
            f"{model.url}: the read chain has {opts.sizes.get(model.mag)} px tiles at {model.mag} "
            f"but the model was trained on {px} px: the checkpoint is inconsistent"
        )
    geometry = recorded.get("model_input")
    return ReadChain(opts, model.mag, "checkpoint", tuple(notes), read,
                     dict(geometry) if geometry else None)  # fmt: skip


def plan_tiles(slide: Any, path: str, chain: ReadChain) -> TilePlan:
    """Step 1 of the module docstring for an open OpenSlide ``slide``: the sharding planner's
    :class:`sharding.regions.RegionGrid` with the slide's thumbnail.

    Raises :class:`sharding.slide.SlideError` (one line) for a slide without mpp, a magnification
    above the slide's, a slide smaller than one region, or a slide without tissue.
    """
    from sharding.regions import plan_regions

    found = plan_regions(slide, path, chain.opts)
    # the heatmap is drawn on the thumbnail the tissue detector saw (one thumbnail read)
    thumb, scale = found.mask.thumb, found.mask.scale
    return TilePlan(
        **{f.name: getattr(found, f.name) for f in fields(found)},
        thumbnail=thumb,
        thumb_scale=float(scale),
    )


def read_tiles(slide: Any, plan: TilePlan, chain: ReadChain, cells: Sequence[int]) -> np.ndarray:
    """Step 2 of the module docstring: the model's input tiles of grid ``cells`` of ``plan`` by
    ``chain.read``, as ``(len(cells), tile_px, tile_px, 3)`` uint8 RGB.
    :class:`sharding.slide.SlideError` when a region cannot be read."""
    from resdistill.data import decode_image
    from sharding.extract import encode, region_images

    opts = replace(chain.opts, low_mags_from=chain.pixels_from)
    out = np.empty((len(cells), chain.tile_px, chain.tile_px, 3), dtype=np.uint8)
    for n, i in enumerate(cells):
        x, y = int(plan.xs[i]), int(plan.ys[i])
        img = region_images(slide, plan.info, x, y, plan.size0, opts, [chain.mag])[chain.mag]
        if chain.encoded:
            out[n] = decode_image(encode(img, opts)).permute(1, 2, 0).numpy()
        else:
            out[n] = np.asarray(img, dtype=np.uint8)
    return out
