"""The study's table (one row per cell over its seeds), the claims' checks from it, and the
report folder: ``study.csv`` and ``study.parquet``, ``summary.md``, the two figures.

Pooling seeds. A row's accuracy is the mean over seeds of each seed's test-tile accuracy, its
spread the standard deviation over seeds, and its 95% interval the slide-clustered bootstrap
(:func:`resdistill.measures.bootstrap.bootstrap_ci`, 1000 resamples of the test slides, each drawn
slide bringing all its tiles) of that mean: every seed scores the same tiles, so a resample is
applied to all seeds at once. A difference of two rows (claim 2) is bootstrapped the same way,
paired on the slides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resdistill.study.claims import Claim, approach, beats, judge, rises
from resdistill.study.grid import KIND_BASELINE, KIND_DISTILLED, KIND_TEACHER
from resdistill.study.records import cell_of, write_atomic

N_BOOT = 1000


@dataclass(frozen=True)
class Row:
    """One cell of the grid over its seeds."""

    kind: str
    mag: str  # as users write it (display_mag)
    label_fraction: float
    unlabelled_share: float | None
    seeds: int
    accuracy: float  # mean over seeds
    accuracy_std: float
    accuracy_low: float
    accuracy_high: float
    macro_f1: float
    flops: int
    flops_ratio: float  # the teacher's FLOPs per tile / this model's


def _correct(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(correct (N, seeds), slide (N,))`` on the test tiles, aligned by key."""
    keys = records[0]["keys"]
    slides = np.asarray(records[0]["slides"])
    cols = []
    for r in records:
        index = dict(zip(r["keys"], r["correct"], strict=True))
        cols.append([index[k] for k in keys])
    return np.asarray(cols, dtype=float).T, slides


