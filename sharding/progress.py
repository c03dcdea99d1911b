"""Progress bars and the closing summary of a sharding run (rich, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


class ShardProgress:
    """Two bars: slides finished of those to do, and tiles cut (with tiles/s)."""

    def __init__(self, slides: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<7}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.slides = self.progress.add_task("slides", total=slides, rate="")
        self.tile_task = self.progress.add_task("tiles", total=0, rate="")
        self._tiles_total = 0

    def __enter__(self) -> ShardProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def slide_done(self) -> None:
        self.progress.advance(self.slides)

    def slide_failed(self, message: str) -> None:
        self.progress.console.print(
            f"[red]skipped[/red] {message}", highlight=False, soft_wrap=True
        )
        self.progress.advance(self.slides)

    def add_tiles_total(self, n: int) -> None:
        self._tiles_total += n
        self.progress.update(self.tile_task, total=self._tiles_total)

    def tiles(self, n: int) -> None:
        self.progress.advance(self.tile_task, n)
        task = self.progress.tasks[self.tile_task]
        speed = task.finished_speed or task.speed
        self.progress.update(self.tile_task, rate=f"{speed:,.0f} tiles/s" if speed else "")


def print_summary(report) -> None:
    """The closing table: per split slides / samples / shards, then what was skipped and why."""
    table = Table(title=f"Sharded into {report.url}", title_justify="left")
    table.add_column("split")
    for col in ("slides", "samples", "shards"):
        table.add_column(col, justify="right")
    total = [0, 0, 0]
    for split, c in report.counts.items():
        table.add_row(split, f"{c.slides:,}", f"{c.samples:,}", f"{c.shards:,}")
        total = [total[0] + c.slides, total[1] + c.samples, total[2] + c.shards]
    table.add_row("[bold]total", *(f"[bold]{v:,}" for v in total))
    console.print(table)
    console.print(
        f"{report.new_samples:,} new tiles in {report.seconds:.1f}s "
        f"({report.tiles_per_s:,.1f} tiles/s); {report.done_before} slide(s) already done before."
    )
    if report.skipped:
        skipped = Table(title=f"Skipped {len(report.skipped)} slide(s)", title_justify="left")
        skipped.add_column("slide")
        skipped.add_column("reason")
        for name, reason in sorted(report.skipped.items()):
            skipped.add_row(name, reason)
        console.print(skipped)
    other = [p for p in report.problems if not any(p.startswith(s) for s in report.skipped)]
    for line in other:
        console.print(f"[yellow]problem[/yellow] {line}", highlight=False, soft_wrap=True)
