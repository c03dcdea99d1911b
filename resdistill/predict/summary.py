"""What ``predict`` shows: live progress (slides done of all, tiles per second) and the final
table, magnifications as users write them (:func:`sharding.magnification.display_mag`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["REFRESH_PER_SECOND", "Progress", "summary_table"]

#: Redraws of the progress line a second: its thread's CPU, in the driver beside the writing of
#: every slide's outputs, grows with the run's wall time (at rich's default of 10, 0.9-1.5% of a
#: core with 20 updates a second; at 2, 0.5%).
REFRESH_PER_SECOND = 2


class Progress:
    """Slides done of ``total`` and tiles per second, on ``console`` (stderr)."""

    def __init__(self, console: Any, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TextColumn("slides"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
            refresh_per_second=REFRESH_PER_SECOND,
        )  # fmt: skip
        self.task = self.bar.add_task("slides", total=total, rate="")
        self.n_tiles = self.planned_tiles = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def say(self, line: str) -> None:
        self.bar.console.print(line, soft_wrap=True)

    def planned(self, n_tiles: int) -> None:
        self.planned_tiles += n_tiles

    def tiles(self, n: int) -> None:
        self.n_tiles += n
        rate = self.n_tiles / max(1e-9, time.perf_counter() - self.t0)
        self.bar.update(
            self.task, rate=f"{self.n_tiles}/{self.planned_tiles} tiles, {rate:.0f} tiles/s"
        )

    def slide_done(self) -> None:
        self.bar.advance(self.task)


def summary_table(
    setup: Any,
    new: Sequence[Mapping[str, Any]],
    done_before: int,
    failures: Mapping[str, tuple[str, str]],
    seconds: float,
) -> Any:
    """One row per slide predicted by this run, a caption with the run's totals (slides done
    before and skipped, failures, tiles/s, with the cascade the share escalated and the counted
    FLOPs against the teacher alone)."""
    from rich.table import Table

    from sharding.magnification import display_mag

    model = setup.model
    title = f"{model.name} ({model.meta.get('arch')} at {display_mag(model.mag)})"
    if setup.teacher is not None:
        title += f" + teacher at {display_mag(setup.teacher.mag)} under {setup.threshold:g}"
    cascade = setup.teacher is not None
    table = Table(title=title, header_style="bold")
    cols = ["slide", "class", "probability", "tiles", "grid", "seconds"]
    for col in cols + (["escalated", "GFLOPs"] if cascade else []):
        table.add_column(col)
    tiles = escalated = flops = 0
    for doc in new:
        row = [
            doc["slide_id"], doc["class"], f"{max(doc['probabilities'].values()):.3f}",
            str(doc["n_tiles"]), f"{doc['grid']['rows']}x{doc['grid']['cols']}",
            f"{doc['seconds']:.1f}",
        ]  # fmt: skip
        tiles += doc["n_tiles"]
        flops += doc["flops"]
        if cascade:
            escalated += doc["escalated"]
            row += [f"{doc['escalated'] / max(1, doc['n_tiles']):.1%}", f"{doc['flops'] / 1e9:.2f}"]
        table.add_row(*row)
    parts = [f"{len(new)} predicted", f"{done_before} done before (skipped)"]
    parts.append(f"{len(failures)} failed")
    parts.append(f"{tiles} tiles in {seconds:.1f} s ({tiles / max(seconds, 1e-9):.0f} tiles/s)")
    if cascade and tiles:
        alone = tiles * setup.flops[1]
        parts.append(
            f"escalated {escalated / tiles:.1%}; {flops / 1e9:.2f} GFLOPs, "
            f"{flops / alone:.0%} of the teacher alone"
        )
    table.caption = "; ".join(parts)
    return table
