"""``resdistill shard``: slides -> multi-magnification WebDataset shards + manifest, resumable."""

from __future__ import annotations

from resdistill.commands.generate import CommandSpec
from sharding.options import ShardConfig

SPEC = CommandSpec(
    name="shard",
    config=ShardConfig,
    summary="tile slides at several magnifications into WebDataset shards plus a manifest",
    description="""\
Every sample is one region of tissue at every requested magnification (highest first; the tile
at --tile-px pixels at the highest, proportionally smaller below; --low-mags-from says whether
the lower ones are reduced from the highest one's read or read from the slide's own pyramid
levels). Output goes to a local folder or to s3://bucket/prefix (endpoint and credentials from
the standard AWS environment, e.g. AWS_ENDPOINT_URL), with the run's options in
<out>/config.yaml. Reruns resume: finished slides are skipped, half-written shards discarded.
One run at a time holds an output (a lease in <out>/_state/lease.json); a second is refused.

Region annotations (--annotations, QuPath GeoJSON) label each region by the class covering most
of it, drop regions touching an ignored class, and restrict tiling to regions of interest.

exit codes: 0 all slides sharded; 1 some slides, label rows or annotations skipped or repaired
(listed); 2 unusable options.""",
    examples=(
        "resdistill shard slides/ --out shards/ --labels labels.csv",
        "resdistill shard slides/ --out s3://bucket/ds --mags 20,10,5 --tile-px 256 --address auto",
        "resdistill shard slides/ --out shards/ --annotations geojson/ --annotated-only",
        "resdistill shard --config shards/config.yaml --out shards-png --format png",
    ),
)


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, a scheduler's kill) unwinds like Ctrl-C, so the run releases
    its lease on the output and aborts its unpublished shards."""
    import contextlib
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not the main thread: leave signals to the caller
        signal.signal(signal.SIGTERM, interrupt)


def run(cfg: ShardConfig) -> int:
    """Shard what ``cfg`` says, write ``<out>/config.yaml`` once the dataset is published, print
    the notes and the summary table: 0 all sharded, 1 some input skipped (listed), 2 unusable
    labels, annotations or output (nothing written then)."""
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from sharding.labels import LabelsError
    from sharding.pipeline import ShardError, shard_slides
    from sharding.progress import console, print_summary
    from sharding.storage import StorageError

    _interrupt_on_sigterm()
    try:
        report = shard_slides(cfg)
    except (ShardError, LabelsError, StorageError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    # The output is the dataset: no fingerprint of it; _state/config.json keeps resume settings.
    if report.published:  # no slide read, nothing written
        write_run_config(cfg.out, "shard", to_plain(cfg))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    print_summary(report)
    return 0 if report.ok else 1
