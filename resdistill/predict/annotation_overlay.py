"""``predict --annotations``: each predicted slide's annotation file, as outlines for its heatmaps.

Files are matched and read with sharding's own code (:mod:`sharding.annotation_set`), so a slide
finds the same ``<slide>.geojson`` (or ``<slide>.svs.geojson``) in a folder or ``s3://`` prefix
as ``resdistill shard --annotations`` does, and its polygons get the same roles
(:func:`sharding.annotations.parse_geojson`): every class is kept, the default ignore patterns
(:data:`sharding.options.IGNORE_CLASSES`) mark ignored areas, unclassified polygons regions of
interest. Files naming no slide being predicted are passed over: predict often runs on a few
slides of an annotated cohort.

Each problem is one line through ``say`` and never stops a slide: a file that cannot be used is
said once when the set is read, and its slide is predicted without outlines; a slide with no file
is said once when it is predicted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resdistill.predict.outlines import DASHES, outline_colour
from sharding.annotation_set import SUFFIX, load_annotations, read_annotation_set
from sharding.annotations import AnnotationError, Outline, annotation_outlines
from sharding.options import AnnotationOptions
from sharding.storage import StorageError

__all__ = ["AnnotationOverlays", "SlideOverlay"]


@dataclass(frozen=True)
class SlideOverlay:
    """What predict draws over one slide's heatmaps (``outlines``, in level-0 pixels) and records
    under ``annotations`` in its JSON; ``note`` says why nothing is drawn."""

    file: str | None
    sha256: str | None
    outlines: tuple[Outline, ...] = ()
    note: str | None = None

    def to_json(self, classes: Sequence[str]) -> dict[str, Any]:
        """The file and its sha256, and per outline its name, role, colour and dashes."""
        doc: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "outlines": [
            {"name": o.name, "role": o.role, "rings": len(o.rings),
             "colour": "#{:02x}{:02x}{:02x}".format(*outline_colour(o.name, o.role, classes)),
             "dashes": DASHES.get(o.role)}
            for o in self.outlines
        ]}  # fmt: skip
        if self.note:
            doc["note"] = self.note
        return doc


class AnnotationOverlays:
    """The annotation files of the slides to predict (``{slide_id: path}``) in ``source``.

    Reading the set says its problems at once; raises
    :class:`sharding.annotation_set.AnnotationSetError` when ``source`` holds no ``.geojson``
    file and :class:`sharding.storage.StorageError` when it cannot be listed. ``problems`` counts
    the lines said about files that could not be used or were changed (repaired), not the notes
    about slides without a file.
    """

    def __init__(self, source: str, slides: Mapping[str, str], say: Callable[[str], None]):
        self.opts = AnnotationOptions(source=source)
        self.set = read_annotation_set(self.opts, dict(slides), unmatched=False, majority_for=())
        self.say = say
        self.problems = len(self.set.problems)
        for line in self.set.problems:
            say(line)

    def for_slide(self, sid: str, origin: tuple[int, int] = (0, 0)) -> SlideOverlay:
        """Slide ``sid``'s outlines in its level-0 pixels (``origin``: where QuPath's pixel
        (0, 0) lies on it, :attr:`sharding.slide.SlideInfo.origin`); none (with a note) when it
        has no usable file."""
        ref = self.set.refs.get(sid)
        if ref is None:
            if sid in self.set.skip:  # its file's line was said when the set was read
                return SlideOverlay(None, None, note=self.set.skip[sid])
            note = (
                f"{sid}: no {sid}{SUFFIX} in {self.set.url}: its heatmaps are drawn without "
                "annotations"
            )
            self.say(note)
            return SlideOverlay(None, None, note=f"no annotation file in {self.set.url}")
        try:
            ann, url = load_annotations(self.opts, ref)
        except (AnnotationError, OSError, StorageError) as exc:
            self.problems += 1
            self.say(str(exc))
            return SlideOverlay(None, ref.sha256, note=str(exc))
        outlines = annotation_outlines(ann.from_qupath(origin), 1.0)
        return SlideOverlay(url, ref.sha256, tuple(outlines))
