"""The annotation files of a run: one ``<slide>.geojson`` per slide in a folder or s3:// prefix.

A file is matched to a slide by its name less ``.geojson`` and less a slide suffix (QuPath
scripts write ``CMU-1.geojson`` or ``CMU-1.svs.geojson``), turned into a slide id the way the
slide's own file stem is (:func:`sharding.layout.slide_id`). The driver reads each matched file
once, for its sha256 (kept per slide so that a resumed run notices a changed file, and over the
set in dataset.json), its problems and its majority class (the class that stratifies the split of
a slide the labels CSV does not list), measured on the slide: the driver reads the slide's size
(its header; an ``s3://`` slide is copied to this node's slide cache first) and clips the polygons
to it, so a polygon off the slide never decides the split. Slide tasks read their file again
(:func:`load_annotations`) instead of receiving polygons, so the driver never holds every slide's
polygons at once. Reads are bounded (:data:`sharding.annotations.MAX_BYTES`), and a file that
cannot be used skips its own slide with one line; the other slides go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from shapely.errors import ShapelyError

from . import annotations as geojson
from .annotations import AnnotationError, SlideAnnotations, parse_geojson
from .layout import UnsafeNameError, slide_id
from .options import AnnotationOptions
from .slide import bounds_origin, open_slide
from .slide_files import SLIDE_SUFFIXES, SlideError
from .storage import Storage, StorageError, open_storage

SUFFIX = ".geojson"


class AnnotationSetError(Exception):
    """The annotation source as a whole cannot be used (empty, not a folder or prefix)."""


@dataclass(frozen=True)
class AnnotationRef:
    """A slide's annotation file as the driver hands it to slide tasks."""

    name: str  # path relative to AnnotationOptions.source
    sha256: str
    labels_regions: bool  # the file names a class (see SlideAnnotations.labels_regions)


@dataclass
class AnnotationSet:
    """What the driver learnt from the files: per slide id its file and majority class, plus the
    slides to skip (with the reason) and one line per problem."""

    url: str
    refs: dict[str, AnnotationRef] = field(default_factory=dict)
    majority: dict[str, str] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def sha256(self) -> str:
        """Digest of the set: sha256 over ``<name> <file sha256>`` lines, sorted by name."""
        lines = sorted(f"{r.name} {r.sha256}\n" for r in self.refs.values())
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def describe(self, opts: AnnotationOptions) -> dict:
        """The ``annotations`` entry of dataset.json."""
        return {"source": self.url, "files": len(self.refs), "sha256": self.sha256(),
                **opts.identity()}  # fmt: skip


def annotated_slide(name: str) -> str | None:
    """The slide id a file name stands for (``a/CMU-1.svs.geojson`` -> ``CMU-1``), None if the
    name is not a ``.geojson`` file or could not be a slide id."""
    base = PurePosixPath(name).name
    if not base.lower().endswith(SUFFIX):
        return None
    stem = base[: -len(SUFFIX)]
    if PurePosixPath(stem).suffix.lower() in SLIDE_SUFFIXES:
        stem = stem[: -len(PurePosixPath(stem).suffix)]
    try:
        return slide_id(stem)
    except UnsafeNameError:
        return None


def read_bounded(store: Storage, name: str) -> bytes:
    """File ``name`` of ``store``, reading at most one byte past
    :data:`sharding.annotations.MAX_BYTES` (:class:`AnnotationError` when over)."""
    with store.open_read(name) as fh:
        data = fh.read(geojson.MAX_BYTES + 1)
    geojson.check_size(len(data), store.child_url(name))
    return data


def slide_frame(path: str) -> tuple[int, int, tuple[int, int]]:
    """Level-0 ``(width, height, origin)`` of a slide from its header, ``origin`` where QuPath's
    pixel (0, 0) lies (:func:`sharding.slide.bounds_origin`); :class:`SlideError` if unreadable."""
    slide = open_slide(path)
    try:
        width, height = slide.dimensions
        origin = bounds_origin(dict(slide.properties))
    finally:
        slide.close()
    return int(width), int(height), origin


