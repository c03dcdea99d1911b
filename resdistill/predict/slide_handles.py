"""Open slides kept by a worker process between its reads, so a slide is opened once, not per chunk.

OpenSlide's open parses the file's directories and sets up its tile cache: for a student's chunk
of small tiles it costs as much as the reads. :func:`held_slide` keeps the last
:data:`HELD_SLIDES` slides a process read open (least recently used closed first), each with the
``version`` its plan recorded (:func:`slide_version`): a local file's size and modification
time, an ``s3://`` slide's cached copy (whose folder names the object's size and ETag,
:mod:`sharding.remote_slides`). A held slide is used only for the version it was opened at; a
file that no longer has its plan's version is refused (it changed while it was predicted),
never read under the plan of other bytes. A held ``s3://`` copy stays pinned (never evicted
from the node's cache) while it is held.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HELD_SLIDES", "held_slide", "release_all", "slide_version"]

#: Slides a worker process keeps open (a read task's chunks are of one slide; a few slides'
#: chunks interleave in a worker).
HELD_SLIDES = 4

_lock = threading.Lock()
_held: OrderedDict[str, tuple[str, Any, Any]] = OrderedDict()  # path -> (version, slide, pin)


def slide_version(path: str, local: str) -> str:
    """The version of slide ``path`` opened from ``local`` (module docstring)."""
    from sharding.remote_slides import is_s3

    if is_s3(path):
        return os.path.basename(os.path.dirname(local))
    st = os.stat(local)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _open(path: str, opened: str) -> tuple[str, Any, Any]:
    """``(version, slide, pin)`` of ``path`` opened now as ``opened`` says (``ranges``:
    :func:`sharding.slide_ranges.open_ranged`, which holds its own pin), errors naming ``path``,
    not a cache file."""
    from sharding.remote_slides import is_s3, pin_copy
    from sharding.slide import SlideError, open_slide
    from sharding.slide_ranges import open_ranged

    if opened == "ranges":
        ranged = open_ranged(path)
        return slide_version(path, ranged.path), ranged, None
    pin = pin_copy(path) if is_s3(path) else None
    local = pin.path if pin is not None else path
    try:
        slide = open_slide(local)
    except SlideError as exc:
        if pin is not None:
            pin.release()
        raise SlideError(str(exc).replace(local, path)) from None
    return slide_version(path, local), slide, pin


def _changed(path: str, version: str) -> bool:
    """Whether the local file ``path`` is no longer at ``version`` (a stat; an ``s3://`` slide's
    held copy is its version's, pinned)."""
    from sharding.remote_slides import is_s3

    if is_s3(path):
        return False
    try:
        return slide_version(path, path) != version
    except OSError:
        return True


def _close(entry: tuple[str, Any, Any]) -> None:
    _, slide, pin = entry
    slide.close()
    if pin is not None:
        pin.release()


@contextmanager
def held_slide(path: str, version: str, opened: str = "local") -> Iterator[Any]:
    """The open OpenSlide handle of ``path`` at ``version`` (any for ``""``), opened as
    ``opened`` (:attr:`resdistill.predict.slide_plan.SlidePlan.opened`), for the ``with``
    block, kept open afterwards (module docstring). :class:`sharding.slide.SlideError` when the file is no longer
    at ``version``."""
    from sharding.slide import SlideError

    with _lock:
        entry = _held.pop(path, None)
    if entry is not None and (version and entry[0] != version or _changed(path, entry[0])):
        _close(entry)
        entry = None
    if entry is None:
        entry = _open(path, opened)
        if version and entry[0] != version:
            _close(entry)
            raise SlideError(
                f"{path}: the slide changed while it was predicted (its plan was made from other "
                "bytes): predict it again"
            )
    try:
        yield entry[1]
    finally:
        with _lock:
            old = _held.pop(path, None)
            _held[path] = entry
            closing = [old] if old is not None and old is not entry else []
            while len(_held) > HELD_SLIDES:
                closing.append(_held.popitem(last=False)[1])
        for e in closing:
            _close(e)


def release_all() -> None:
    """Close every held slide (and release its pin)."""
    with _lock:
        entries = list(_held.values())
        _held.clear()
    for e in entries:
        _close(e)
