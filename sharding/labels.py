"""Slide labels from a CSV and the split of slides into train / val / test / unlabeled.

The CSV has a header with ``slide`` and ``label`` columns and an optional ``patient`` column.
``slide`` names a slide by its path (as given, or absolute), its file name (``CMU-1.svs``), its
stem (``CMU-1``) or its slide id, tried in that order; a row naming two input slides at the first
of these that matches (``S1`` for ``/b1/S1.svs`` and ``/b2/S1.svs``) is refused. A row with a
patient and no label (``slide,,patient``) names the patient of an unlabelled slide. Splits are
drawn by patient when patients are given (else by slide), never by tile, stratified by label, and
are deterministic for a seed: no patient and no slide contributes to two splits. An unlabelled
slide follows its patient into that patient's split, so no image of a val/test patient reaches
training through the ``unlabeled`` split.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .layout import LABELLED_SPLITS, UnsafeNameError, slide_id
from .slide_files import SLIDE_SUFFIXES
from .slide_identity import source_uri


class LabelsError(Exception):
    """The labels file as a whole cannot be used (missing, unreadable, wrong columns)."""


@dataclass
class Labels:
    """Parsed labels: per slide id its label and patient, plus one problem line per bad row.

    ``patient`` also holds unlabelled slides (rows ``slide,,patient``); ``label`` only labelled ones.

    ``skip`` holds slide ids that appear in the CSV but must not be sharded (empty, unknown or
    conflicting label), each with the reason.
    """

    label: dict[str, str] = field(default_factory=dict)
    patient: dict[str, str] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.label.values()))


def read_labels(
    path: str | Path,
    known_slides: Mapping[str, str] | Collection[str],
    classes: list[str] | None = None,
) -> Labels:
    """Read and validate a labels CSV against the slides being sharded: ``known_slides`` maps
    slide id -> path (a bare collection of ids matches rows by id only).

    Problems reported (one line each, naming the file, row and fix): a slide the input does not
    contain, a row naming two input slides, an empty label, a label outside ``classes`` when
    classes are given, a slide listed twice, a slide name that could escape the output prefix.
    Rows with problems are not used; a slide whose row is bad is skipped rather than silently
    sharded as unlabeled.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [h.strip() for h in (rows[0].keys() if rows else [])]
    except FileNotFoundError:
        raise LabelsError(f"{path}: labels file not found: check --labels") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: not a readable CSV ({exc}): save it as UTF-8 CSV") from None
    if not rows:
        raise LabelsError(
            f"{path}: no rows: the CSV needs a header 'slide,label[,patient]' and rows"
        )
    if "slide" not in header or "label" not in header:
        raise LabelsError(
            f"{path}: header is {','.join(header)!r}: it must name the columns 'slide' and 'label' "
            "(and optionally 'patient')"
        )
    out = Labels()
    match = _Names(known_slides)
    seen: dict[str, int] = {}
    allowed = set(classes) if classes else None
    for lineno, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        name, label, patient = row.get("slide", ""), row.get("label", ""), row.get("patient", "")
        try:
            sid = match.find(name)
        except UnsafeNameError as exc:
            out.problems.append(f"{path}:{lineno}: {exc}")
            continue
        except AmbiguousName as exc:
            out.problems.append(
                f"{path}:{lineno}: slide {name!r} names {len(exc.sids)} input slides "
                f"({', '.join(match.describe(s) for s in exc.sids)}): name the file by its path; "
                "they are skipped until then"
            )
            out.skip.update({s: f"ambiguous row in {path.name}" for s in exc.sids})
            continue
        if sid is None:
            out.problems.append(
                f"{path}:{lineno}: slide {name!r} is not among the input slides: remove the row or "
                "add the slide file"
            )
            continue
        if sid in seen:
            out.problems.append(
                f"{path}:{lineno}: slide {name!r} is listed again (first on line {seen[sid]}): keep "
                "one row per slide; the slide is skipped until then"
            )
            out.skip[sid] = f"listed twice in {path.name}"
            continue
        seen[sid] = lineno
        if not label and patient:  # an unlabelled slide whose patient is known
            out.patient[sid] = patient
            continue
        if not label:
            out.problems.append(
                f"{path}:{lineno}: slide {name!r} has an empty label: give its class or its "
                "patient, or drop the row to shard it as unlabeled; the slide is skipped until then"
            )
            out.skip[sid] = f"empty label in {path.name}"
            continue
        if allowed is not None and label not in allowed:
            out.problems.append(
                f"{path}:{lineno}: slide {name!r} has label {label!r}, not one of "
                f"{', '.join(sorted(allowed))}: fix the label or --classes; the slide is skipped"
            )
            out.skip[sid] = f"unknown label {label!r}"
            continue
        out.label[sid] = label
        if patient:
            out.patient[sid] = patient
    for sid in out.skip:
        out.label.pop(sid, None)
        out.patient.pop(sid, None)
    return out


