"""Give each input slide one id that no other slide holds, in this run or in the output.

A slide's id is :func:`sharding.layout.slide_id` of its file stem, which folds ``.`` and spaces to
``-``: ``A.1.svs`` and ``A-1.svs`` both want ``A-1``, and ``/batch2/S1.svs`` wants the ``S1``
that ``/batch1/S1.svs`` already holds in the output. Ids are settled here, before anything is
written, from the slides' identities (:mod:`sharding.slide_identity`) and what the output records
under each id:

* a slide whose bytes match the record under its id keeps the id (a resumed or finished slide,
  wherever it now lies);
* slides of one id with the same bytes are one slide, taken once (the first by uri), with a note;
* otherwise, without a record, a lone slide takes the id;
* any other slide conflicts. With ``on_conflict="refuse"`` (the default) the run is refused with
  one line naming both paths; with ``"suffix"`` it is given :func:`sharding.layout.suffixed_id`
  (``<id>-<first 8 hex of its sha256>``), which depends on its bytes only, so every rerun gives
  it the same id and resumes it. Of slides that collide in one run with no record, the first by
  uri keeps the plain id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .layout import suffixed_id
from .options import ON_CONFLICT
from .slide_identity import SlideIdentity

_FOLD = "ids keep letters, digits, '_' and '-'; other characters become '-'"


@dataclass
class Settled:
    """The outcome: ``slides`` (id -> path) and ``identity`` (id -> identity) to use, one
    ``conflicts`` line per slide refused (the run must stop), ``notes`` worth showing, and the
    ``suffixed`` ids (suffixed id -> the id its name folds to)."""

    slides: dict[str, str] = field(default_factory=dict)
    suffixed: dict[str, str] = field(default_factory=dict)
    identity: dict[str, SlideIdentity] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def settle_ids(
    candidates: list[tuple[str, str]],
    identity: Mapping[str, SlideIdentity],
    recorded: Callable[[str], SlideIdentity | None],
    on_conflict: str = "refuse",
    where: str = "the output",
) -> Settled:
    """Ids for ``candidates`` (``(id from the name, path)`` pairs whose ``identity[path]`` is
    known), given ``recorded(id)``, the identity the output holds under an id (None: free).
    ``where`` names the output in conflict lines. See the module docstring. The lines name no
    command, so prediction can settle its slides' ids the same way."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"--on-conflict must be one of {', '.join(ON_CONFLICT)}")
    out = Settled()
    groups: dict[str, list[str]] = {}
    for sid, path in candidates:
        groups.setdefault(sid, []).append(path)
    plain = set(groups)
    for sid in sorted(groups):
        paths = sorted(groups[sid], key=lambda p: identity[p].uri)
        unique: list[str] = []
        for path in paths:
            twin = next((q for q in unique if identity[q].same_bytes(identity[path])), None)
            if twin is None:
                unique.append(path)
            else:
                out.notes.append(
                    f"{path}: the same slide (same bytes) as {twin}: taken once, as {sid!r}"
                )
        rec = recorded(sid)
        if rec is not None:
            owner = next((p for p in unique if identity[p].same_bytes(rec)), None)
            holder = rec.uri if owner is None else owner
        else:
            owner = unique[0] if len(unique) == 1 or on_conflict == "suffix" else None
            holder = unique[0]
        for path in unique:
            if path == owner:
                out.slides[sid], out.identity[sid] = path, identity[path]
                continue
            if rec is not None and owner is None and rec.uri == identity[path].uri:
                what = f"{where} holds slide {sid!r} cut from this file before it changed"
            elif rec is not None and owner is None:
                what = f"{where} already holds slide {sid!r} from {holder} (other bytes)"
            else:  # a clash in this run; the first slide of a refused clash names the second
                other = unique[1] if path == holder else holder
                what = f"slide id {sid!r} is also that of {other} ({_FOLD})"
            alt = suffixed_id(sid, identity[path].sha256 or "")
            if on_conflict == "refuse":
                out.conflicts.append(
                    f"{path}: {what}: rename the file, or pass --on-conflict suffix to give it "
                    f"the id {alt!r}"
                )
                continue
            taken = recorded(alt)
            if (
                alt in plain
                or alt in out.slides
                or (taken is not None and not identity[path].same_bytes(taken))
            ):
                out.conflicts.append(
                    f"{path}: {what}, and its suffixed id {alt!r} is taken too: rename the file"
                )
                continue
            out.slides[alt], out.identity[alt] = path, identity[path]
            out.suffixed[alt] = sid
            out.notes.append(f"{path}: {what}: given the id {alt!r}")
    return out
