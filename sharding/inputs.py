"""The slides a run is given: files, folders scanned for slide files, or s3:// URLs, with ids."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .layout import UnsafeNameError, slide_id
from .remote_slides import is_s3, list_s3_slides
from .slide_files import SLIDE_SUFFIXES


def slide_inputs(inputs: Iterable[str | Path]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(id from the file stem, path)`` of every slide given, once per file (two spellings of one
    file count once), in input order; problems for names that cannot be ids. Two files whose
    names fold to one id are both listed: :func:`sharding.slide_ids.settle_ids` decides. Local
    paths come back absolute: Ray workers (``ray start``, a cluster) run in another folder."""
    out: list[tuple[str, str]] = []
    seen: dict[str, list[str]] = {}
    problems: list[str] = []
    paths: list[Path | str] = []
    for item in inputs:
        if is_s3(str(item)):
            paths.extend(list_s3_slides(str(item)))
            continue
        p = Path(item).absolute()
        if p.is_dir():
            paths.extend(
                sorted(
                    q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
                )
            )
        else:
            paths.append(p)  # a missing or odd file is reported when it is read, with its path
    for p in paths:
        try:
            sid = slide_id(PurePosixPath(str(p)).stem)
        except UnsafeNameError as exc:
            problems.append(f"{p}: {exc}")
            continue
        if any(_same_file(q, str(p)) for q in seen.get(sid, ())):
            continue
        seen.setdefault(sid, []).append(str(p))
        out.append((sid, str(p)))
    return out, problems


def find_slides(inputs: Iterable[str | Path]) -> tuple[dict[str, str], list[str]]:
    """Slide id -> path for files and folders given; problems for unusable names and for a
    second file whose name folds to an id already taken (by name only: ``shard`` settles ids on
    the slides' bytes instead, see :mod:`sharding.slide_ids`)."""
    pairs, problems = slide_inputs(inputs)
    found: dict[str, str] = {}
    for sid, p in pairs:
        if sid in found:
            problems.append(
                f"{p}: slide id {sid!r} is also used by {found[sid]}: rename one of the files "
                "(ids keep letters, digits, '_' and '-'; other characters become '-')"
            )
            continue
        found[sid] = p
    return found, problems


def _same_file(a: str, b: str) -> bool:
    if is_s3(a) or is_s3(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()
