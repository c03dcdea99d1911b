"""The study's table (one row per cell over its seeds), the claims' checks from it, and the
report folder: ``study.csv`` and ``study.parquet``, ``summary.md``, the two figures.

Pooling seeds. A row's value is the mean over seeds of each seed's test metric, its spread the
standard deviation over seeds, and its 95% interval the two-level bootstrap of
:func:`resdistill.measures.paired.arm_interval`: :data:`N_BOOT` resamples of the test units
(patients where the manifest names them, else slides), drawn within their class and each bringing
all its tiles, and of the seeds, so seed-to-seed variance is in the interval. Tile level:
accuracy, balanced accuracy, macro F1. Slide level: accuracy of each slide's prediction, the
argmax of its tiles' mean probability, against its tiles' predominant label. A difference of two
rows (:func:`compare`) is the paired bootstrap of
:func:`~resdistill.measures.paired.paired_difference`: both rows' cells scored the same test
tiles, so one draw of units serves both, and seeds of one number are drawn together.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resdistill.measures.paired import Estimate, Run, arm_interval, paired_difference, points
from resdistill.study.claims import (
    Claim,
    Verdict,
    beats_control,
    gain,
    judge,
    non_inferior,
    rises,
)
from resdistill.study.grid import ABLATION_KINDS, KIND_BASELINE, KIND_DISTILLED, KIND_TEACHER, KINDS
from resdistill.study.records import cell_of, write_atomic

N_BOOT = 1000
Records = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Row:
    """One cell of the grid over its seeds; an interval that is not defined (module doc of
    :mod:`resdistill.measures.bootstrap`) is NaN."""

    kind: str
    mag: str  # as users write it (display_mag)
    label_fraction: float
    unlabelled_share: float | None
    seeds: int
    accuracy: float  # mean over seeds of the test-tile accuracy
    accuracy_std: float  # over seeds
    accuracy_low: float
    accuracy_high: float
    balanced_accuracy: float
    balanced_accuracy_low: float
    balanced_accuracy_high: float
    macro_f1: float
    macro_f1_low: float
    macro_f1_high: float
    slide_accuracy: float  # slide level: argmax of the mean tile probability
    slide_accuracy_low: float
    slide_accuracy_high: float
    unit: str  # what the bootstrap resampled: patient or slide
    units: int
    flops: int
    flops_ratio: float  # the teacher's FLOPs per tile / this model's


def runs_of(records: Records, level: str = "tile", legacy: bool | None = None) -> list[Run]:
    """The records' test predictions as :class:`~resdistill.measures.paired.Run`\\ s named by
    seed, at ``level`` ``"tile"`` or ``"slide"``; a record's ``block`` (a cohort seed or fold,
    when the grid has several test sets) is its test set. Records written before they kept
    labels hold only each tile's correctness: with one of them among ``records`` (``legacy``),
    every run is read that way, its slides the units, and scores accuracy alone."""
    if legacy is None:
        legacy = not _has(records, "tile")
    out = []
    for r in records:
        name, block = str(cell_of(r).seed), str(r.get("block", ""))
        if level == "slide":
            s = r["slide_level"]
            out.append(Run(s["slides"], s["units"], s["labels"], s["preds"], name, block))
        elif not legacy:
            out.append(Run(r["keys"], r["units"], r["labels"], r["preds"], name, block))
        else:
            wrong = 1 - np.asarray(r["correct"], dtype=np.int64)
            out.append(Run(r["keys"], r["slides"], np.zeros_like(wrong), wrong, name, block))
    return out


def _unit(records: Records) -> str:
    return str(records[0].get("unit", "slide")) if _has(records, "tile") else "slide"


def _has(records: Records, level: str) -> bool:
    return all(("slide_level" if level == "slide" else "labels") in r for r in records)


def interval_of(records: Records, metric: str = "accuracy", level: str = "tile") -> Estimate:
    """The seeds' mean ``metric`` with its two-level interval (module doc)."""
    return arm_interval(runs_of(records, level), metric, n_boot=N_BOOT, unit=_unit(records))


def compare(a: Records, b: Records, metric: str = "accuracy", level: str = "tile") -> Estimate:
    """``metric(a) - metric(b)`` of two cells' records (each over its seeds) with its paired
    two-level interval (module doc): what every claim reads; a study with more arms (controls)
    compares them the same way."""
    both = [*a, *b]
    legacy = not _has(both, "tile")
    return paired_difference(runs_of(a, level, legacy), runs_of(b, level, legacy), metric,
                             n_boot=N_BOOT, unit=_unit(both))  # fmt: skip


def _bounds(records: Records, metric: str, level: str = "tile") -> tuple[float, float, float]:
    """``(value, low, high)``, NaN where undefined or where older records lack the fields."""
    nan = math.nan
    if (level == "slide" or metric != "accuracy") and not _has(records, level):
        return nan, nan, nan
    e = interval_of(records, metric, level)
    return (e.value, *_lo_hi(e))


