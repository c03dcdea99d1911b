"""The evidence behind the CLI's training defaults: `resdistill study` on several synthetic cohorts,
once per recipe (the teacher's and the students' options), on the cells that decide a default,
the choice made on VALIDATION metrics only.

Every recipe spells out all the options it compares, so a rerun after the defaults change still
compares the same recipes. Per cohort and recipe the grid is the teacher at 10x and the 2.5x
student (baseline and distilled, all unlabelled slides) at label fractions 1 and 0.1, one seed,
no recipe search inside the study (``--trials 1``: the recipe is what is compared) and no
controls; the first recipe writes the cohort's slides and shards, the others reuse them.

    python benchmarks/choose_defaults.py --out /tmp/defaults            # run (resumable) + table
    python benchmarks/choose_defaults.py --out /tmp/defaults --table    # the table only

Reads each study's ``validation.csv`` (:mod:`resdistill.study.protocol`: the validation metrics
of every cell's kept checkpoint), never ``study.csv`` (the test split, for the report alone):
:func:`read_validation` refuses a table holding any other metric than ``val_*``. Prints one row
per cohort and recipe: teacher, distilled and baseline validation accuracy at each label
fraction, the distilled student's gap to its teacher (all labels) and its lead over the baseline
(10% labels), and per arm (distilled, baseline, teacher) the chosen recipe: the highest mean
over cohorts and label fractions of *that arm's* validation accuracy, among the recipes every
cohort ran, so the baseline's defaults follow its own evidence, never the distilled student's.
The chosen defaults are then scored on test once, by a study of their own.

Groups of recipes, each run on every cohort before the next and each choosing only its arms:
``jitter`` (``defaults``, ``students-light``, ``students-paper``) the students' colour jitter over
the study's own jitter space (off, light, the paper's) from one set of default teachers, for the
distilled and the baseline arm; ``teachers`` (``defaults``, ``teachers-off``, ``teachers-paper``)
the teacher's jitter over the same space, for the teacher arm; ``temperature`` (``kd-t1``,
``kd-t2``, ``kd-t4``, ``kd-t8``) the KD temperature of students of the teachers ``teachers``
chose, for the distilled arm. The protocol's order: the teacher first on its own score, then
its students. Recipes that leave the baseline's options alone (:data:`BASELINE_FROM`) keep the
defaults' baseline cells rather than training them again.

The recipe ``feature-term`` runs the study's feature-term ablation (``--ablations feature-term``)
with the CLI's defaults on the teachers ``teachers`` chose: the distilled student with the
feature term off, on its last map (the paper) and on a spatial grid. :func:`choose_feature`
ranks the three variants by the same rule (mean over cohorts and
label fractions of their validation accuracy; each row's variant is validation.csv's
``feature_term``), which is what ``--feature-grid`` / ``--feature-weight``'s defaults follow.
Run it on cohort seeds the report does not use (``--study-args "--seed 1"``).
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
    # the feature term's three variants, students of the chosen teachers with the CLI defaults
    "feature-term": ("", "", "chosen-teacher", "--ablations feature-term"),
    # the students' colour jitter, chosen per arm (ARMS) over the study's own jitter space
    # (resdistill.study.recipes.SPACE: off, light, the paper's) from one set of default teachers
    "defaults": ("", "", "", ""),
    "students-light": ("", "--jitter 0.2,0.2,0.2,0.05", "defaults", ""),
    "students-paper": ("", "--jitter 0.5,0.5,0.5,0.2", "defaults", ""),
    # the teacher's colour jitter over the same space, chosen on the teacher's validation alone
    "teachers-off": ("--jitter 0", "", "", ""),
    "teachers-paper": ("--jitter 0.5,0.5,0.5,0.2", "", "", ""),
    # the KD temperature, students of the chosen teachers
    "kd-t1": ("", "--temperature 1", "chosen-teacher", ""),
    "kd-t2": ("", "--temperature 2", "chosen-teacher", ""),
    "kd-t4": ("", "--temperature 4", "chosen-teacher", ""),
    "kd-t8": ("", "--temperature 8", "chosen-teacher", ""),
}  # fmt: skip
#: a recipe's teachers-from that stands for the teacher recipe chosen on validation
CHOSEN_TEACHER = "chosen-teacher"
#: the recipes of the per-arm jitter choice (``--recipes jitter``)
JITTER_RECIPES = ("defaults", "students-light", "students-paper")
#: the teacher's jitter (``--recipes teachers``): off, light (the default), the paper's
TEACHER_RECIPES = ("defaults", "teachers-off", "teachers-paper")
#: the temperature (``--recipes temperature``), each spelt out whatever the default is
TEMPERATURE_RECIPES = ("kd-t1", "kd-t2", "kd-t4", "kd-t8")
#: recipe -> the recipe whose baseline cells it shares: same student options for the baseline
#: (a teacher's options and the temperature never reach it), so they are not trained again
BASELINE_FROM = {r: "defaults" for r in ("teachers-off", "teachers-paper", *TEMPERATURE_RECIPES,
                                          "feature-term")}  # fmt: skip
#: group -> (its recipes, the arms chosen on them); a recipe named alone is a group of its own
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "jitter": (JITTER_RECIPES, ("distilled", "baseline")),
    "teachers": (TEACHER_RECIPES, ("teacher",)),
    "temperature": (TEMPERATURE_RECIPES, ("distilled",)),
    "feature-term": (("feature-term",), ()),  # its variants are chosen by choose_feature
}
#: the arms a choice is made for, each on its own validation score
ARMS = ("distilled", "baseline", "teacher")
COHORTS = ("sites", "subtle", "default", "chromatin")
#: the only table read: validation metrics of every group of cells
VALIDATION_CSV = "validation.csv"
#: the columns of validation.csv that are not metrics; every metric is a ``val_*`` one
KEY_COLUMNS = frozenset({"kind", "mag", "label_fraction", "unlabelled_share", "seeds", "select",
                         "labelled_val_slides", "recipe", "feature_term"})  # fmt: skip
#: the validation metric the choice ranks by
METRIC = "val_accuracy"


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


def chosen_teacher(out: Path, cohorts: list[str]) -> str:
    """The teacher recipe of :data:`TEACHER_RECIPES` the teacher arm chooses on validation over
    ``cohorts``; ValueError until every one of them ran on every cohort."""
    table = [r for r in rows(out) if r["recipe"] in TEACHER_RECIPES and r["cohort"] in cohorts]
    best, scores = choose(table, "teacher")
    if best is None or set(scores) != set(TEACHER_RECIPES):
        raise ValueError(f"the teacher recipes {', '.join(TEACHER_RECIPES)} have not all run on "
                         f"{', '.join(cohorts)}: run --recipes teachers first")  # fmt: skip
    return best


def share_baselines(out: Path, cohort: str, recipe: str) -> None:
    """Copy the baseline cell records of :data:`BASELINE_FROM`'s recipe into ``recipe``'s cells,
    so its study keeps them (``--resume``) instead of training the same baselines again."""
    source = out / cohort / BASELINE_FROM.get(recipe, "") / "cells"
    if recipe not in BASELINE_FROM or not source.is_dir():
        return
    cells = out / cohort / recipe / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    for record in source.glob("baseline-*.json"):
        if not (cells / record.name).exists():
            (cells / record.name).write_text(record.read_text())


def run_one(
    out: Path, cohort: str, recipe: str, epochs: int, extra: list[str],
    cohorts: list[str] | None = None,
) -> int:  # fmt: skip
    """``resdistill study`` for one cohort and recipe (resumed if it has cells already), on the
    cohort's dataset of an earlier recipe if there is one, with the teachers of the recipe it
    names (their cell records' checkpoints; :data:`CHOSEN_TEACHER`: the teacher recipe chosen
    over ``cohorts``) if any, and the baselines it shares (:func:`share_baselines`)."""
    teacher_args, student_args, teachers_from, more = RECIPES[recipe]
    if teachers_from == CHOSEN_TEACHER:
        teachers_from = chosen_teacher(out, cohorts or [cohort])
    folder = out / cohort / recipe
    share_baselines(out, cohort, recipe)
    argv = [sys.executable, "-m", "resdistill", "study", "--out", str(folder),
            "--student-mags", "2.5x", "--unlabelled-shares", "1", "--seeds", "1",
            "--trials", "1", "--controls", "none",
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


def read_validation(path: Path) -> list[dict[str, str]]:
    """The rows of a study's ``validation.csv``. ValueError when the file holds a column that
    is neither a key nor a ``val_*`` metric (a test metric, e.g. ``study.csv``'s ``accuracy``):
    no choice here may read the test split."""
    if path.name != VALIDATION_CSV:
        raise ValueError(f"{path}: choices read {VALIDATION_CSV} only, never test metrics")
    with path.open() as f:
        reader = csv.DictReader(f)
        bad = [c for c in reader.fieldnames or () if c not in KEY_COLUMNS and
               not c.startswith("val_")]  # fmt: skip
        if bad:
            raise ValueError(f"{path}: columns {bad} are not validation metrics")
        return list(reader)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or value != value else value  # NaN: not reported


def rows(out: Path) -> list[dict[str, object]]:
    """One row per cohort and recipe with a validation.csv: validation accuracies and the two
    bars' gaps, on validation."""
    table = []
    for cohort in COHORTS:
        for recipe in RECIPES:
            path = out / cohort / recipe / VALIDATION_CSV
            if not path.exists():
                continue
            acc: dict[tuple[str, float], float | None] = {}
            mags: set[str] = set()
            for r in read_validation(path):
                acc[(r["kind"], float(r["label_fraction"]))] = _number(r.get(METRIC))
                mags |= {r["mag"]} if r["kind"] != "teacher" else set()
            row: dict[str, object] = {"cohort": cohort, "recipe": recipe,
                                      "student": ",".join(sorted(mags))}  # fmt: skip
            for fr in (1.0, 0.1):
                for kind in ("teacher", "distilled", "baseline"):
                    row[f"{kind}@{fr:g}"] = acc.get((kind, fr))
            t, d = row["teacher@1"], row["distilled@1"]
            d10, b10 = row["distilled@0.1"], row["baseline@0.1"]
            row["distilled-teacher@1"] = None if None in (t, d) else 100 * (d - t)  # type: ignore[operator]
            row["distilled-baseline@0.1"] = None if None in (d10, b10) else 100 * (d10 - b10)  # type: ignore[operator]
            table.append(row)
    return table


def choose(
    table: list[dict[str, object]], arm: str = "distilled"
) -> tuple[str | None, dict[str, float]]:
    """``(recipe, {recipe: score})`` for one arm (``distilled``, ``baseline`` or ``teacher``):
    a recipe's score is the mean over cohorts of that arm's validation accuracy averaged over
    the label fractions it has; only recipes with a score on every cohort of the table compete
    (None when none does). Each arm is chosen on its own score, so a baseline never inherits
    the recipe that suits the distilled student (Oliver et al. 2018)."""
    cohorts = {str(r["cohort"]) for r in table}
    per: dict[str, dict[str, float]] = {}
    for r in table:
        values = [v for k, v in r.items() if k.startswith(f"{arm}@") and v is not None]
        if values:
            per.setdefault(str(r["recipe"]), {})[str(r["cohort"])] = sum(values) / len(values)  # type: ignore[arg-type]
    scores = {k: sum(v.values()) / len(v) for k, v in per.items() if set(v) == cohorts}
    best = max(scores, key=lambda k: scores[k], default=None)
    return best, scores


def feature_rows(out: Path) -> dict[str, dict[str, float]]:
    """``{cohort: {variant: validation accuracy}}`` of the ``feature-term`` studies: per
    variant (validation.csv's ``feature_term``) the mean over label fractions."""
    found: dict[str, dict[str, float]] = {}
    for cohort in COHORTS:
        path = out / cohort / "feature-term" / VALIDATION_CSV
        if not path.exists():
            continue
        per: dict[str, list[float]] = {}
        for r in read_validation(path):
            value = _number(r.get(METRIC))
            if r.get("feature_term") and value is not None:
                per.setdefault(r["feature_term"], []).append(value)
        found[cohort] = {k: sum(v) / len(v) for k, v in per.items()}
    return found


def choose_feature(found: dict[str, dict[str, float]]) -> tuple[str | None, dict[str, float]]:
    """``(variant, {variant: score})``: the mean over cohorts of each variant's validation
    accuracy, among the variants every cohort ran (None when none did). Ties go to the
    variant listed first of off, global, spatial (the simplest)."""
    order = ("off", "global", "spatial")
    common = set(order)
    for v in found.values():
        common &= set(v)
    scores = {k: sum(v[k] for v in found.values()) / len(found) for k in order
              if k in common and found}  # fmt: skip
    best = max(scores, key=lambda k: (scores[k], -order.index(k)), default=None)
    return best, scores


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


def groups(text: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``[(name, recipes, arms)]`` of a ``--recipes`` text: each group of :data:`GROUPS` as it
    is, the recipes named alone together as one group choosing every arm. ValueError naming an
    unknown recipe."""
    found: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    alone: list[str] = []
    for item in (x for x in text.split(",") if x):
        if item in GROUPS:
            found.append((item, *GROUPS[item]))
        elif item in RECIPES:
            alone.append(item)
        else:
            raise ValueError(f"unknown recipe {item!r}: use {', '.join([*GROUPS, *RECIPES])}")
    return found + ([("recipes", tuple(alone), ARMS)] if alone else [])


def print_choice(
    out: Path, cohorts: list[str], members: tuple[str, ...], arms: tuple[str, ...]
) -> None:  # fmt: skip
    """Print each arm's choice among ``members`` over ``cohorts``."""
    compared = [r for r in rows(out) if r["recipe"] in members and r["cohort"] in cohorts]
    for arm in arms:
        best, scores = choose(compared, arm)
        if scores and len(set(scores.values())) == 1:  # one model, or one shared by all
            print(f"{arm}: one model shared by the recipes compared: not a choice here")
            continue
        ranked = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(),
                                                             key=lambda kv: -kv[1]))  # fmt: skip
        print(f"{arm}: chosen on validation ({METRIC} of the {arm} arm, mean over cohorts and "
              f"label fractions) among {', '.join(members)}: {best or '-'} "
              f"({ranked or 'no recipe ran on every cohort'})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="root of the studies (one folder per cohort)")
    p.add_argument("--cohorts", default=",".join(COHORTS), help="comma list of synth cohorts")
    p.add_argument(
        "--recipes", default="jitter,teachers,temperature,feature-term",
        help="comma list of recipes (" + ", ".join(RECIPES) + ") and groups (" +
        "; ".join(f"{k}: {', '.join(v[0])}" for k, v in GROUPS.items()) +
        "), each group run on every cohort before the next; default: the protocol's order, "
        "the students' jitter, the teacher's, the temperature, then the feature term")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="teachers' and students' epochs")
    p.add_argument("--table", action="store_true",
                   help="print the validation table and the choice of finished studies only")  # fmt: skip
    p.add_argument("--study-args", default="", help="more `resdistill study` options")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    cohorts = [c for c in args.cohorts.split(",") if c]
    try:
        planned = groups(args.recipes)
    except ValueError as e:
        p.error(str(e))
    failed = 0
    for _, members, _ in [] if args.table else planned:
        for cohort in cohorts:
            for recipe in members:
                try:
                    rc = run_one(out, cohort, recipe, args.epochs,
                                 shlex.split(args.study_args), cohorts)  # fmt: skip
                except ValueError as e:  # a recipe of the chosen teachers before they are chosen
                    p.error(str(e))
                failed += rc != 0
    print(markdown([r for r in rows(out) if r["cohort"] in cohorts]))
    for name, members, arms in planned:
        print(f"\n{name}:")
        print_choice(out, cohorts, members, arms)
    found = {k: v for k, v in feature_rows(out).items() if k in cohorts}
    if found:
        variant, by = choose_feature(found)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in by.items()) or "no variant on every cohort"
        print(f"feature term on validation ({METRIC}, mean over cohorts {sorted(found)} and "
              f"label fractions): {variant or '-'} ({shown})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
