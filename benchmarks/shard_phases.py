"""Where ``run_shard``'s time goes, measured: each phase is the wall time spent inside the
functions that do it, timed by wrapping them (exclusive time: a phase's function called inside
another's counts for its own phase only), and ``other`` is what no phase covers.

The wrappers cost about a microsecond a call (a few thousand calls a run), so the split is taken
in a run of its own, never in the run whose time a benchmark row reports.

Phases and the functions that are them:

* ``decode``: OpenSlide's ``read_region`` and the RGBA -> RGB conversion of a region;
* ``thumb``: the same reads made while detecting tissue (the thumbnail's decode);
* ``tissue``: the rest of tissue detection (mask, ink), ``qc``: the slide's QC picture;
* ``resample``: reducing a region to the lower magnifications, ``encode``: the tile encoder,
  ``stats``: the per-tile means the manifest keeps;
* ``tar``: the shard writer's tar, ``manifest``: index fragments, reconciling the output, the
  manifest and dataset.json (building their bytes);
* ``store``: the output's durable writes (temp file, fsync, rename): shards, fragments, slide
  records, QC pictures, manifest (the local backend's, which the benchmarks use).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

#: phase -> the "module:attribute" (or "module:Class.method") whose calls are that phase.
PHASE_TARGETS: dict[str, tuple[str, ...]] = {
    "decode": ("openslide:OpenSlide.read_region", "sharding.slide:rgb_image"),
    "tissue": ("sharding.regions:detect_tissue",),
    "qc": ("sharding.extract:qc_png",),
    "resample": ("sharding.slide:downsample", "sharding.extract:downsample"),
    "encode": ("sharding.extract:encode",),
    "stats": ("sharding.extract:channel_stats",),
    "tar": ("sharding.shardwriter:ShardWriter._write", "sharding.shardwriter:ShardWriter._publish"),
    "manifest": (
        "sharding.shardwriter:rows_to_parquet",
        "sharding.pipeline:reconcile",
        "sharding.pipeline:combine",
        "sharding.pipeline:manifest_bytes",
        "sharding.pipeline:dataset_description",
    ),
    "store": (
        "sharding.storage.local:LocalStorage.write_bytes",
        "sharding.storage.local:LocalStorage.put_file",
        "sharding.storage.local:LocalStorage.create_exclusive",
    ),
}
#: A phase called inside another is renamed: a read made by tissue detection is the thumbnail's.
RENAMED = {("tissue", "decode"): "thumb"}
ORDER = (
    "decode", "encode", "thumb", "tissue", "qc", "resample", "stats", "tar", "manifest", "store",
)  # fmt: skip


class PhaseClock:
    """Exclusive wall time per phase of the wrapped calls (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [phase, seconds spent in nested wrapped calls]

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = self._stack[-1][0] if self._stack else None
            name = RENAMED.get((outer, phase), outer if outer == "thumb" else phase)
            self._stack.append([name, 0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                _, nested = self._stack.pop()
                self.seconds[name] += spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        return timed


@contextlib.contextmanager
def phase_clock() -> Iterator[PhaseClock]:
    """Wrap every function of :data:`PHASE_TARGETS` for the ``with`` block, then restore them.
    A target that no longer exists raises (a renamed function must not silently drop out)."""
    clock = PhaseClock()
    undo: list[tuple[Any, str, Any]] = []
    try:
        for phase, targets in PHASE_TARGETS.items():
            for target in targets:
                module, _, attr = target.partition(":")
                owner: Any = importlib.import_module(module)
                *path, name = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
                original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                undo.append((owner, name, original))
                setattr(owner, name, clock.wrap(phase, original))
        yield clock
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def split_note(seconds: dict[str, float], total: float) -> str:
    """``decode 41% encode 22% ... other 5%`` of ``total`` seconds, phases in :data:`ORDER`."""
    parts = [f"{p} {100 * seconds.get(p, 0.0) / total:.0f}%" for p in ORDER]
    other = total - sum(seconds.values())
    return " ".join([*parts, f"other {100 * other / total:.0f}%"])