def read_annotation_set(
    opts: AnnotationOptions,
    slides: dict[str, str],
    *,
    unmatched: bool = True,
    majority_for: Collection[str] | None = None,
) -> AnnotationSet:
    """Match, read and check the annotation files of ``slides`` (slide id -> path).

    One line per problem: a file naming no input slide (unless ``unmatched`` is False, for a run
    over a few slides of an annotated cohort), two files for one slide (skipped), a file that
    cannot be used (skipped), and the lines of :func:`parse_geojson`. With ``annotated_only`` a
    slide without a file, or whose file names no class, is skipped. The majority class of the
    slides in ``majority_for`` (default: all; the driver passes those the labels CSV does not
    label, predict none) is measured on the slide, whose size is read here (a slide that cannot
    be opened is skipped with its line). Raises :class:`AnnotationSetError` when the source holds
    no ``.geojson`` file.
    """
    store = open_storage(opts.source)
    out = AnnotationSet(url=store.url)
    files = [n for n in store.list() if n.lower().endswith(SUFFIX)]
    if not files:
        raise AnnotationSetError(
            f"{store.url}: no {SUFFIX} files: --annotations takes the folder (or s3:// prefix) "
            f"holding one <slide>{SUFFIX} per slide, as QuPath exports them"
        )
    matched: dict[str, str] = {}
    for name in files:
        sid = annotated_slide(name)
        if sid not in slides:
            if not unmatched:
                continue
            out.problems.append(
                f"{store.child_url(name)}: no input slide is named {sid or name!r}: remove the "
                "file or add the slide"
            )
        elif sid in matched:
            out.problems.append(
                f"{store.child_url(name)}: slide {sid!r} also has {matched[sid]}: keep one file "
                "per slide; the slide is skipped until then"
            )
            out.skip[sid] = f"two annotation files ({PurePosixPath(name).name})"
        else:
            matched[sid] = name
    for sid, name in sorted(matched.items()):
        if sid in out.skip:
            continue
        try:
            data = read_bounded(store, name)
            ann, problems = parse_geojson(data, store.child_url(name), opts.ignore, opts.classes)
        except (AnnotationError, OSError, StorageError) as exc:
            out.problems.append(_line(exc, store.child_url(name)))
            out.skip[sid] = f"unusable annotation file {PurePosixPath(name).name}"
            continue
        majority = None
        if ann.classes and (majority_for is None or sid in majority_for):
            try:
                width, height, origin = slide_frame(slides[sid])
                majority = ann.from_qupath(origin).majority(width, height)
            except (SlideError, OSError, StorageError, ShapelyError) as exc:
                out.problems.append(_line(exc, slides[sid]))
                out.skip[sid] = "slide cannot be opened to measure its annotations"
                continue
        out.problems.extend(problems)
        ref = AnnotationRef(name, hashlib.sha256(data).hexdigest(), ann.labels_regions)
        out.refs[sid] = ref
        if majority is not None:
            out.majority[sid] = majority
    if opts.annotated_only:
        for sid in sorted(slides):
            ref = out.refs.get(sid)
            if sid not in out.skip and (ref is None or not ref.labels_regions):
                why = "no annotation file" if ref is None else "its annotations name no class"
                out.skip[sid] = f"{why} (--annotated-only)"
    return out


def _line(exc: Exception, where: str) -> str:
    """``exc`` as one line that starts with the path it is about."""
    text = " ".join(str(exc).split())
    return text if text.startswith(where) else f"{where}: {text}"


def load_annotations(opts: AnnotationOptions, ref: AnnotationRef) -> tuple[SlideAnnotations, str]:
    """A slide's annotations and the file's URL, read again in a slide task (its problems were
    reported by the driver). Raises :class:`AnnotationError` if the file changed since."""
    store = open_storage(opts.source)
    url = store.child_url(ref.name)
    data = read_bounded(store, ref.name)
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise AnnotationError(f"{url}: changed while the run was reading it: run again")
    return parse_geojson(data, url, opts.ignore, opts.classes)[0], url
