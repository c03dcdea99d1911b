"""The slides a run is given: files, folders scanned for slide files, or s3:// URLs, with ids."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .layout import UnsafeNameError, slide_id
from .remote_slides import is_s3, list_s3_slides
from .slide_files import SLIDE_SUFFIXES


def find_slides(inputs: Iterable[str | Path]) -> tuple[dict[str, str], list[str]]:
    """Slide id -> path for files and folders given; problems for unusable names and clashes."""
    found: dict[str, str] = {}
    problems: list[str] = []
    paths: list[Path | str] = []
    for item in inputs:
        if is_s3(str(item)):
            paths.extend(list_s3_slides(str(item)))
            continue
        p = Path(item)
        if p.is_dir():
            paths.extend(
                sorted(
                    q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES
                )
            )
        else:
            paths.append(p)  # a missing or odd file is reported by the planner, with its path
    for p in paths:
        try:
            sid = slide_id(PurePosixPath(str(p)).stem)
        except UnsafeNameError as exc:
            problems.append(f"{p}: {exc}")
            continue
        if sid in found and _same_file(found[sid], str(p)):
            continue
        if sid in found:
            problems.append(
                f"{p}: slide id {sid!r} is also used by {found[sid]}: rename one of the files "
                "(ids keep letters, digits, '_' and '-'; other characters become '-')"
            )
            continue
        found[sid] = str(p)
    return found, problems


def _same_file(a: str, b: str) -> bool:
    if is_s3(a) or is_s3(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()
