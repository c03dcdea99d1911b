"""Which slides a ``predict`` run scores, under which id, and which of them are already done.

A slide is its path and its bytes, never just its name (:mod:`sharding.slide_identity`): every
slide given is fingerprinted (a rerun reuses the fingerprint its record holds when the file is
unchanged: a stat, not a read) and its id is settled by :func:`sharding.slide_ids.settle_ids`
against the records ``--out`` holds. So ``/batch2/case9/S1.svs`` never takes the result of
``/batch1/case7/S1.svs`` already predicted in ``--out``, and ``A.1.svs`` and ``A-1.svs`` (both
``A-1``) are never mixed in one run: such a slide is refused up front with one line naming both
files, or with ``--on-conflict suffix`` predicted as ``<id>-<first 8 hex of its fingerprint>``.
A slide that cannot be read (missing, unreadable) is a failure of its own; the others go on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resdistill.errors import UsageError
from resdistill.predict.outputs import done_slides, read_record, record_identity
from sharding.inputs import slide_inputs
from sharding.slide_identity import SlideIdentity, fingerprint_all
from sharding.slide_ids import settle_ids

if TYPE_CHECKING:
    from sharding.storage.base import Storage

__all__ = ["SlideSet", "settle_slides"]


@dataclass
class SlideSet:
    """``slides`` (id -> path) to predict or done, their ``identity``, the ``done`` ones' records,
    ``failures`` (id -> (path, one line)) of slides that cannot be read, ``problems`` (one line
    each, no id: names that cannot be ids) and ``notes`` worth showing."""

    slides: dict[str, str] = field(default_factory=dict)
    identity: dict[str, SlideIdentity] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def settle_slides(
    inputs: Sequence[str],
    store: Storage,
    settings: Mapping[str, Any],
    on_conflict: str,
    annotations: bool = False,
) -> SlideSet:
    """The slides of ``inputs`` settled against ``store`` (module docstring); :class:`UsageError`
    (one line naming both files) for a conflict, for other settings, and for no slide at all."""
    pairs, problems = slide_inputs(list(inputs))
    if not pairs and not problems:
        raise UsageError("no slide to predict (no file given, or the folders hold none)")
    out = SlideSet(problems=list(problems))
    records: dict[str, dict[str, Any] | None] = {}

    def record(sid: str) -> dict[str, Any] | None:
        if sid not in records:
            records[sid] = read_record(store, sid)
        return records[sid]

    sid_of = {p: s for s, p in pairs}
    identity, unreadable = fingerprint_all(
        sid_of, recorded=lambda p: record_identity(record(sid_of[p]))
    )
    settled = settle_ids(
        [(s, p) for s, p in pairs if p in identity],
        identity,
        lambda sid: record_identity(record(sid)),
        on_conflict,
        store.url,
    )
    if settled.conflicts:
        more = len(settled.conflicts) - 1
        raise UsageError(
            _predicting(settled.conflicts[0])
            + (f" (and {more} more such slide(s))" if more else "")
        )
    if settled.suffixed and annotations:
        alt, sid = next(iter(settled.suffixed.items()))
        raise UsageError(
            f"{settled.slides[alt]}: --on-conflict suffix would predict it as {alt!r}, but "
            f"annotation files are matched to slides by name, so {sid}.geojson could be either "
            "slide's: rename the file instead"
        )
    out.slides, out.identity = dict(settled.slides), dict(settled.identity)
    out.notes = [_predicting(n) for n in settled.notes]
    for path, line in unreadable.items():
        sid = sid_of[path]
        if sid in out.slides or sid in out.failures:
            out.problems.append(line)  # its id is another slide's: no row of its own
        else:
            out.failures[sid] = (path, line)
    got = {sid: record(sid) for sid in out.slides}
    out.done = done_slides(store.url, got, out.identity, settings)
    return out


def _predicting(line: str) -> str:
    """A line of :func:`sharding.slide_ids.settle_ids` in predict's words."""
    return line.replace("shard it as", "predict it as").replace("sharded", "predicted")
