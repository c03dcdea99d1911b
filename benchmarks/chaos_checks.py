"""What the chaos check (``benchmarks/chaos.py``) asks of a killed-then-rerun command's output.

Each check compares the output with an uninterrupted run's (``clean``) where the command's
output is deterministic, and returns a short line saying what held; it raises
:class:`CheckFailed` (one line) otherwise:

- shard: the dataset reads back whole (``tests.dataset_checks.verify_dataset``: every manifest
  row's key is in its shard and every shard's sample in the manifest, once) and holds the same
  samples (key, slide, x, y, split, label) as the clean dataset. Which shard a sample lands in
  may differ: a resumed run mixes the slides left over.
- teacher, distill: every checkpoint folder of the run loads (``resdistill.checkpoint.
  load_model``) and the last is the last epoch asked for; against a clean run of the same
  options, the final weights' largest difference is reported, not judged: a run resumed after
  epoch k need not retrace the uninterrupted one (its loader is seeded at its start epoch).
- teacher-targets: ``targets.json`` checks out (every array's sha256) and every shard's keys,
  logits and feature maps equal the clean set's (float16, so within 1e-2).
- predict: every slide's row of ``slides.parquet`` has the clean run's status, class, tile
  count and probabilities (within 1e-5: the batches Ray Data forms may differ).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

PROBABILITY_TOL = 1e-5
TARGETS_TOL = 1e-2
_CKPT = re.compile(r"checkpoint_epoch(\d+)$")


class CheckFailed(Exception):
    """The output differs from an uninterrupted run's, or is unreadable (one line)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def check_dataset(url: str, clean: str) -> str:
    from tests.dataset_checks import verify_dataset

    try:
        got = verify_dataset(url, check_pixels=False)
    except (AssertionError, Exception) as exc:  # noqa: BLE001 - any failure is the finding
        raise CheckFailed(f"{url}: {_one_line(exc)}") from None
    want = verify_dataset(clean, check_pixels=False)
    fields = ("key", "slide", "x", "y", "split", "label")
    rows = {tuple(r[f] for f in fields) for r in got["rows"]}
    ref = {tuple(r[f] for f in fields) for r in want["rows"]}
    if rows != ref:
        raise CheckFailed(
            f"{url}: {len(rows - ref)} sample(s) not in the clean dataset, {len(ref - rows)} "
            f"missing (of {len(ref)})"
        )
    return f"manifest == shards, {len(rows)} samples == clean"


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _CKPT.match(p.name))]
    return sorted(found)


def check_run(run: Path, epochs: int, clean: Path | None = None) -> str:
    from resdistill.checkpoint import load_model

    if not run.is_dir():
        raise CheckFailed(f"{run}: no run folder")
    ckpts = _checkpoints(run)
    if not ckpts:
        raise CheckFailed(f"{run}: no checkpoint")
    models = {}
    for epoch, folder in ckpts:
        try:
            models[epoch] = load_model(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise CheckFailed(f"{folder}: does not load: {_one_line(exc)}") from None
    last = ckpts[-1][0]
    if last != epochs:
        raise CheckFailed(f"{run}: last checkpoint is epoch {last}, not {epochs}")
    note = f"{len(ckpts)} checkpoint(s) load, last epoch {last}"
    if clean is not None:
        ref = load_model(str(_checkpoints(clean)[-1][1]))
        note += f", max |w - clean| {_max_diff(models[last].model, ref.model):.2g}"
    return note


def _max_diff(a: Any, b: Any) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(
        float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0 for k in sa
    )


def check_targets(url: str, clean: str) -> str:
    import numpy as np

    from resdistill.data.targets import TargetsIndex

    try:
        got, want = TargetsIndex.load(url), TargetsIndex.load(clean)
        if set(got.shards) != set(want.shards):
            raise CheckFailed(f"{url}: covers other shards than the clean set")
        worst = 0.0
        for shard in sorted(want.shards):
            a, b = got.read_shard(shard), want.read_shard(shard)
            if set(a) != set(b) or list(a["keys"]) != list(b["keys"]):
                raise CheckFailed(f"{url}: {shard}: other keys or arrays than the clean set")
            for name in a:
                if name != "keys":
                    diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))
                    worst = max(worst, float(diff.max(initial=0.0)))
    except CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"{url}: {_one_line(exc)}") from None
    if worst > TARGETS_TOL:
        raise CheckFailed(f"{url}: arrays differ from the clean set by up to {worst:.3g}")
    return f"{len(want.shards)} shards verified, max |diff| vs clean {worst:.2g}"


def _slides(out: Path) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    return {r["slide"]: r for r in pq.read_table(io.BytesIO((out / "slides.parquet").read_bytes())).to_pylist()}  # fmt: skip


def check_predictions(out: Path, clean: Path) -> str:
    try:
        got = _slides(out)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"{out}/slides.parquet: {_one_line(exc)}") from None
    want = _slides(clean)
    if set(got) != set(want):
        raise CheckFailed(f"{out}: slides {sorted(got)} != clean {sorted(want)}")
    worst = 0.0
    for slide, ref in want.items():
        row = got[slide]
        for key in ("status", "class", "tiles", "slide_sha256"):
            if row.get(key) != ref.get(key):
                raise CheckFailed(f"{out}: {slide}: {key} {row.get(key)!r} != clean {ref.get(key)!r}")  # fmt: skip
        for key in (k for k in ref if k.startswith("p_")):
            worst = max(worst, abs(float(row[key]) - float(ref[key])))
    if worst > PROBABILITY_TOL:
        raise CheckFailed(f"{out}: probabilities differ from the clean run's by up to {worst:.3g}")
    return f"{len(want)} slides == clean (max |dp| {worst:.1g})"
