"""Where one training step's time goes, per sample, phase by phase, in one process and one thread.

For a magnification set (a student's tile, or the student's and the teacher's for online
distillation), over the training split of a dataset:

* read: the tar members of the samples (:func:`resdistill.data.tar_members.iter_samples`, the
  stream's reader), labels included;
* decode: the kept JPEGs to uint8 (:func:`resdistill.data.stream.decode_image`);
* collate: stacking samples into a batch;
* prepare: flips/rotations, jitter and normalisation on the batch
  (:class:`resdistill.data.BatchPrep`);
* forward + backward and optimiser (Adam) of resnet18 on the prepared batch.

One thread: the loader's per-sample costs and the model's are then comparable as CPU time; a
loader process runs beside the trainer's threads, so ``data / model`` is the share of the
machine the data path takes from the model.

    python benchmarks/profile_step.py --data DATASET --mags 2.5x

``--loader-cpu`` measures instead the whole loader as a training stage builds it
(``make_loader`` in training mode, read in this process, batches as the model gets them): CPU per
sample. It uses only the loader's public API, so ``--code`` can point it at another checkout of
the package (an older commit) for a before/after on the same dataset::

    git worktree add /tmp/before <commit>
    python benchmarks/profile_step.py --data DATASET --mags 1.25x --loader-cpu --code /tmp/before
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile(
    data: str, mags: Sequence[str], *, batch: int = 64, samples: int = 512,
    jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
) -> dict[str, float]:  # fmt: skip
    """Microseconds per sample of each phase (see the module docstring)."""
    import torch

    from resdistill.data import BatchPrep, DatasetInfo, PairedAugment, collate, read_manifest
    from resdistill.data.sample_plan import shard_keys, slot_tasks
    from resdistill.data.stream import TileStream
    from resdistill.models import build_model

    torch.set_num_threads(1)
    info = DatasetInfo.load(data)
    stream = TileStream(info, shard_keys(read_manifest(info.url), ["train"]), list(mags),
                        repeat=False)  # fmt: skip
    tasks = slot_tasks(stream.shards, 0, 1, draw=None)
    spent: dict[str, float] = dict.fromkeys(("read", "decode", "collate", "prepare"), 0.0)
    raws: list[dict[str, Any]] = []
    next(iter(stream._raw_samples(tasks)))  # warm-up: imports, storage client, page cache
    while len(raws) < samples:
        t0 = time.process_time()
        got = list(stream._raw_samples(tasks))
        for s in got:
            s["__label__"] = max(0, stream._label(s))
        spent["read"] += time.process_time() - t0
        raws += got
    raws = raws[:samples]
    n = len(raws)
    t0 = time.process_time()
    decoded = [stream._decode(s) for s in raws]
    spent["decode"] = time.process_time() - t0
    t0 = time.process_time()
    batches = [collate(decoded[i : i + batch]) for i in range(0, n - batch + 1, batch)]
    spent["collate"] = time.process_time() - t0
    prep = BatchPrep(stream.norms(), augment=PairedAugment(jitter),
                     generator=torch.Generator().manual_seed(0), owns=True)  # fmt: skip
    t0 = time.process_time()
    ready = [prep(b) for b in batches]
    spent["prepare"] = time.process_time() - t0
    net = build_model("resnet18", info.num_classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    fb = op = 0.0
    for i, b in enumerate([ready[0], ready[0], *ready]):  # two warm-up steps
        t0 = time.process_time()
        loss = torch.nn.functional.cross_entropy(net(b.images[0])[0], b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.process_time()
        opt.step()
        t2 = time.process_time()
        if i > 1:
            fb, op = fb + t1 - t0, op + t2 - t1
    used = batch * len(ready)  # samples in whole batches: what collation onwards saw
    per = {"read": n, "decode": n, "collate": used, "prepare": used}
    out = {k: v / per[k] * 1e6 for k, v in spent.items()}
    out["forward_backward"] = fb / used * 1e6
    out["optimiser"] = op / used * 1e6
    return out


def loader_cpu(
    data: str, mags: Sequence[str], *, batch: int = 64, steps: int = 16,
    jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
) -> float:  # fmt: skip
    """CPU microseconds per sample of a training loader (flips, ``jitter``, normalisation; read in
    this process, one thread), the first batch (buffer fill, imports) not counted."""
    import torch

    from resdistill.data import DatasetInfo, PairedAugment, make_loader

    torch.set_num_threads(1)
    loader = make_loader(DatasetInfo.load(data), ["train"], list(mags), batch_size=batch,
                         train=True, num_workers=0, augment=PairedAugment(tuple(jitter)),
                         labelled_only=True, steps=steps)  # fmt: skip
    batches = loader.epoch()
    next(batches)
    t0 = time.process_time()
    n = sum(len(b) for b in batches)
    spent = time.process_time() - t0
    loader.close()
    return spent / n * 1e6


def profile_rows(
    data: str, *, row: Callable[..., dict[str, Any]], student_mag: str, batch: int,
    samples: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per stage's read set: the data path's CPU per sample against the model's."""
    from resdistill.data import DatasetInfo
    from sharding.magnification import display_mag

    info = DatasetInfo.load(data)
    sets = {f"student {display_mag(student_mag)}": [student_mag],
            f"teacher {display_mag(info.highest)}": [info.highest],
            f"online distillation {display_mag(student_mag)}+{display_mag(info.highest)}":
                [student_mag, info.highest]}  # fmt: skip
    rows = []
    for name, mags in sets.items():
        p = profile(data, mags, batch=batch, samples=samples)
        data_us = p["read"] + p["decode"] + p["collate"] + p["prepare"]
        model_us = p["forward_backward"] + p["optimiser"]
        split = ", ".join(f"{k} {v:.0f}" for k, v in p.items())
        rows.append(row(
            f"profile, CPU per sample (1 thread): {name}", "model step", model_us,
            "data path", data_us, "us/sample", data_us / model_us, "",
            f"{split} us/sample (the model of the first magnification)",
        ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--mags", default="2.5x", help="comma list, e.g. 2.5x,10x")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--jitter", default="0,0,0,0", help="colour jitter b,c,s,h on the batch")
    ap.add_argument(
        "--loader-cpu",
        action="store_true",
        help="measure the whole training loader's CPU per sample instead",
    )
    ap.add_argument("--code", help="with --loader-cpu: import resdistill from this checkout")
    args = ap.parse_args()
    jitter = [float(v) for v in args.jitter.split(",")]
    if args.loader_cpu:
        if args.code:
            sys.path.insert(0, str(Path(args.code).resolve()))
        us = loader_cpu(args.data, args.mags.split(","), batch=args.batch, jitter=jitter)
        import resdistill

        print(f"loader {us:.0f} us CPU/sample ({args.mags}; resdistill from "
              f"{Path(resdistill.__file__).parent.parent})")  # fmt: skip
        return
    p = profile(args.data, args.mags.split(","), batch=args.batch, samples=args.samples,
                jitter=jitter)  # fmt: skip
    for k, v in p.items():
        print(f"{k:18s} {v:8.0f} us/sample")


if __name__ == "__main__":
    main()