def _lo_hi(e: Estimate) -> tuple[float, float]:
    return (math.nan, math.nan) if e.low is None or e.high is None else (e.low, e.high)


def group_records(
    records: Mapping[str, Mapping[str, Any]],
) -> dict[tuple, list[Mapping[str, Any]]]:
    """Records by :attr:`Cell.group` (the cell without its seed), seeds in order. A tuning
    trial's record (a cell with a ``trial``) is no reported cell and is left out."""
    out: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in sorted(records.values(), key=lambda r: cell_of(r).seed):
        if getattr(cell_of(r), "trial", None) is None:
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
        per_seed = np.array([np.mean(r["correct"]) for r in recs])
        acc = interval_of(recs)
        flops = int(recs[0]["flops"])
        rows.append(Row(
            kind, display_mag(mag), fraction, share, len(recs), acc.value, float(per_seed.std()),
            *_lo_hi(acc), *_bounds(recs, "balanced_accuracy"), *_bounds(recs, "macro_f1"),
            *_bounds(recs, "accuracy", "slide"), acc.unit, acc.units, flops,
            teacher_flops / flops if flops and teacher_flops else math.nan,
        ))  # fmt: skip
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: (-Magnification.parse(r.mag).power, -r.label_fraction,
                             order.get(r.kind, len(order)), r.kind,
                             r.unlabelled_share or 0))  # fmt: skip
    return rows


def _slide_note(a: Records, b: Records, what: str) -> str:
    """The same comparison at slide level, for the record beside a tile-level verdict."""
    if not (_has(a, "slide") and _has(b, "slide")):
        return ""
    d = compare(a, b, level="slide")
    ci = f"[{points(d.low)}, {points(d.high)}]" if d.defined else f"no interval ({d.why})"
    return f"; slide level: {what} {points(d.value)} points {ci}"


def check_claims(rows: Sequence[Row], records: Mapping[str, Mapping[str, Any]]) -> list[Claim]:
    """The claims' checks (:mod:`resdistill.study.claims`) on the cells' records: paired
    differences of the groups the rules name. Kinds other than teacher, baseline, distilled and
    an ablation's are controls (claim 4): each is compared with the distilled student of its magnification
    and label fraction, at its own unlabelled share when it has the distilled one's."""
    from sharding.magnification import Magnification, display_mag

    groups = group_records(records)
    fractions = sorted({k[2] for k in groups})
    full, few = max(fractions, default=1.0), min(fractions, default=1.0)
    mags = sorted({k[1] for k in groups if k[0] != KIND_TEACHER},
                  key=lambda m: -Magnification.parse(m).power)  # fmt: skip
    controls = sorted({k[0] for k in groups} - set(KINDS) - set(ABLATION_KINDS))
    ratio = {(r.kind, r.mag, r.label_fraction, r.unlabelled_share): r.flops_ratio for r in rows}
    teacher = next((v for k, v in groups.items() if k[0] == KIND_TEACHER and k[2] == full), None)
    c1: list[Verdict] = []
    c2: list[Verdict] = []
    c3: list[Verdict] = []
    c4: list[Verdict] = []
    for mag in mags:
        name = display_mag(mag)
        for fraction in fractions:
            shares = sorted(k[3] for k in groups
                            if k[:3] == (KIND_DISTILLED, mag, fraction))  # fmt: skip
            if not shares:
                continue
            top = groups[(KIND_DISTILLED, mag, fraction, shares[-1])]
            labelled = f"{name}, {100 * fraction:g}% of the slides labelled"
            if fraction == full and teacher:
                flops = ratio.get((KIND_DISTILLED, name, fraction, shares[-1]), math.nan)
                c1.append(non_inferior(name, compare(top, teacher), flops,
                                       _slide_note(top, teacher, "distilled - teacher")))  # fmt: skip
            base = groups.get((KIND_BASELINE, mag, fraction, None))
            if fraction == few < 1 and base:
                c2.append(gain(labelled, compare(top, base),
                               _slide_note(top, base, "distilled - baseline")))  # fmt: skip
            if len(shares) > 1:  # a single share is no curve
                curve = [groups[(KIND_DISTILLED, mag, fraction, u)] for u in shares]
                steps = [compare(b, a) for a, b in zip(curve, curve[1:], strict=False)]
                overall = compare(curve[-1], curve[0]) if len(shares) > 2 else steps[0]
                c3.append(rises(labelled, shares, steps, overall))
            for kind in controls:
                own = sorted((k[3] for k in groups if k[:3] == (kind, mag, fraction)),
                             key=lambda u: -1 if u is None else u)  # fmt: skip
                if own:
                    pick = shares[-1] if shares[-1] in own else own[-1]
                    c4.append(beats_control(labelled, kind,
                                            compare(top, groups[(kind, mag, fraction, pick)])))  # fmt: skip
    return judge(c1, c2, c3, c4 if controls else None)


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


