"""``resdistill shard``: slides -> multi-magnification WebDataset shards + manifest, resumable.

The driver:

1. finds the slides (files, or folders scanned for OpenSlide suffixes), skips those missing
   (an output none of whose slides can be read is left untouched), fingerprints them and settles
   their ids (:mod:`sharding.slide_ids`: a slide never takes the id another slide, by bytes,
   holds in this run or in the output; ``--on-conflict``), reads the labels CSV and the region
   annotations (:mod:`sharding.annotation_set`), and assigns splits by patient / slide,
   stratified on each slide's label: its CSV row, else its annotations' majority class (earlier
   assignments are kept on resume); an unlabelled slide with a patient joins that patient's split
   (see :func:`sharding.labels.patient_splits`);
2. takes the output's exclusive lease (:mod:`sharding.lease`), held until the run ends, and
   reconciles the output (its settings, ``_state/config.json``, are written with the first
   slide's plan): a shard without its index fragment (an interrupted publish) is deleted,
   and so is a fragment without its shard; the published samples of each slide are counted;
3. plans every unfinished slide as a Ray task (open, base mpp, tissue mask, region grid, and the
   regions its annotations keep and label, see :mod:`sharding.region_labels`), records
   its expected sample count in ``_state/slides/<id>.json``, and queues its remaining regions in
   chunks, interleaved round-robin across slides so that shards mix slides;
4. runs chunk tasks on Ray with a bounded number in flight (memory stays bounded whatever the
   slide size), feeding each split's :class:`ShardWriter` (:mod:`sharding.scheduler`);
5. rebuilds ``manifest.parquet`` and ``dataset.json`` from all fragments and publishes them last.

A slide is finished when its published samples number its planned regions; a rerun skips it.
A slide that fails part-way keeps its published samples (listed in the manifest, as always) and
is retried by the next run, which cuts only its missing regions.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .annotation_set import AnnotationSet, AnnotationSetError, read_annotation_set
from .executors import make_executor
from .extract import SlideJob
from .inputs import find_slides, slide_inputs
from .labels import Labels, LabelsError, assign_splits, patient_splits, read_labels
from .layout import DATASET_JSON, MANIFEST, SPLITS
from .lease import Lease, LeaseHeld, LeaseLost
from .manifest import combine, dataset_description, manifest_bytes
from .options import ShardConfig, parse_size
from .scheduler import drive
from .shard_report import ShardReport, SplitCount
from .shardwriter import ShardWriter
from .slide_identity import SlideIdentity, fingerprint_all
from .slide_ids import settle_ids
from .state import (
    CONFIG,
    SCRATCH_PREFIX,
    clear_output,
    make_scratch,
    published_keys,
    read_json,
    reconcile,
    resume_identity,
    settings_differ,
    slide_record,
)
from .storage import Storage, open_storage

__all__ = [
    "SCRATCH_PREFIX",
    "ShardConfig",
    "ShardError",
    "ShardReport",
    "find_slides",
    "run_shard",
    "shard_slides",
]

TOOL = "resdistill 0.1.0"
CHUNK_REGIONS = 32


class ShardError(Exception):
    """The run as a whole cannot proceed (bad options, unusable labels, mismatched output)."""


# --------------------------------------------------------------------------- the run


def run_shard(slides: Sequence[str | Path], out: str | Path, **settings: Any) -> ShardReport:
    """:func:`shard_slides` of ``ShardConfig(slides, out, **settings)``: the keyword form that
    scripts and tests use (settings are :class:`~sharding.options.ShardConfig`'s fields; a bad
    value raises its ConfigError)."""
    return shard_slides(ShardConfig(slides=tuple(slides), out=out, **settings))


def shard_slides(cfg: ShardConfig) -> ShardReport:
    """Shard ``cfg.slides`` into ``cfg.out``; see the module docstring. ``workers=0`` runs
    without Ray; the settings a resumed run must share are kept in ``_state/config.json``.
    :class:`ShardError` when the run as a whole cannot proceed."""
    opts = cfg.shard_options()
    target = parse_size(cfg.shard_size)
    annotations, classes, splits, seed = cfg.annotation_options(), cfg.classes, cfg.splits, cfg.seed
    store = open_storage(cfg.out)
    if hasattr(store, "check"):
        store.check()
    report = ShardReport(url=store.url)
    started = time.monotonic()

    pairs, name_problems = slide_inputs(cfg.slides)
    report.problems.extend(name_problems)
    for line in name_problems:
        report.skipped[line.split(":", 1)[0]] = line.split(": ", 1)[1]
    if not pairs and not name_problems:
        raise ShardError("no slides found in the inputs: give slide files or folders holding them")
    present, missing = fingerprint_all([p for _, p in pairs], hashed=False)
    _skip(report, missing)
    if not present:  # nothing can be read: the output is left as it was, not even created
        report.seconds = time.monotonic() - started
        return report
    found, identity = _settle_ids(store, cfg, [(s, p) for s, p in pairs if p in present], report)

    parsed = Labels()
    if cfg.labels is not None:
        try:
            parsed = read_labels(cfg.labels, found, list(classes) if classes else None)
        except LabelsError as exc:
            raise ShardError(str(exc)) from None
        report.drop(found, parsed.problems, parsed.skip)
    ann_set = None
    if annotations is not None:
        try:
            ann_set = read_annotation_set(
                annotations, found, majority_for=found.keys() - parsed.label
            )
        except AnnotationSetError as exc:
            raise ShardError(str(exc)) from None
        report.drop(found, ann_set.problems, ann_set.skip)
    # A slide's label decides its split: its CSV row, else its annotations' majority class.
    slide_label = {s: c for s, c in (ann_set.majority if ann_set else {}).items() if s in found}
    slide_label.update(parsed.label)

    lease = Lease(store, "resdistill shard")
    try:
        note = lease.acquire()
    except LeaseHeld as exc:
        raise ShardError(str(exc)) from None
    with lease:
        if note:
            report.notes.append(note)
        if cfg.overwrite:
            clear_output(store)
        config = resume_identity(opts, splits, seed, annotations)
        previous = read_json(store, CONFIG)
        differ = settings_differ(previous, config)
        if differ:
            raise ShardError(
                f"{store.url} holds a dataset written with other settings ({', '.join(differ)}): "
                "pass --overwrite to replace it, or choose another --out"
            )

        tables, next_index = reconcile(store)
        published = published_keys(tables)
        records = {sid: slide_record(store, sid) for sid in found}
        _check_unchanged(records, found, identity)
        fixed = {sid: r["split"] for sid, r in records.items() if r}
        split_of = assign_splits(slide_label, parsed.patient, tuple(splits), seed, fixed)
        # An unlabelled slide of a patient goes where the patient went, never to `unlabeled`.
        split_of.update(patient_splits(split_of, parsed.patient, set(found) - set(slide_label)))
        jobs = _jobs(found, slide_label, split_of, parsed, ann_set, records, published, report)
        jobs = [replace(job, source=identity[job.slide]) for job in jobs]
        # The settings are locked with the first slide read: none read, nothing written.
        wrote_config = [previous is not None]

        def on_plan(plan: object) -> None:
            if not wrote_config[0]:
                store.write_bytes(CONFIG, json.dumps(config, indent=1, sort_keys=True).encode())
                wrote_config[0] = True

        mag_names = [m.name for m in opts.mags]
        scratch = make_scratch()
        writers = {
            s: ShardWriter(store, s, next_index[s], target, mag_names, scratch=scratch, seed=seed)
            for s in SPLITS
        }
        for w in writers.values():
            w.before_publish = lease.check  # every shard is published only while ours
        executor = make_executor(cfg.address, cfg.workers, cfg.resources)
        finished = False
        try:
            drive(
                jobs, (opts, annotations), executor, writers, store, published, report,
                cfg.progress and sys.stderr.isatty(), CHUNK_REGIONS,
                lease.check_heartbeat, on_plan,
            )  # fmt: skip
            for w in writers.values():
                w.close()
            finished = True
        except LeaseLost as exc:
            raise ShardError(str(exc)) from None
        finally:
            if not finished:
                for w in writers.values():
                    w.abort()
            executor.shutdown()
            shutil.rmtree(scratch, ignore_errors=True)
        if not wrote_config[0]:  # no slide could be read: no empty dataset to lock the output
            report.seconds = time.monotonic() - started
            return report

        tables, _ = reconcile(store)
        table = combine([t for ts in tables.values() for t in ts], mag_names)
        class_names = sorted(
            set(classes or []) | {c for c in table.column("label").to_pylist() if c}
        )
        desc = dataset_description(
            table,
            mags=[(m.name, round(m.mpp, 6)) for m in opts.mags],
            tile_px=dict(opts.sizes),
            image_format=opts.fmt,
            quality=opts.quality,
            low_mags_from=opts.low_mags_from,
            classes=class_names,
            splits=dict(zip(("train", "val", "test"), splits, strict=True)),
            seed=seed,
            min_tissue=opts.min_tissue,
            tool=TOOL,
            annotations=ann_set.describe(annotations) if ann_set else None,
        )
        try:
            lease.check()  # the manifest is written only while the output is still ours
        except LeaseLost as exc:
            raise ShardError(str(exc)) from None
        store.write_bytes(MANIFEST, manifest_bytes(table))
        store.write_bytes(DATASET_JSON, json.dumps(desc, indent=1).encode())
        report.published = True
        for split, c in desc["counts"].items():
            report.counts[split] = SplitCount(
                slides=c["slides"], samples=c["samples"], shards=c["shards"]
            )
    report.seconds = time.monotonic() - started
    return report


def _jobs(
    found: dict[str, str],
    slide_label: dict[str, str],
    split_of: dict[str, str],
    parsed: Labels,
    ann_set: AnnotationSet | None,
    records: dict[str, dict | None],
    published: dict[str, set[str]],
    report: ShardReport,
) -> list[SlideJob]:
    """The slides still to do; a slide whose split or annotation file changed since the run that
    planned it is skipped with a line (its samples would disagree with those published)."""
    jobs: list[SlideJob] = []
    for sid, path in sorted(found.items()):
        label = slide_label.get(sid)
        split = split_of.get(sid, "unlabeled")
        ref = ann_set.refs.get(sid) if ann_set else None
        rec = records.get(sid)
        if rec and rec.get("split") != split:
            report.problems.append(
                f"{path}: was sharded into {rec['split']!r} by an earlier run but its label or patient "
                f"now puts it in {split!r}: pass --overwrite to re-split; the slide is skipped"
            )
            report.skipped[path] = "label changed since the earlier run"
            continue
        if rec and rec.get("annotation_sha256") != (ref.sha256 if ref else None):
            report.problems.append(
                f"{path}: its annotations differ from those an earlier run sharded it with: pass "
                "--overwrite to shard again; the slide is skipped"
            )
            report.skipped[path] = "annotations changed since the earlier run"
            continue
        if rec and len(published.get(sid, ())) >= rec["n_samples"]:
            report.done_before += 1
            continue
        jobs.append(SlideJob(path, sid, split, label, parsed.patient.get(sid), annotation=ref))
    return jobs


def _skip(report: ShardReport, problems: dict[str, str]) -> None:
    """Record slides that cannot be read (path -> their one line) as skipped."""
    for path, line in problems.items():
        report.problems.append(line)
        report.skipped[path] = line.split(": ", 1)[1] if line.startswith(f"{path}: ") else line


def _settle_ids(
    store: Storage, cfg: ShardConfig, pairs: list[tuple[str, str]], report: ShardReport
) -> tuple[dict[str, str], dict[str, SlideIdentity]]:
    """Fingerprint the slides (reusing the recorded fingerprint of an unchanged file) and give
    each an id no other slide holds (:mod:`sharding.slide_ids`): ``(id -> path, id -> identity)``.
    :class:`ShardError` naming both files when a slide conflicts and ``--on-conflict`` is
    ``refuse``. Reads the output only; with ``--overwrite`` its records do not count."""
    cache: dict[str, dict | None] = {}

    def record(sid: str) -> dict | None:
        if cfg.overwrite:
            return None
        if sid not in cache:
            cache[sid] = slide_record(store, sid)
        return cache[sid]

    sid_of = {p: s for s, p in pairs}
    identity, unreadable = fingerprint_all(
        sid_of, recorded=lambda p: SlideIdentity.from_record(record(sid_of[p]))
    )
    _skip(report, unreadable)
    settled = settle_ids(
        [(s, p) for s, p in pairs if p in identity],
        identity,
        lambda sid: SlideIdentity.from_record(record(sid)),
        cfg.on_conflict,
        store.url,
    )
    if settled.conflicts:
        more = len(settled.conflicts) - 1
        raise ShardError(
            settled.conflicts[0] + (f" (and {more} more such slide(s))" if more else "")
        )
    if settled.suffixed and cfg.annotations:
        alt, sid = next(iter(settled.suffixed.items()))
        raise ShardError(
            f"{settled.slides[alt]}: --on-conflict suffix would shard it as {alt!r}, but "
            f"annotation files are matched to slides by name, so {sid}.geojson could be either "
            "slide's: rename the file instead"
        )
    report.notes.extend(settled.notes)
    return settled.slides, settled.identity


def _check_unchanged(
    records: dict[str, dict | None], found: dict[str, str], identity: dict[str, SlideIdentity]
) -> None:
    """Under the lease: the record of each slide id still names the slide settled for it (a run
    that ended after the ids were settled may have recorded another)."""
    for sid, rec in records.items():
        known = SlideIdentity.from_record(rec)
        if known is not None and not identity[sid].same_bytes(known):
            raise ShardError(
                f"{found[sid]}: another run recorded slide {sid!r} from {known.uri} meanwhile: "
                "run again"
            )