def pooled_ci(per_tile: np.ndarray, slides: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% slide-bootstrap interval of ``mean(per_tile)`` (one value per test tile)."""
    from resdistill.measures.bootstrap import bootstrap_ci

    _, low, high = bootstrap_ci(
        lambda t, _p: float(np.mean(t)), per_tile, per_tile, n=N_BOOT, seed=seed, groups=slides
    )
    return low, high


def group_records(
    records: Mapping[str, Mapping[str, Any]],
) -> dict[tuple, list[Mapping[str, Any]]]:
    """Records by :attr:`Cell.group` (the cell without its seed), seeds in order."""
    out: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in sorted(records.values(), key=lambda r: cell_of(r).seed):
        out[cell_of(r).group].append(r)
    return dict(out)


def build_rows(records: Mapping[str, Mapping[str, Any]]) -> list[Row]:
    """The table: one :class:`Row` per group of cells, teachers first, then by magnification."""
    from sharding.magnification import Magnification, display_mag

    groups = group_records(records)
    teacher_flops = max((r["flops"] for r in records.values()
                         if cell_of(r).kind == KIND_TEACHER), default=0)  # fmt: skip
    rows = []
    for (kind, mag, fraction, share), recs in groups.items():
        correct, slides = _correct(recs)
        per_seed = correct.mean(axis=0)
        low, high = pooled_ci(correct.mean(axis=1), slides)
        flops = int(recs[0]["flops"])
        rows.append(Row(kind, display_mag(mag), fraction, share, len(recs),
                        float(per_seed.mean()), float(per_seed.std()), low, high,
                        float(np.mean([r["macro_f1"]["value"] or 0 for r in recs])), flops,
                        teacher_flops / flops if flops and teacher_flops else float("nan")))  # fmt: skip
    order = {KIND_TEACHER: 0, KIND_BASELINE: 1, KIND_DISTILLED: 2}
    rows.sort(key=lambda r: (-Magnification.parse(r.mag).power, -r.label_fraction,
                             order[r.kind], r.unlabelled_share or 0))  # fmt: skip
    return rows


def _find(rows: Sequence[Row], kind: str, fraction: float, share: float | None = None,
          mag: str | None = None) -> Row | None:  # fmt: skip
    for r in rows:
        if (r.kind == kind and r.label_fraction == fraction and r.unlabelled_share == share
                and (mag is None or r.mag == mag)):  # fmt: skip
            return r
    return None


def check_claims(rows: Sequence[Row], records: Mapping[str, Mapping[str, Any]]) -> list[Claim]:
    """The claims' checks on the table (see :mod:`resdistill.study.claims`)."""
    from sharding.magnification import display_mag

    groups = group_records(records)
    fractions = sorted({r.label_fraction for r in rows})
    mags = list(dict.fromkeys(r.mag for r in rows if r.kind != KIND_TEACHER))
    full, few = max(fractions, default=1.0), min(fractions, default=1.0)
    c1, c2, c3 = [], [], []
    teacher = _find(rows, KIND_TEACHER, full)
    for mag in mags:
        top = max((r.unlabelled_share for r in rows if r.kind == KIND_DISTILLED
                   and r.mag == mag), default=None)  # fmt: skip
        dist = _find(rows, KIND_DISTILLED, full, top, mag)
        if teacher and dist:
            c1.append(approach(mag, dist.accuracy, teacher.accuracy, dist.flops_ratio))
        d_few = _find(rows, KIND_DISTILLED, few, top, mag)
        b_few = _find(rows, KIND_BASELINE, few, None, mag)
        if few < 1 and d_few and b_few:
            name = {display_mag(k[1]): k for k in groups}
            dk = (KIND_DISTILLED, name[mag][1], few, top)
            bk = (KIND_BASELINE, name[mag][1], few, None)
            cd, slides = _correct(groups[dk])
            cb, _ = _correct(groups[bk])
            low, high = pooled_ci(cd.mean(axis=1) - cb.mean(axis=1), slides)
            what = f"{mag}, {100 * few:g}% of the slides labelled"
            c2.append(beats(what, d_few.accuracy, b_few.accuracy, low, high))
        for fraction in fractions:
            curve = [(r.unlabelled_share, r.accuracy, r.accuracy_std) for r in rows
                     if r.kind == KIND_DISTILLED and r.mag == mag
                     and r.label_fraction == fraction]  # fmt: skip
            if len(curve) > 1:  # a single share is no curve
                c3.append(rises(f"{mag}, {100 * fraction:g}% labelled", curve))
    return judge(c1, c2, c3)


def write_table(rows: Sequence[Row], out: Path) -> list[Path]:
    """``study.csv`` and ``study.parquet``: every row, each written whole
    (:func:`~resdistill.study.records.write_atomic`)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([asdict(r) for r in rows])
    for name, write in (("study.parquet", pq.write_table), ("study.csv", pcsv.write_csv)):
        sink = pa.BufferOutputStream()
        write(table, sink)
        write_atomic(out / name, sink.getvalue().to_pybytes())
    return [out / "study.csv", out / "study.parquet"]


def _share(r: Row) -> str:
    return "-" if r.unlabelled_share is None else f"{100 * r.unlabelled_share:g}%"


def summary_markdown(rows: Sequence[Row], claims: Sequence[Claim], header: str) -> str:
    """``summary.md``: the claims with their verdicts and rules, then the table."""
    lines = ["# resdistill study", "", header, "", "## The paper's claims", ""]
    for c in claims:
        lines += [f"{c.number}. **{c.statement}: {c.word}.**", f"   Rule: {c.rule}."]
        for v in c.verdicts:
            lines.append(f"   - {v.what}: {'holds' if v.holds else 'does not hold'}; {v.detail}")
        lines.append("")
    lines += ["## Every cell (test split, mean over seeds)", "",
              "| model | mag | labels | unlabelled | seeds | accuracy [95% CI] | std | macro F1 "
              "| FLOPs/tile | fewer FLOPs |", "|" + " --- |" * 10]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.mag} | {100 * r.label_fraction:g}% | {_share(r)} | {r.seeds} | "
            f"{r.accuracy:.3f} [{r.accuracy_low:.3f}, {r.accuracy_high:.3f}] | "
            f"{r.accuracy_std:.3f} | {r.macro_f1:.3f} | {r.flops / 1e6:.1f} M | "
            f"{r.flops_ratio:.0f}x |"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Row], claims: Sequence[Claim], console: Any) -> None:
    """The final rich table and one line per claim."""
    from rich.table import Table

    t = Table(title="study: test accuracy, mean over seeds [95% slide CI]")
    for col in ("model", "mag", "labels", "unlabelled", "seeds", "accuracy", "std", "FLOPs/tile"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.kind, r.mag, f"{100 * r.label_fraction:g}%", _share(r), str(r.seeds),
                  f"{r.accuracy:.3f} [{r.accuracy_low:.3f}, {r.accuracy_high:.3f}]",
                  f"{r.accuracy_std:.3f}", f"{r.flops / 1e6:.1f} M")  # fmt: skip
    console.print(t)
    for c in claims:
        colour = {True: "green", False: "red", None: "yellow"}[c.holds]
        console.print(f"claim {c.number} ({c.statement}): [{colour}]{c.word}[/]")


def write_report(records: Mapping[str, Mapping[str, Any]], out: Path, header: str,
                 console: Any = None) -> tuple[list[Row], list[Claim]]:  # fmt: skip
    """Write the report folder from the cells' records; ``(rows, claims)``."""
    from resdistill.study.plots import plot_flops, plot_unlabelled

    rows = build_rows(records)
    claims = check_claims(rows, records)
    write_table(rows, out)
    write_atomic(out / "summary.md", summary_markdown(rows, claims, header).encode())
    plot_flops(rows, out / "accuracy_vs_flops.png")
    plot_unlabelled(rows, out / "accuracy_vs_unlabeled.png")
    if console is not None:
        print_table(rows, claims, console)
    return rows, claims
