"""The prediction engine: slides -> tile and slide probabilities, on Ray Data.

For each wave of at most :data:`WAVE_SLIDES` slides (the next wave is planned while one runs, so
the driver holds a bounded number of plans and heatmap backgrounds whatever the slide count):

1. plan every slide as a Ray task (:func:`resdistill.predict.slide_plan.plan_slide`); a slide
   that cannot be planned is reported at once;
2. one Ray Data dataset over chunks of kept regions (:func:`chunk_size`), each block holding
   chunks of one slide only (``from_arrow``), then either (``fused``, the CPU default) one
   stage, :class:`~resdistill.predict.stages.ReadScorer` in a pool of ``actors`` actors that
   read and score their chunks (every core on whatever the model needs, no tile sent between
   processes), or ``map_batches(read_chunks)`` on CPU tasks -> ``map_batches(Scorer)`` in a
   pool of ``actors`` actors, one GPU each on cuda; with the cascade two more stages
   (:func:`~resdistill.predict.stages.read_escalated` at the teacher's read chain, then the
   teacher's :class:`~resdistill.predict.stages.Scorer`);
3. the driver streams the rows back (``iter_batches``), fills each slide's tile probabilities and
   hands a slide to ``on_slide`` as soon as all its regions are in.

Every failure is bounded. A region that cannot be read is an error row of its slide
(:mod:`resdistill.predict.stages`). A read task whose worker process dies (OpenSlide crashing on a
damaged file, the kernel's OOM killer) is retried :data:`READ_RETRIES` times, not forever (Ray
Data's default, which hung the run on one such slide; a fused actor is restarted and its call
retried as many times); then its block is dropped
(``DataContext.max_errored_blocks``) and, since a block holds one slide's chunks, only that
slide fails: its regions never come back and it gets a status saying so. The run goes on.

The slide's probabilities are the mean of its tiles' (:func:`resdistill.cascade.rules.combine`
first with the cascade), its class their argmax.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resdistill.predict.slide_plan import PlanFailure, ReadPlans, SlidePlan, plan_slide
from resdistill.predict.stages import ReadScorer, Scorer, read_chunks, read_escalated
from resdistill.read_chain import ReadChain

__all__ = [
    "CHUNK_TILES", "READ_RETRIES", "WAVE_SLIDES", "Cascade", "EngineConfig", "SlideResult",
    "chunk_limit", "chunk_size", "run_engine",
]  # fmt: skip

#: A chunk (the regions of one slide read by one call) holds at most as many pixels as this many
#: tiles of 224 px: its tiles are held in memory at once (38 MB of RGB).
CHUNK_TILES = 256
#: Chunks a wave is cut into per reading process, at least, where its slides allow
#: (:func:`chunk_size`).
CHUNKS_PER_READER = 4
#: Retries of a read task whose worker process died, before its slide is given up (failed).
#: Ray's memory monitor kills follow Ray's own OOM policy, which fails a task rather than loop.
READ_RETRIES = 2
#: Blocks of a wave's dataset, about at most (each holds chunks of one slide only).
MAX_BLOCKS = 512
#: Bytes of memory a read task reserves: its worker holds torch (the decoder), OpenSlide and a chunk.
READ_TASK_MEMORY = 640 * 1024**2
#: Slides planned and run as one dataset; the next wave is planned meanwhile. Bounds the
#: driver's plans and heatmap backgrounds (at most ~6 MB each at 1600 px) whatever the run size.
WAVE_SLIDES = 128


@dataclass(frozen=True)
class Cascade:
    """The teacher's side of the cascade (:mod:`resdistill.cascade.rules`)."""

    checkpoint: str
    chain: ReadChain
    threshold: float


