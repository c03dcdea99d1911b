"""The Ray Data stages of prediction: read and decode on CPU tasks, score in actors.

Rows flow as numpy batches with these columns:

* ``slide`` (str), ``pos`` (index into the slide's kept regions, :class:`SlidePlan`), ``n`` (how
  many regions the row stands for: 1, or a whole chunk for an error row), ``error`` (``""``, or
  the one line saying why the regions could not be read), ``seconds`` (worker time spent on the
  row so far);
* ``tile`` (uint8 ``(px, px, 3)``) from :func:`read_chunks` until :class:`Scorer` replaces it with
  ``probs`` (``(K,)`` float32);
* with the cascade, ``esc`` (bool) and ``ttile`` from :func:`read_escalated`, and ``tprobs`` from
  the teacher's :class:`Scorer`.

A read failure never raises inside a stage (that would end the whole dataset): the rows become
error rows of their slide, which the driver reports as that slide's status. A read that kills its
worker process (OpenSlide crashing, the kernel's OOM killer) cannot be caught here: the engine
bounds its retries instead (:data:`resdistill.predict.engine.READ_RETRIES`).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from resdistill.predict.slide_plan import ReadPlans, SlidePlan
    from resdistill.read_chain import ReadChain

Batch = dict[str, np.ndarray]

__all__ = ["TEST_CRASH_ENV", "ReadScorer", "Scorer", "read_chunks", "read_escalated"]

#: Test-only (never set it otherwise): ``RESDISTILL_TEST_CRASH_READ=<file name>`` makes every
#: read of regions of the slide with that file name end its worker process at once
#: (``os._exit(70)``), as an OpenSlide crash or the kernel's OOM killer would; planning is not
#: affected. ``tests/test_predict_bounded.py`` uses it to check that such a slide fails alone.
TEST_CRASH_ENV = "RESDISTILL_TEST_CRASH_READ"


def _test_crash_hook(path: str) -> None:
    name = os.environ.get(TEST_CRASH_ENV)
    if name and path.rsplit("/", 1)[-1] == name:
        os._exit(70)


def _read(plan: SlidePlan, chain: ReadChain, positions: np.ndarray) -> np.ndarray:
    """Tiles of the kept regions ``positions`` of ``plan`` read through ``chain``: the read
    chain's pixels (:func:`resdistill.predict.tile_reads.read_regions`) from the slide this
    process keeps open (:func:`resdistill.predict.slide_handles.held_slide`)."""
    from resdistill.predict.slide_handles import held_slide
    from resdistill.predict.tile_reads import read_regions

    _test_crash_hook(plan.path)
    with held_slide(plan.path, plan.version, plan.opened) as slide:
        return read_regions(slide, plan.grid(positions), chain, np.arange(len(positions)))  # type: ignore[arg-type]


def _failure(plan: SlidePlan, exc: Exception) -> str:
    from sharding.slide import SlideError

    return str(exc) if isinstance(exc, SlideError) else f"{plan.path}: reading failed ({exc})"


def read_chunks(batch: Batch, *, plans: ReadPlans, chain: ReadChain) -> Batch:
    """Chunks ``{slide, start, stop}`` of kept regions -> one row per tile, or one error row
    (``n = stop - start``) per chunk that cannot be read."""
    out: dict[str, list[Any]] = {k: [] for k in ("slide", "pos", "n", "error", "seconds", "tile")}
    blank = np.zeros((chain.tile_px, chain.tile_px, 3), np.uint8)
    for sid, start, stop in zip(batch["slide"], batch["start"], batch["stop"], strict=True):
        plan = plans[str(sid)]
        positions = np.arange(int(start), int(stop))
        t0 = time.perf_counter()
        try:
            tiles = _read(plan, chain, positions)
        except Exception as exc:  # noqa: BLE001 - becomes the slide's status, never the run's end
            rows = [(int(start), int(stop) - int(start), _failure(plan, exc), blank)]
        else:
            rows = [(int(p), 1, "", t) for p, t in zip(positions, tiles, strict=True)]
        each = (time.perf_counter() - t0) / len(rows)
        for pos, n, error, tile in rows:
            for key, value in zip(out, (str(sid), pos, n, error, each, tile), strict=True):
                out[key].append(value)
    return {
        "slide": np.array(out["slide"], dtype=object), "pos": np.array(out["pos"], np.int64),
        "n": np.array(out["n"], np.int64), "error": np.array(out["error"], dtype=object),
        "seconds": np.array(out["seconds"], np.float64), "tile": np.stack(out["tile"]),
    }  # fmt: skip


def read_escalated(batch: Batch, *, plans: ReadPlans, chain: ReadChain, threshold: float) -> Batch:
    """Marks the rows the cascade escalates (``esc``: the student's top probability under
    ``threshold``, :func:`resdistill.cascade.rules.escalate`) and reads their regions through the
    teacher's ``chain`` into ``ttile`` (zeros for the other rows)."""
    from resdistill.cascade.rules import escalate

    n = len(batch["slide"])
    ok = batch["error"] == ""
    esc = escalate(batch["probs"], threshold) & ok
    ttile = np.zeros((n, chain.tile_px, chain.tile_px, 3), np.uint8)
    error = batch["error"].copy()
    seconds = batch["seconds"].copy()
    for sid in {str(s) for s in batch["slide"][esc]}:
        rows = np.flatnonzero(esc & (batch["slide"] == sid))
        t0 = time.perf_counter()
        try:
            ttile[rows] = _read(plans[sid], chain, batch["pos"][rows])
        except Exception as exc:  # noqa: BLE001 - becomes the slide's status
            error[rows] = _failure(plans[sid], exc)
        seconds[rows] += (time.perf_counter() - t0) / rows.size
    return {**batch, "esc": esc, "ttile": ttile, "error": error, "seconds": seconds}


