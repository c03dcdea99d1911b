"""The evidence behind the CLI's training defaults: `resdistill study` on several synthetic cohorts,
once per recipe (the teacher's and the students' options), on the cells that decide a default.

Every recipe spells out all the options it compares, so a rerun after the defaults change still
compares the same recipes. Per cohort and recipe the grid is the teacher at 10x and the 2.5x
student (baseline and distilled, all unlabelled slides) at label fractions 1 and 0.1, one seed;
the first recipe writes the cohort's slides and shards, the others reuse them.

    python benchmarks/choose_defaults.py --out /tmp/defaults            # run (resumable) + table
    python benchmarks/choose_defaults.py --out /tmp/defaults --table    # the table only

Prints one row per cohort and recipe: teacher, distilled and baseline test accuracy at each
label fraction, the distilled student's gap to its teacher (all labels) and its lead over the
baseline (10% labels), the two quality bars of the study.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

#: name -> (teacher options, student options, recipe whose teachers it reuses or "", more
#: `resdistill study` options); every option a recipe changes is spelled out
RECIPES: dict[str, tuple[str, str, str, str]] = {
    "previous": ("--jitter 0.2,0.2,0.2,0.05 --hed-jitter 0",
                 "--temperature 1 --jitter 0.2,0.2,0.2,0.05 --hed-jitter 0", "", ""),
    "stain": ("--jitter 0.5,0.5,0.5,0.2 --hed-jitter 0.05",
              "--temperature 4 --jitter 0 --hed-jitter 0", "", ""),
    "kd4": ("", "--temperature 4 --jitter 0 --hed-jitter 0", "previous", ""),
    "kd4-1.25x": ("", "--temperature 4 --jitter 0 --hed-jitter 0", "previous",
                  "--student-mags 1.25x --label-fractions 1"),
    # attention transfer needs 2x2 student maps: 64 px tiles, the 5x student of these cohorts
    "kd-5x": ("", "--temperature 4 --jitter 0 --hed-jitter 0", "stain",
              "--student-mags 5x --label-fractions 1"),
    "attention-5x": ("", "--temperature 4 --jitter 0 --hed-jitter 0 --attention-weight 1",
                     "stain", "--student-mags 5x --label-fractions 1"),
}  # fmt: skip
COHORTS = ("sites", "subtle", "default")


def study_fractions(argv: list[str]) -> tuple[float, ...]:
    """The label fractions ``resdistill study`` runs with the options ``argv``: their
    ``--label-fractions``, else the study's default (:class:`StudyConfig`'s)."""
    from resdistill.study.config import StudyConfig

    if "--label-fractions" not in argv:
        return StudyConfig().label_fractions
    text = argv[argv.index("--label-fractions") + 1]
    return StudyConfig(
        label_fractions=tuple(float(v) for v in text.split(",") if v)
    ).label_fractions


def run_one(out: Path, cohort: str, recipe: str, epochs: int, extra: list[str]) -> int:
    """``resdistill study`` for one cohort and recipe (resumed if it has cells already), on the
    cohort's dataset of an earlier recipe if there is one, with the teachers of the recipe it
    names (their cell records' checkpoints) if any."""
    teacher_args, student_args, teachers_from, more = RECIPES[recipe]
    folder = out / cohort / recipe
    argv = [sys.executable, "-m", "resdistill", "study", "--out", str(folder),
            "--student-mags", "2.5x", "--unlabelled-shares", "1", "--seeds", "1",
            "--epochs", str(epochs), "--student-epochs", str(epochs),
            "--teacher-args", teacher_args, "--student-args", student_args,
            *shlex.split(more), *extra]  # fmt: skip
    made = [out / cohort / r / "dataset" for r in RECIPES if r != recipe]
    made = [d for d in made if (d / "dataset.json").exists()]
    argv += ["--data", str(made[0])] if made else ["--cohort", cohort]
    fractions = study_fractions(shlex.split(more))
    for fraction in fractions if teachers_from else ():
        cell = out / cohort / teachers_from / "cells" / f"teacher-10x-l{fraction:g}-s0.json"
        argv += ["--teacher", f"{fraction:g}={json.loads(cell.read_text())['checkpoint']}"]
    if (folder / "cells").is_dir():
        argv.append("--resume")
    print("+", shlex.join(argv[1:]), flush=True)
    return subprocess.call(argv)


def rows(out: Path) -> list[dict[str, object]]:
    """One row per cohort and recipe with a study.csv: accuracies and the two bars' gaps."""
    table = []
    for cohort in COHORTS:
        for recipe in RECIPES:
            path = out / cohort / recipe / "study.csv"
            if not path.exists():
                continue
            acc, mags = {}, set()
            with path.open() as f:
                for r in csv.DictReader(f):
                    acc[(r["kind"], float(r["label_fraction"]))] = float(r["accuracy"])
                    mags |= {r["mag"]} if r["kind"] != "teacher" else set()
            row: dict[str, object] = {"cohort": cohort, "recipe": recipe, "student": ",".join(mags)}
            for fr in (1.0, 0.1):
                for kind in ("teacher", "distilled", "baseline"):
                    row[f"{kind}@{fr:g}"] = acc.get((kind, fr))
            t, d = row["teacher@1"], row["distilled@1"]
            d10, b10 = row["distilled@0.1"], row["baseline@0.1"]
            row["distilled-teacher@1"] = None if None in (t, d) else 100 * (d - t)  # type: ignore[operator]
            row["distilled-baseline@0.1"] = None if None in (d10, b10) else 100 * (d10 - b10)  # type: ignore[operator]
            table.append(row)
    return table


def markdown(table: list[dict[str, object]]) -> str:
    if not table:
        return "(no finished study)"
    keys = list(table[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in table:
        cells = [f"{v:.3f}" if isinstance(v, float) and not k.startswith("distilled-") else
                 f"{v:+.1f}" if isinstance(v, float) else "-" if v is None else str(v)
                 for k, v in r.items()]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="root of the studies (one folder per cohort)")
    p.add_argument("--cohorts", default=",".join(COHORTS), help="comma list of synth cohorts")
    p.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES)
    )
    p.add_argument("--epochs", type=int, default=20, help="teachers' and students' epochs")
    p.add_argument("--table", action="store_true", help="print the table of finished studies only")
    p.add_argument("--study-args", default="", help="more `resdistill study` options")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}: use {', '.join(RECIPES)}")
    failed = 0
    if not args.table:
        for cohort in (c for c in args.cohorts.split(",") if c):
            for recipe in recipes:
                rc = run_one(out, cohort, recipe, args.epochs, shlex.split(args.study_args))
                failed += rc != 0
    print(markdown(rows(out)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