@dataclass(frozen=True)
class EngineConfig:
    checkpoint: str  # the student's (or the only model's) checkpoint URL
    chain: ReadChain
    classes: tuple[str, ...]
    device: str  # "cpu" or "cuda"
    actors: int
    actor_cpus: float  # CPUs each inference actor asks for
    batch_size: int
    heatmap_px: int
    cascade: Cascade | None = None
    fused: bool = False  # read and score in the same actors (module docstring)
    s3_reads: str = "copy"  # how s3:// slides are read (PredictConfig.s3_reads)
    chunk_tiles: int = CHUNK_TILES  # regions per read call, at most (chunk_size)
    readers: int = 1  # processes reading chunks at once: the fused actors, or the read tasks


@dataclass
class SlideResult:
    """One slide's outcome: ``plan`` and ``probs`` when ``error`` is empty."""

    sid: str
    path: str
    error: str = ""
    plan: SlidePlan | None = None
    probs: np.ndarray | None = None  # (n, K) final tile probabilities (the mix with the cascade)
    student: np.ndarray | None = None  # (n, K) the student's own, with the cascade
    escalated: np.ndarray | None = None  # (n,) bool, with the cascade
    seconds: float = 0.0  # planning + read + model time spent on the slide, all workers

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class _Slide:
    plan: SlidePlan
    probs: np.ndarray
    tprobs: np.ndarray
    esc: np.ndarray
    seconds: float
    received: int = 0
    errors: list[str] = field(default_factory=list)


def run_engine(
    slides: Mapping[str, str],
    cfg: EngineConfig,
    on_slide: Callable[[SlideResult], None],
    on_tiles: Callable[[int], None] | None = None,
    on_planned: Callable[[int], None] | None = None,
) -> None:
    """Predict ``slides`` (``{slide id: path}``) on the connected Ray (module docstring).

    ``on_planned(n_tiles)`` after each slide is planned, ``on_tiles(n)`` as rows arrive,
    ``on_slide(result)`` once per slide, failed or not."""
    import ray

    plan_task = ray.remote(num_cpus=1, max_retries=1)(plan_slide)
    items = list(slides.items())
    waves = [items[i : i + WAVE_SLIDES] for i in range(0, len(items), WAVE_SLIDES)]

    def submit(wave: list[tuple[str, str]]) -> dict[Any, tuple[str, str]]:
        return {
            plan_task.remote(sid, path, cfg.chain, cfg.heatmap_px, cfg.s3_reads): (sid, path)
            for sid, path in wave
        }

    pending = submit(waves[0]) if waves else {}
    for k in range(len(waves)):
        plans: dict[str, SlidePlan] = {}
        for ref in _as_completed(ray, list(pending)):
            try:
                plan = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died (e.g. OpenSlide crashed)
                sid, path = pending[ref]
                plan = PlanFailure(
                    sid, path, f"{path}: planning the slide failed ({type(exc).__name__})"
                )
            if isinstance(plan, PlanFailure):
                on_slide(SlideResult(plan.sid, plan.path, plan.message))
            else:
                plans[plan.sid] = plan
                if on_planned is not None:
                    on_planned(plan.n_tiles)
        pending = submit(waves[k + 1]) if k + 1 < len(waves) else {}
        if plans:
            for result in _run_wave(plans, cfg, on_tiles):
                on_slide(result)


def _as_completed(ray: Any, refs: list[Any]) -> Iterator[Any]:
    while refs:
        done, refs = ray.wait(refs, num_returns=1)
        yield from done


