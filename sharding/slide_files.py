"""What counts as a slide file, and the error a slide that cannot be sharded raises.

The level below both ways of reaching a slide: :mod:`sharding.slide` (open it with OpenSlide)
and :mod:`sharding.remote_slides` (list it on S3, fetch a local copy).
"""

from __future__ import annotations

#: File extensions scanned when a folder is given (OpenSlide's formats).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)


class SlideError(Exception):
    """A slide that cannot be sharded; the message is one line naming the file and the fix."""