class AmbiguousName(ValueError):
    """A labels row whose name fits more than one input slide."""

    def __init__(self, sids: list[str]) -> None:
        super().__init__(sids)
        self.sids = sids


class _Names:
    """The ways a labels row may name an input slide, most precise first: its path (as given, or
    absolute), its file name, its stem, its slide id, the id of the name less a slide suffix."""

    def __init__(self, slides: Mapping[str, str] | Collection[str]) -> None:
        paths = dict(slides) if isinstance(slides, Mapping) else {}
        self.paths = paths
        self.ids = set(slides)
        self.by_path: dict[str, set[str]] = {}
        self.by_name: dict[str, set[str]] = {}
        self.by_stem: dict[str, set[str]] = {}
        for sid, p in paths.items():
            for key in {p, source_uri(p)}:
                self.by_path.setdefault(key, set()).add(sid)
            name = PurePosixPath(str(p)).name
            self.by_name.setdefault(name, set()).add(sid)
            self.by_stem.setdefault(PurePosixPath(name).stem, set()).add(sid)

    def find(self, name: str) -> str | None:
        """The slide id ``name`` stands for; None when none; :class:`AmbiguousName` when two
        slides fit at the most precise way that fits any; UnsafeNameError for a name that could
        address a path outside the output."""
        hits = self.by_path.get(name) or (
            self.by_path.get(source_uri(name)) if name.startswith("/") else None
        )
        if not hits and name.startswith(("/", "s3://")):
            return None
        if not hits:
            sid = slide_id(name)  # refuses '..', separators, control characters
            stem = PurePosixPath(name)
            bare = stem.stem if stem.suffix.lower() in SLIDE_SUFFIXES else None
            levels = (
                self.by_name.get(name),
                self.by_stem.get(name),
                {sid} & self.ids,
                {slide_id(bare)} & self.ids if bare else None,
            )
            hits = next((h for h in levels if h), set())
        if len(hits) > 1:
            raise AmbiguousName(sorted(hits))
        return next(iter(hits), None)

    def describe(self, sid: str) -> str:
        return self.paths.get(sid, sid)


def _stable_rank(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def assign_splits(
    labels: dict[str, str],
    patients: dict[str, str],
    ratios: tuple[float, float, float],
    seed: int = 0,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Split labelled slides into train/val/test by patient (or slide), stratified by label.

    Groups are patients (a slide without a patient is its own group). Groups are ordered by label,
    then by a seeded hash, and dealt one by one to the split furthest below its share so far
    (``ratio * groups dealt - groups given``): every label is spread over the splits in proportion
    and the totals follow the ratios. Each split with a positive ratio gets a group when there are
    at least three. ``fixed`` keeps earlier assignments (a resumed run): a group with a fixed slide
    takes that split whole and counts towards its share.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"--splits needs three non-negative ratios (train,val,test), got {ratios}")
    total = sum(ratios)
    shares = [r / total for r in ratios]
    fixed = fixed or {}
    groups: dict[str, list[str]] = {}
    for sid in labels:
        groups.setdefault(patients.get(sid, f"slide:{sid}"), []).append(sid)
    out: dict[str, str] = {}
    given = [0, 0, 0]
    free: list[str] = []
    for gid, members in groups.items():
        pinned = [fixed[s] for s in members if fixed.get(s) in LABELLED_SPLITS]
        if pinned:
            for s in members:
                out[s] = pinned[0]
            given[LABELLED_SPLITS.index(pinned[0])] += 1
        else:
            free.append(gid)
    free.sort(key=lambda g: (labels[groups[g][0]], _stable_rank(g, seed)))
    n = len(free) + sum(given)
    # Splits owed one group up front (so val/test are never empty when groups allow).
    owed = [i for i, r in enumerate(shares) if r > 0 and given[i] == 0] if n >= 3 else []
    dealt = sum(given)
    for k, gid in enumerate(free):
        if owed and len(free) - k <= len(owed):
            pick = owed[0]
        else:
            deficit = [shares[i] * (dealt + 1) - given[i] for i in range(3)]
            pick = max(range(3), key=lambda i: (deficit[i], shares[i]))
        if pick in owed:
            owed.remove(pick)
        given[pick] += 1
        dealt += 1
        for s in groups[gid]:
            out[s] = LABELLED_SPLITS[pick]
    return out


def patient_splits(
    split_of: dict[str, str], patients: dict[str, str], slides: Iterable[str]
) -> dict[str, str]:
    """The split of each of ``slides`` (unlabelled ones) whose patient has a slide in ``split_of``.

    A patient's labelled slides share one split (:func:`assign_splits`); its unlabelled slides
    join it. Slides without a patient, or whose patient has no labelled slide, are left out
    (they go to ``unlabeled``: no val/test patient can be reached through them).
    """
    by_patient = {patients[s]: split for s, split in split_of.items() if s in patients}
    return {s: by_patient[patients[s]] for s in slides if patients.get(s) in by_patient}