def chunk_size(total: int, most: int, readers: int, least: int) -> int:
    """Regions per chunk of a wave of ``total`` regions: ``ceil(total / (readers x``
    :data:`CHUNKS_PER_READER` ``))`` within ``[least, most]``. Every chunk costs a call and a
    result block's bookkeeping, so few large chunks beat many small ones once every reading
    process has several to take (a wave of a few slides is still spread over all of them);
    ``most`` bounds the tiles held at once, ``least`` is a model call's batch."""
    spread = -(-total // max(1, readers * CHUNKS_PER_READER))
    return max(1, least, min(most, spread))


def chunk_limit(tile_px: int, batch: int) -> int:
    """The most regions of ``tile_px`` in a chunk: as many pixels as :data:`CHUNK_TILES` tiles
    of 224 px, and at least one model call's ``batch``."""
    return max(batch, CHUNK_TILES * 224 * 224 // (tile_px * tile_px))


def _blocks(plans: Mapping[str, SlidePlan], cfg: EngineConfig) -> list[Any]:
    """The wave's chunks ``{slide, start, stop}`` as Arrow tables (:func:`chunk_size`; a slide's
    regions in chunks of equal size, give or take one), every block holding chunks of one slide
    only (so a block given up fails one slide, never its neighbours), about :data:`MAX_BLOCKS`
    blocks at most."""
    import pyarrow as pa

    size = chunk_size(
        sum(p.n_tiles for p in plans.values()), cfg.chunk_tiles, cfg.readers, cfg.batch_size
    )
    bounds = {}
    for sid, p in plans.items():
        edges = np.linspace(0, p.n_tiles, -(-p.n_tiles // size) + 1).round().astype(np.int64)
        bounds[sid] = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    per_block = max(1, -(-sum(len(b) for b in bounds.values()) // MAX_BLOCKS))
    blocks = []
    for sid, chunks in bounds.items():
        for i in range(0, len(chunks), per_block):
            group = chunks[i : i + per_block]
            blocks.append(
                pa.table(
                    {
                        "slide": pa.array([sid] * len(group), pa.string()),
                        "start": pa.array([a for a, _ in group], pa.int64()),
                        "stop": pa.array([b for _, b in group], pa.int64()),
                    }
                )  # fmt: skip
            )
    return blocks


def _dataset(plans: Mapping[str, SlidePlan], cfg: EngineConfig) -> Any:
    """The Ray Data pipeline of one wave (steps 2 of the module docstring)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the command shows its own progress
    ctx.print_on_execution_start = False
    light = ReadPlans(plans)
    # Read tasks reserve memory for OpenSlide's caches and a chunk of regions; asking for it
    # also keeps Ray Data from fusing reading into the inference actors (other resources).
    # Ray 2.60 names no parameter for a task's retries: ``max_retries`` goes as a remote arg
    # (deprecated there, without a replacement yet).
    read = {
        "batch_format": "numpy", "num_cpus": 1, "memory": READ_TASK_MEMORY,
        "max_retries": READ_RETRIES,
    }  # fmt: skip
    ds = ray.data.from_arrow(_blocks(plans, cfg))
    if cfg.fused:
        ds = ds.map_batches(
            ReadScorer, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.actor_cpus,
            fn_constructor_kwargs={
                "checkpoint": cfg.checkpoint, "device": cfg.device, "plans": light,
                "chain": cfg.chain, "batch_size": cfg.batch_size,
            },
            max_restarts=-1, max_task_retries=READ_RETRIES,
        )  # fmt: skip
    else:
        ds = ds.map_batches(
            read_chunks, batch_size=1, fn_kwargs={"plans": light, "chain": cfg.chain}, **read
        )
        ds = ds.map_batches(Scorer, **_actors(cfg, checkpoint=cfg.checkpoint))
    if cfg.cascade is not None:
        c = cfg.cascade
        ds = ds.map_batches(
            read_escalated, batch_size=cfg.batch_size,
            fn_kwargs={"plans": light, "chain": c.chain, "threshold": c.threshold}, **read,
        )  # fmt: skip
        ds = ds.map_batches(
            Scorer,
            **_actors(cfg, checkpoint=c.checkpoint, tiles="ttile", probs="tprobs", only="esc"),
        )
    return ds


def _actors(cfg: EngineConfig, **scorer: Any) -> dict[str, Any]:
    """``map_batches`` arguments of an inference stage: a pool of ``cfg.actors``
    :class:`~resdistill.predict.stages.Scorer` actors, one GPU each on cuda."""
    import ray

    return {
        "batch_size": cfg.batch_size, "batch_format": "numpy",
        "compute": ray.data.ActorPoolStrategy(size=cfg.actors),
        "fn_constructor_kwargs": {"device": cfg.device, **scorer},
        "num_cpus": cfg.actor_cpus, "num_gpus": 1 if cfg.device == "cuda" else None,
    }  # fmt: skip


def _run_wave(
    plans: Mapping[str, SlidePlan], cfg: EngineConfig, on_tiles: Callable[[int], None] | None
) -> Iterator[SlideResult]:
    k = len(cfg.classes)
    state = {
        sid: _Slide(
            plan=p,
            probs=np.zeros((p.n_tiles, k)),
            tprobs=np.zeros((p.n_tiles, k)),
            esc=np.zeros(p.n_tiles, bool),
            seconds=p.seconds,
        )  # fmt: skip
        for sid, p in plans.items()
    }
    with _give_up_lost_blocks():
        for batch in _dataset(plans, cfg).iter_batches(batch_format="numpy", batch_size=None):
            for sid in np.unique(batch["slide"]):
                s = state[str(sid)]
                rows = batch["slide"] == sid
                _fill(s, {k: v[rows] for k, v in batch.items()}, cascade=cfg.cascade is not None)
                if s.received >= s.plan.n_tiles:
                    yield _result(state.pop(str(sid)), cfg)
            if on_tiles is not None:
                on_tiles(int(batch["n"].sum()))
    for s in state.values():  # blocks given up (module docstring): never report them as done
        s.errors.append(
            f"{s.plan.path}: {s.plan.n_tiles - s.received} of its {s.plan.n_tiles} regions never "
            f"came back: the worker process reading them died {READ_RETRIES + 1} times (OpenSlide "
            "crashing on a damaged file, or out of memory): check the file, or give the workers "
            "more memory"
        )
        yield _result(s, cfg)


@contextmanager
def _give_up_lost_blocks() -> Iterator[None]:
    """Datasets created in the block skip blocks whose tasks failed past their retries instead
    of ending (``DataContext.max_errored_blocks``, captured by a dataset when it is created);
    meanwhile Ray Data's log line for such a block stays one line (the exception's type, no
    traceback): the slide's status says what happened."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.max_errored_blocks
    ctx.max_errored_blocks = -1
    log, one_line = logging.getLogger(_EXECUTOR_LOGGER), _OneLine()
    log.addFilter(one_line)
    try:
        yield
    finally:
        ctx.max_errored_blocks = before
        log.removeFilter(one_line)


#: The logger of Ray Data's executor, which reports the blocks it gives up.
_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor_state"


class _OneLine(logging.Filter):
    """Ray Data's "Ignoring this exception" records without their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "Ignoring this exception" in str(record.msg):
            kind = record.exc_info[1].__class__.__name__ if record.exc_info[1] else "error"
            record.msg = f"{record.getMessage()} ({kind})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _fill(s: _Slide, rows: Mapping[str, np.ndarray], *, cascade: bool) -> None:
    s.received += int(rows["n"].sum())
    s.seconds += float(rows["seconds"].sum())
    bad = rows["error"] != ""
    s.errors.extend(str(e) for e in rows["error"][bad])
    pos = rows["pos"][~bad]
    s.probs[pos] = rows["probs"][~bad]
    if cascade:
        s.esc[pos] = rows["esc"][~bad]
        s.tprobs[pos] = rows["tprobs"][~bad]


def _result(s: _Slide, cfg: EngineConfig) -> SlideResult:
    from resdistill.cascade.rules import combine

    p = s.plan
    if s.errors:
        return SlideResult(p.sid, p.path, s.errors[0], plan=p, seconds=s.seconds)
    if cfg.cascade is None:
        return SlideResult(p.sid, p.path, plan=p, probs=s.probs, seconds=s.seconds)
    mixed = combine(s.probs, s.tprobs, s.esc)
    return SlideResult(
        p.sid, p.path, plan=p, probs=mixed, student=s.probs, escalated=s.esc, seconds=s.seconds
    )
