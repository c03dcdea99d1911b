"""``resdistill shard``: slides -> multi-magnification WebDataset shards + manifest, resumable.

The driver:

1. finds the slides (files, or folders scanned for OpenSlide suffixes) and their ids, reads the
   labels CSV, and assigns splits by patient / slide (earlier assignments are kept on resume);
2. reconciles the output: a shard without its index fragment (an interrupted publish) is deleted,
   and so is a fragment without its shard; the published samples of each slide are counted;
3. plans every unfinished slide as a Ray task (open, base mpp, tissue mask, region grid), records
   its expected sample count in ``_state/slides/<id>.json``, and queues its remaining regions in
   chunks, interleaved round-robin across slides so that shards mix slides;
4. runs chunk tasks on Ray with a bounded number in flight (memory stays bounded whatever the
   slide size), feeding each split's :class:`ShardWriter`;
5. rebuilds ``manifest.parquet`` and ``dataset.json`` from all fragments and publishes them last.

A slide is finished when its published samples number its planned regions; a rerun skips it.
A slide that fails part-way keeps its published samples (listed in the manifest, as always) and
is retried by the next run, which cuts only its missing regions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .extract import SlideJob, SlidePlan, extract_chunk, plan_slide
from .labels import Labels, LabelsError, assign_splits, read_labels
from .layout import (
    DATASET_JSON,
    MANIFEST,
    SHARD_PREFIX,
    SPLITS,
    STATE_DIR,
    UnsafeNameError,
    sample_key,
    slide_id,
)
from .manifest import combine, dataset_description, manifest_bytes, read_parquet_bytes
from .options import ShardOptions, parse_size
from .remote_slides import is_s3, list_s3_slides
from .shardwriter import ShardWriter, fragment_name
from .slide import SLIDE_SUFFIXES, SlideError
from .storage import Storage, open_storage

TOOL = "resdistill 0.1.0"
CONFIG = f"{STATE_DIR}/config.json"
CHUNK_REGIONS = 32
#: Local scratch folders are named ``<prefix><pid>-<random>`` so a later run can tell which ones a
#: killed run left behind.
SCRATCH_PREFIX = "resdistill-shard-"


class ShardError(Exception):
    """The run as a whole cannot proceed (bad options, unusable labels, mismatched output)."""


@dataclass
class SplitCount:
    slides: int = 0
    samples: int = 0
    shards: int = 0


@dataclass
class ShardReport:
    """What a run did; ``ok`` is False when any slide or label row was skipped."""

    url: str
    counts: dict[str, SplitCount] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # slide path or id -> reason
    problems: list[str] = field(default_factory=list)  # one line each (labels CSV rows ...)
    done_before: int = 0  # slides already finished by an earlier run
    new_samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.problems

    @property
    def tiles_per_s(self) -> float:
        return self.new_samples / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- inputs


def find_slides(inputs: Iterable[str | Path]) -> tuple[dict[str, str], list[str]]:
    """Slide id -> path for files and folders given; problems for unusable names and clashes."""
    found: dict[str, str] = {}
    problems: list[str] = []
    paths: list[Path | str] = []
    for item in inputs:
        if is_s3(str(item)):
            paths.extend(list_s3_slides(str(item)))
            continue
        p = Path(item)
        if p.is_dir():
            paths.extend(
                sorted(
                    q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
                )
            )
        else:
            paths.append(p)  # a missing or odd file is reported by the planner, with its path
    for p in paths:
        try:
            sid = slide_id(PurePosixPath(str(p)).stem)
        except UnsafeNameError as exc:
            problems.append(f"{p}: {exc}")
            continue
        if sid in found and _same_file(found[sid], str(p)):
            continue
        if sid in found:
            problems.append(
                f"{p}: slide id {sid!r} is also used by {found[sid]}: rename one of the files "
                "(ids keep letters, digits, '_' and '-'; other characters become '-')"
            )
            continue
        found[sid] = str(p)
    return found, problems


def _same_file(a: str, b: str) -> bool:
    if is_s3(a) or is_s3(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


# --------------------------------------------------------------------------- executors


class _InlineExecutor:
    """Runs tasks in the driver process (``workers=0``): for debugging and tiny jobs."""

    class _Done:
        """A finished call: hashable by identity, like a Ray ObjectRef."""

        def __init__(self, value=None, error: Exception | None = None) -> None:
            self.value, self.error = value, error

    def submit(self, fn, *args):
        try:
            return self._Done(fn(*args))
        except Exception as exc:  # delivered by result(), as Ray would
            return self._Done(error=exc)

    def wait(self, handles: list):
        return handles[:1], handles[1:]

    def result(self, handle):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def shutdown(self) -> None:
        pass


class _RayExecutor:
    """Runs tasks as Ray tasks (1 CPU each, plus ``resources`` such as a sharding node label)."""

    def __init__(self, address: str | None, workers: int | None, resources: dict | None) -> None:
        import ray

        from sharding.ray_cluster import ray_init

        self.ray = ray
        self.started = ray_init(address, num_cpus=workers, dashboard=False, log_to_driver=False)
        opts = {"num_cpus": 1, "max_retries": 2, "retry_exceptions": False}
        if resources:
            opts["resources"] = resources
        self._remote: dict = {}
        self._opts = opts

    def submit(self, fn, *args):
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(**self._opts)(fn)
        return remote.remote(*args)

    def wait(self, handles: list):
        return self.ray.wait(handles, num_returns=1)

    def result(self, handle):
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()


# --------------------------------------------------------------------------- state


def _read_json(store: Storage, rel: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None


def reconcile(store: Storage) -> tuple[dict[str, list], dict[str, int]]:
    """Delete half-published shards / stray fragments; return fragments by split and next index.

    Returns ``(tables, next_index)`` where ``tables[split]`` are the fragment tables of published
    shards and ``next_index[split]`` the first unused shard number.
    """
    names = store.list()
    shards = {n for n in names if n.endswith(".tar") and n.split("/")[0] in SPLITS}
    frags = {n for n in names if n.startswith(f"{STATE_DIR}/index/") and n.endswith(".parquet")}
    tables: dict[str, list] = {s: [] for s in SPLITS}
    next_index = {s: 0 for s in SPLITS}
    for shard in sorted(shards):
        split = shard.split("/")[0]
        try:
            number = int(Path(shard).stem.rsplit("-", 1)[1])
            next_index[split] = max(next_index[split], number + 1)
        except (IndexError, ValueError):
            continue
        if fragment_name(shard) not in frags:
            store.delete(shard)  # interrupted publish: its samples are redone
    for frag in sorted(frags):
        shard = frag[len(f"{STATE_DIR}/index/") : -len(".parquet")] + ".tar"
        if shard not in shards:
            store.delete(frag)
            continue
        tables[shard.split("/")[0]].append(read_parquet_bytes(store.read_bytes(frag)))
    return tables, next_index


def _clear(store: Storage) -> None:
    """--overwrite: remove what an earlier run wrote here (and nothing else)."""
    for name in store.list():
        top = name.split("/")[0]
        if (
            name in (DATASET_JSON, MANIFEST)
            or top == STATE_DIR
            or (
                top in SPLITS
                and Path(name).name.startswith(SHARD_PREFIX + "-")
                and name.endswith(".tar")
            )
        ):
            store.delete(name)


# --------------------------------------------------------------------------- the run


def run_shard(
    slides: list[str | Path],
    out: str,
    *,
    mags: str = "10,5,2.5,1.25",
    tile_px: int = 224,
    labels: str | Path | None = None,
    classes: list[str] | None = None,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    mpp: float | None = None,
    min_tissue: float = 0.5,
    shard_size: str | int = "256MB",
    fmt: str = "jpeg",
    quality: int = 90,
    address: str | None = None,
    workers: int | None = None,
    resources: dict | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    chunk_regions: int = CHUNK_REGIONS,
) -> ShardReport:
    """Shard ``slides`` into ``out``; see the module docstring. ``workers=0`` runs without Ray."""
    try:
        opts = ShardOptions.make(mags, tile_px, fmt, quality, min_tissue, mpp)
        target = parse_size(shard_size)
    except ValueError as exc:
        raise ShardError(str(exc)) from None
    if len(splits) != 3 or any(r < 0 for r in splits) or sum(splits) <= 0:
        raise ShardError(f"--splits needs three non-negative ratios train,val,test; got {splits}")
    store = open_storage(out)
    if hasattr(store, "check"):
        store.check()
    report = ShardReport(url=store.url)
    started = time.monotonic()

    found, name_problems = find_slides(slides)
    report.problems.extend(name_problems)
    for line in name_problems:
        report.skipped[line.split(":", 1)[0]] = line.split(": ", 1)[1]
    if not found and not name_problems:
        raise ShardError("no slides found in the inputs: give slide files or folders holding them")

    parsed = Labels()
    if labels is not None:
        try:
            parsed = read_labels(labels, set(found), classes)
        except LabelsError as exc:
            raise ShardError(str(exc)) from None
        report.problems.extend(parsed.problems)
        for sid, reason in parsed.skip.items():
            report.skipped[found[sid]] = reason
            found.pop(sid)

    if overwrite:
        _clear(store)
    config = {**opts.identity(), "splits": list(splits), "seed": seed}
    previous = _read_json(store, CONFIG)
    if previous is not None and previous != config:
        differ = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
        raise ShardError(
            f"{store.url} holds a dataset written with other settings ({', '.join(differ)}): "
            "pass --overwrite to replace it, or choose another --out"
        )
    if previous is None:
        store.write_bytes(CONFIG, json.dumps(config, indent=1, sort_keys=True).encode())

    tables, next_index = reconcile(store)
    published: dict[str, int] = {}
    published_keys: dict[str, set[str]] = {}
    for split_tables in tables.values():
        for t in split_tables:
            for sid, key in zip(
                t.column("slide").to_pylist(), t.column("key").to_pylist(), strict=True
            ):
                published[sid] = published.get(sid, 0) + 1
                published_keys.setdefault(sid, set()).add(key)
    records = {sid: _read_json(store, f"{STATE_DIR}/slides/{sid}.json") for sid in found}
    fixed = {sid: r["split"] for sid, r in records.items() if r}
    split_of = assign_splits(parsed.label, parsed.patient, tuple(splits), seed, fixed)

    jobs: list[SlideJob] = []
    for sid, path in sorted(found.items()):
        label = parsed.label.get(sid)
        split = split_of.get(sid, "unlabeled") if label else "unlabeled"
        rec = records.get(sid)
        if rec and rec.get("split") != split:
            report.problems.append(
                f"{path}: was sharded into {rec['split']!r} by an earlier run but its label now puts "
                f"it in {split!r}: pass --overwrite to re-split; the slide is skipped"
            )
            report.skipped[path] = "label changed since the earlier run"
            continue
        if rec and published.get(sid, 0) >= rec["n_samples"]:
            report.done_before += 1
            continue
        jobs.append(
            SlideJob(
                path=path, slide=sid, split=split, label=label, patient=parsed.patient.get(sid)
            )
        )

    mag_names = [m.name for m in opts.mags]
    _remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    writers = {
        s: ShardWriter(store, s, next_index[s], target, mag_names, scratch=scratch, seed=seed)
        for s in SPLITS
    }
    executor = _InlineExecutor() if workers == 0 else _RayExecutor(address, workers, resources)
    finished = False
    try:
        _drive(
            jobs, opts, executor, writers, store, published_keys, report, progress, chunk_regions
        )
        for w in writers.values():
            w.close()
        finished = True
    finally:
        if not finished:
            for w in writers.values():
                w.abort()
        executor.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    tables, _ = reconcile(store)
    table = combine([t for ts in tables.values() for t in ts], mag_names)
    class_names = sorted(set(classes or []) | {c for c in table.column("label").to_pylist() if c})
    desc = dataset_description(
        table,
        mags=[(m.name, round(m.mpp, 6)) for m in opts.mags],
        tile_px=dict(opts.sizes),
        image_format=opts.fmt,
        classes=class_names,
        splits=dict(zip(("train", "val", "test"), splits, strict=True)),
        seed=seed,
        min_tissue=min_tissue,
        tool=TOOL,
    )
    store.write_bytes(MANIFEST, manifest_bytes(table))
    store.write_bytes(DATASET_JSON, json.dumps(desc, indent=1).encode())
    for split, c in desc["counts"].items():
        report.counts[split] = SplitCount(
            slides=c["slides"], samples=c["samples"], shards=c["shards"]
        )
    report.seconds = time.monotonic() - started
    return report


def _drive(
    jobs: list[SlideJob],
    opts: ShardOptions,
    executor,
    writers: dict[str, ShardWriter],
    store: Storage,
    published_keys: dict[str, set[str]],
    report: ShardReport,
    progress: bool,
    chunk_regions: int,
) -> None:
    """Plan slides, then keep a bounded window of chunk tasks running until every slide is done."""
    from .progress import ShardProgress

    window = max(2, 2 * _cluster_cpus(executor))
    pending_plans = deque(jobs)
    in_flight: dict = {}  # handle -> ("plan", job) | ("chunk", job, n)
    chunk_queues: deque = deque()  # per-slide deques of chunks, served round-robin
    remaining: dict[str, int] = {}
    failed: set[str] = set()
    with ShardProgress(len(jobs), enabled=progress) as bar:

        def fill() -> None:
            while len(in_flight) < window and (pending_plans or chunk_queues):
                # Plans first while few chunks wait, so that many slides are interleaved.
                if pending_plans and len(chunk_queues) < window:
                    job = pending_plans.popleft()
                    in_flight[executor.submit(plan_slide, job, opts)] = ("plan", job)
                    continue
                if not chunk_queues:
                    break
                job, plan, chunks = chunk_queues.popleft()
                regions = chunks.popleft()
                if chunks:
                    chunk_queues.append((job, plan, chunks))
                handle = executor.submit(
                    extract_chunk, job, plan.base_mpp, plan.size0, regions, opts
                )
                in_flight[handle] = ("chunk", job, len(regions))

        fill()
        while in_flight:
            done, _ = executor.wait(list(in_flight))
            handle = done[0]
            kind, job, *rest = in_flight.pop(handle)
            try:
                value = executor.result(handle)
            except SlideError as exc:
                _fail(job, str(exc), report, failed, chunk_queues, bar)
                fill()
                continue
            except Exception as exc:  # a worker died, OpenSlide crashed: report, go on
                _fail(
                    job,
                    f"{job.path}: {type(exc).__name__}: {exc}",
                    report,
                    failed,
                    chunk_queues,
                    bar,
                )
                fill()
                continue
            if job.slide in failed:
                fill()
                continue
            if kind == "plan":
                plan: SlidePlan = value
                _record(store, plan)
                have = published_keys.get(job.slide, set())
                todo = [
                    (int(x), int(y), float(t))
                    for x, y, t in zip(plan.xs, plan.ys, plan.tissue, strict=True)
                    if sample_key(job.slide, int(x), int(y)) not in have
                ]
                if not todo:
                    bar.slide_done()
                else:
                    chunks = deque(
                        todo[i : i + chunk_regions] for i in range(0, len(todo), chunk_regions)
                    )
                    remaining[job.slide] = len(chunks)
                    chunk_queues.append((job, plan, chunks))
                    bar.add_tiles_total(len(todo))
            else:
                for sample in value:
                    writers[job.split].add(sample)
                report.new_samples += len(value)
                bar.tiles(len(value))
                remaining[job.slide] -= 1
                if remaining[job.slide] == 0:
                    bar.slide_done()
            fill()


def _fail(
    job: SlideJob, message: str, report: ShardReport, failed: set, chunk_queues: deque, bar
) -> None:
    if job.slide in failed:
        return
    failed.add(job.slide)
    report.skipped[job.path] = (
        message.split(": ", 1)[1] if message.startswith(job.path) else message
    )
    report.problems.append(message)
    for entry in list(chunk_queues):
        if entry[0].slide == job.slide:
            chunk_queues.remove(entry)
    bar.slide_failed(message)


def _remove_stale_scratch() -> None:
    """Delete scratch folders of sharding runs whose process is gone (killed mid-shard)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            pid = int(path.name[len(SCRATCH_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            continue  # alive, another user's


def _record(store: Storage, plan: SlidePlan) -> None:
    job = plan.job
    record = {
        "slide": job.slide,
        "path": job.path,
        "split": job.split,
        "label": job.label,
        "patient": job.patient,
        "n_samples": int(plan.xs.size),
        "size0": plan.size0,
        "base_mpp": plan.base_mpp,
        "mpp_source": plan.mpp_source,
        "width": plan.width,
        "height": plan.height,
    }
    store.write_bytes(f"{STATE_DIR}/slides/{job.slide}.json", json.dumps(record, indent=1).encode())


def _cluster_cpus(executor) -> int:
    if isinstance(executor, _InlineExecutor):
        return 1
    return max(1, int(executor.ray.cluster_resources().get("CPU", 1)))
