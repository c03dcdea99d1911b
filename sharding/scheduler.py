"""The driver's scheduling loop: plan slides as tasks, then keep a bounded window of chunk tasks
in flight, interleaving slides round-robin so that shards mix slides, and feed each split's
:class:`~sharding.shardwriter.ShardWriter`. A failing slide is reported and dropped; the others go
on."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .executors import cluster_cpus
from .extract import SlideJob, SlidePlan, extract_chunk, plan_slide
from .options import AnnotationOptions, ShardOptions
from .qc import write_qc
from .shard_report import ShardReport
from .shardwriter import ShardWriter
from .slide import SlideError
from .state import record_plan
from .storage import Storage


def drive(
    jobs: list[SlideJob],
    settings: tuple[ShardOptions, AnnotationOptions | None],
    executor,
    writers: dict[str, ShardWriter],
    store: Storage,
    published: dict[str, set[str]],
    report: ShardReport,
    progress: bool,
    chunk_regions: int,
    check: Callable[[], None] = lambda: None,
    on_plan: Callable[[SlidePlan], None] = lambda plan: None,
) -> None:
    """Plan slides, then keep a bounded window of chunk tasks running until every slide is done.

    ``check`` is called before each result is used; it raises to stop the run (a lost lease).
    ``on_plan`` is called with each slide's plan before anything of the slide is written.
    """
    from .progress import ShardProgress

    opts, ann_opts = settings
    window = max(2, 2 * cluster_cpus(executor))
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
                    in_flight[executor.submit(plan_slide, job, opts, ann_opts)] = ("plan", job)
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
            check()
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
                on_plan(plan)
                record_plan(store, plan)
                write_qc(store, job.slide, plan.qc)
                report.problems.extend(plan.problems)
                todo = plan.regions(published.get(job.slide, set()))
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
