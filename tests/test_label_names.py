"""A labels CSV names a slide by its path, file name, stem or id: ``CMU-1.svs`` labels the slide
``CMU-1``, and a row that fits two input slides is refused, naming them, never guessed."""

from __future__ import annotations

from pathlib import Path

from sharding.labels import read_labels


def _csv(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("slide,label\n" + rows)
    return path


def test_a_row_with_the_file_extension_labels_the_slide(tmp_path: Path) -> None:
    slides = {"CMU-1": "/data/CMU-1.svs", "TCGA-A1-6A2F": "/data/TCGA-A1.6A2F.tiff"}
    got = read_labels(_csv(tmp_path, "CMU-1.svs,tumor\nTCGA-A1.6A2F.tiff,benign\n"), slides)
    assert got.problems == []
    assert got.label == {"CMU-1": "tumor", "TCGA-A1-6A2F": "benign"}
    # Ids only (no paths known): the extension of a slide format is dropped before matching.
    assert read_labels(_csv(tmp_path, "CMU-1.svs,tumor\n"), {"CMU-1"}).label == {"CMU-1": "tumor"}


def test_the_same_slide_named_twice_is_listed_twice(tmp_path: Path) -> None:
    got = read_labels(_csv(tmp_path, "CMU-1,tumor\nCMU-1.svs,benign\n"), {"CMU-1": "/d/CMU-1.svs"})
    assert got.label == {} and "listed again" in got.problems[0]


def test_a_row_naming_two_slides_is_refused_and_a_path_settles_it(tmp_path: Path) -> None:
    slides = {"S1": "/b1/S1.svs", "S1-0a1b2c3d": "/b2/S1.svs", "other": "/b2/other.svs"}
    got = read_labels(_csv(tmp_path, "S1.svs,tumor\nother,benign\n"), slides)
    assert got.label == {"other": "benign"}
    (line,) = got.problems
    assert line.startswith(f"{tmp_path / 'labels.csv'}:2: ")
    assert "/b1/S1.svs" in line and "/b2/S1.svs" in line and "by its path" in line
    assert set(got.skip) == {"S1", "S1-0a1b2c3d"}, "an ambiguous row labels neither slide"
    by_path = read_labels(_csv(tmp_path, "/b2/S1.svs,tumor\n/b1/S1.svs,benign\n"), slides)
    assert by_path.problems == [] and by_path.label == {"S1-0a1b2c3d": "tumor", "S1": "benign"}


def test_the_exact_stem_wins_over_a_folded_id(tmp_path: Path) -> None:
    """``A.1`` is the stem of A.1.svs even when A-1.svs holds the id ``A-1``."""
    slides = {"A-1": "/in/A-1.svs", "A-1-0a1b2c3d": "/in/A.1.svs"}
    got = read_labels(_csv(tmp_path, "A.1,tumor\nA-1,benign\n"), slides)
    assert got.problems == [] and got.label == {"A-1-0a1b2c3d": "tumor", "A-1": "benign"}
    missing = read_labels(_csv(tmp_path, "/elsewhere/A-1.svs,tumor\n"), slides)
    assert "is not among the input slides" in missing.problems[0]