def _ci(value: float, low: float, high: float) -> str:
    """``0.912 [0.880, 0.940]``; ``0.912 [n/a]`` without an interval; ``-`` without a value."""
    if not math.isfinite(value):
        return "-"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f} [n/a]"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def intervals_note(rows: Sequence[Row]) -> str:
    """One line saying what the intervals resample."""
    unit = rows[0].unit if rows else "slide"
    return (f"Intervals: 95% percentile, {N_BOOT} two-level bootstrap resamples of the test "
            f"{unit}s (within their class, each with all its tiles) and of the seeds; a claim's "
            f"difference is paired (the same {unit}s for both arms, seeds of one number drawn "
            "together). [n/a]: a resample missed a class, or too few units for an interval. "
            "Slide accuracy: a slide's prediction is the argmax of its tiles' mean "
            "probability.")  # fmt: skip


def summary_markdown(rows: Sequence[Row], claims: Sequence[Claim], header: str,
                     sections: str = "") -> str:  # fmt: skip
    """``summary.md``: the claims with their rules, checks and verdicts, ``sections``, then the
    table."""
    lines = ["# resdistill study", "", header, "", "## The paper's claims", "",
             intervals_note(rows), ""]  # fmt: skip
    word = {True: "holds", False: "does not hold", None: "not tested"}
    for c in claims:
        lines += [f"{c.number}. **{c.statement}: {c.word}.**", f"   Rule: {c.rule}."]
        for v in c.verdicts:
            lines.append(f"   - {v.what}: {word[v.holds]}; {v.detail}")
        lines.append("")
    if sections:
        lines += [sections.rstrip(), ""]
    lines += ["## Every cell (test split, mean over seeds)", "",
              "| model | mag | labels | unlabelled | seeds | accuracy [95% CI] | std "
              "| balanced accuracy [95% CI] | macro F1 [95% CI] | slide accuracy [95% CI] "
              "| units | FLOPs/tile | fewer FLOPs |", "|" + " --- |" * 13]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.mag} | {100 * r.label_fraction:g}% | {_share(r)} | {r.seeds} | "
            f"{_ci(r.accuracy, r.accuracy_low, r.accuracy_high)} | {r.accuracy_std:.3f} | "
            f"{_ci(r.balanced_accuracy, r.balanced_accuracy_low, r.balanced_accuracy_high)} | "
            f"{_ci(r.macro_f1, r.macro_f1_low, r.macro_f1_high)} | "
            f"{_ci(r.slide_accuracy, r.slide_accuracy_low, r.slide_accuracy_high)} | "
            f"{r.units} {r.unit}s | {r.flops / 1e6:.1f} M | {r.flops_ratio:.0f}x |"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Row], claims: Sequence[Claim], console: Any) -> None:
    """The final rich table and one line per claim."""
    from rich.table import Table

    unit = rows[0].unit if rows else "slide"
    t = Table(title=f"study: test accuracy, mean over seeds [95% CI over {unit}s and seeds]")
    for col in ("model", "mag", "labels", "unlabelled", "seeds", "accuracy", "std",
                "macro F1", "slide acc", "FLOPs/tile"):  # fmt: skip
        t.add_column(col)
    for r in rows:
        t.add_row(r.kind, r.mag, f"{100 * r.label_fraction:g}%", _share(r), str(r.seeds),
                  _ci(r.accuracy, r.accuracy_low, r.accuracy_high), f"{r.accuracy_std:.3f}",
                  _ci(r.macro_f1, r.macro_f1_low, r.macro_f1_high),
                  _ci(r.slide_accuracy, r.slide_accuracy_low, r.slide_accuracy_high),
                  f"{r.flops / 1e6:.1f} M")  # fmt: skip
    console.print(t)
    for c in claims:
        colour = {True: "green", False: "red", None: "yellow"}[c.holds]
        console.print(f"claim {c.number} ({c.statement}): [{colour}]{c.word}[/]")


def write_report(records: Mapping[str, Mapping[str, Any]], out: Path, header: str,
                 console: Any = None, sections: str = "") -> tuple[list[Row], list[Claim]]:  # fmt: skip
    """Write the report folder from the cells' records; ``(rows, claims)``. ``sections``:
    more of ``summary.md`` after the claims (e.g. an ablation's, markdown)."""
    from resdistill.study.plots import plot_flops, plot_unlabelled

    rows = build_rows(records)
    claims = check_claims(rows, records)
    write_table(rows, out)
    write_atomic(out / "summary.md", summary_markdown(rows, claims, header, sections).encode())
    plot_flops(rows, out / "accuracy_vs_flops.png")
    plot_unlabelled(rows, out / "accuracy_vs_unlabeled.png")
    if console is not None:
        print_table(rows, claims, console)
    return rows, claims