class Scorer:
    """An inference actor: ``p = softmax(model((stain(tile / 255) - mean) / std))``, ``stain``
    the checkpoint's stain normalisation (identity without one), ``mean``, ``std`` its
    :func:`resdistill.checkpoint.normalization_of`, ``model`` the forward pass of
    :func:`resdistill.predict.cpu_forward.scoring_forward` (TorchScript on a CPU), for the rows of a
    batch without an error (and, with ``only``, where that bool column is set); other rows get
    zeros. ``tiles`` is replaced by ``probs``; worker seconds are added to ``seconds``."""

    def __init__(
        self, checkpoint: str, device: str, tiles: str = "tile", probs: str = "probs",
        only: str | None = None,
    ) -> None:  # fmt: skip
        import torch

        from resdistill.checkpoint import load_model, normalization_of

        self.torch = torch
        self.device = device
        self.model = load_model(checkpoint, device=device)
        self.net = self.model.model.eval().to(device)
        # set at the first batch, from its tile size (cpu_forward.scoring_forward)
        self.forward: Any = None
        self.layout: Any = None
        mean, std = normalization_of(self.model)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        ref = self.model.card.stain_reference()
        self.stain = None
        if ref:
            from resdistill.data.stain_norm import normalizer

            self.stain = normalizer(ref)
        self.tiles, self.probs, self.only = tiles, probs, only

    def __call__(self, batch: Batch) -> Batch:
        torch = self.torch
        t0 = time.perf_counter()
        rows = batch["error"] == ""
        if self.only is not None:
            rows &= batch[self.only]
        probs = np.zeros((len(batch["slide"]), len(self.model.classes)), np.float32)
        if rows.any():
            if self.forward is None:
                from resdistill.predict.cpu_forward import scoring_forward

                px = batch[self.tiles].shape[1]
                self.forward, self.layout = scoring_forward(self.net, px, self.device)
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch[self.tiles][rows]))
                x = x.to(self.device).permute(0, 3, 1, 2).float() / 255.0
                if self.stain is not None:
                    x = self.stain(x)
                x = ((x - self.mean) / self.std).contiguous(memory_format=self.layout)
                logits, _ = self.forward(x)
                probs[rows] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != self.tiles}
        out[self.probs] = probs
        out["seconds"] = batch["seconds"] + np.where(
            rows, (time.perf_counter() - t0) / max(1, rows.sum()), 0.0
        )
        return out


class ReadScorer(Scorer):
    """Reading and scoring in one CPU actor: chunks ``{slide, start, stop}`` ->
    :func:`read_chunks` -> :class:`Scorer` in batches of ``batch_size`` tiles. On a CPU node this
    keeps every core on whichever of the two a model needs (a teacher's tiles are mostly model,
    a small student's partly reading) and sends no tile between processes."""

    def __init__(
        self, checkpoint: str, device: str, plans: ReadPlans, chain: ReadChain,
        batch_size: int,
    ) -> None:  # fmt: skip
        super().__init__(checkpoint, device)
        self.plans, self.chain, self.batch_size = plans, chain, int(batch_size)

    def __call__(self, batch: Batch) -> Batch:
        rows = read_chunks(batch, plans=self.plans, chain=self.chain)
        n, b = len(rows["slide"]), self.batch_size
        parts = [super(ReadScorer, self).__call__({k: v[i : i + b] for k, v in rows.items()})
                 for i in range(0, n, b)]  # fmt: skip
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
