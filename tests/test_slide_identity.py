"""A slide is its path and its bytes, never just its name: sharding refuses (or, with
``--on-conflict suffix``, renames) a slide whose id another slide holds, in the run or in the
output; resumes a slide wherever it now lies; records where every sample came from; and writes
nothing when no slide can be read. Real slides (tifffile pyramids read by OpenSlide), real
storage (local folders and the moto S3 endpoint), sharding in-process (``workers=0``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from resdistill.fields import ConfigError
from sharding.layout import MANIFEST
from sharding.pipeline import ShardError, run_shard
from sharding.slide_files import SlideError
from sharding.storage import open_storage
from tests.dataset_checks import verify_dataset
from tests.slide_factory import blob_image, write_slide

SMALL = {"mags": "20,10", "tile_px": 128, "workers": 0, "progress": False}


def _slide(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_slide(path, blob_image(768, 768, seed=seed), app_mag=40, mpp=0.25)


def _sha(path: Path) -> str:
    from sharding.slide_identity import fingerprint  # imported here: the old code lacks it

    return fingerprint(path).sha256


def _suffixed(sid: str, path: Path) -> str:
    from sharding.layout import suffixed_id

    return suffixed_id(sid, _sha(path))


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / MANIFEST).to_pylist()


def _slides(out: Path) -> dict[str, set[str]]:
    """Slide id -> the slide uris its manifest rows name."""
    got: dict[str, set[str]] = {}
    for row in _manifest(out):
        got.setdefault(row["slide"], set()).add(row["slide_uri"])
    return got


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_follows_the_bytes_not_the_path(tmp_path: Path) -> None:
    from sharding.slide_identity import fingerprint

    a = _slide(tmp_path / "b1" / "S1.svs", seed=1)
    moved = Path(shutil.copy2(a, tmp_path / "elsewhere.svs"))
    other = _slide(tmp_path / "b2" / "S1.svs", seed=2)
    fa, fm, fo = fingerprint(a), fingerprint(moved), fingerprint(other)
    assert fa.uri == str(a.resolve()) and fa.size == a.stat().st_size
    assert fa.same_bytes(fm) and fa.uri != fm.uri
    assert not fa.same_bytes(fo)
    # One byte changed in the last MiB, same size: another slide.
    data = bytearray(a.read_bytes())
    data[-10] ^= 0xFF
    changed = tmp_path / "changed.svs"
    changed.write_bytes(bytes(data))
    assert fingerprint(changed).size == fa.size and not fingerprint(changed).same_bytes(fa)


def test_a_rerun_reuses_the_recorded_fingerprint_of_an_unchanged_file(tmp_path: Path) -> None:
    from sharding.slide_identity import SlideIdentity, fingerprint, identify, stat_slide

    path = _slide(tmp_path / "S1.svs", seed=1)
    first = fingerprint(path)
    assert SlideIdentity.from_record(first.to_record()) == first
    fake = SlideIdentity(first.uri, first.size, first.mtime_or_etag, "f" * 64)
    assert identify(str(path), fake).sha256 == "f" * 64, "an unchanged file is not hashed again"
    path.touch()  # a new mtime: hashed again
    assert identify(str(path), fake).sha256 == first.sha256
    with pytest.raises(SlideError, match=r"missing\.svs: no such file"):
        stat_slide(tmp_path / "missing.svs")


def test_a_slide_on_s3_has_the_fingerprint_of_its_bytes(tmp_path: Path, s3_bucket: str) -> None:
    from sharding.slide_identity import fingerprint

    path = _slide(tmp_path / "S1.svs", seed=3)
    store = open_storage(f"{s3_bucket}/slides")
    store.put_file("b1/S1.svs", path)
    remote = fingerprint(store.child_url("b1/S1.svs"))
    assert remote.uri == f"{s3_bucket}/slides/b1/S1.svs" and remote.mtime_or_etag
    assert remote.same_bytes(fingerprint(path))


# --------------------------------------------------------------------------- one name, two slides


def test_a_new_slide_under_a_taken_name_is_refused_not_skipped(tmp_path: Path) -> None:
    """/batch2/S1.svs is not /batch1/S1.svs: the old code counted it as done."""
    first = _slide(tmp_path / "batch1" / "S1.svs", seed=1)
    second = _slide(tmp_path / "batch2" / "S1.svs", seed=2)
    out = tmp_path / "ds"
    assert run_shard([first], out, **SMALL).ok
    before = (out / MANIFEST).read_bytes()
    with pytest.raises(ShardError) as err:
        run_shard([second], out, **SMALL)
    line = str(err.value)
    assert "\n" not in line and str(second) in line and str(first.resolve()) in line
    assert "--on-conflict suffix" in line
    assert (out / MANIFEST).read_bytes() == before, "nothing written by the refused run"

    # --on-conflict suffix: a distinct id from the slide's bytes, the same on every rerun.
    sid = _suffixed("S1", second)
    got = run_shard([second], out, on_conflict="suffix", **SMALL)
    assert got.ok and any(f"given the id {sid!r}" in n for n in got.notes)
    assert _slides(out) == {"S1": {str(first.resolve())}, sid: {str(second.resolve())}}
    again = run_shard([first, second], out, on_conflict="suffix", **SMALL)
    assert again.ok and again.done_before == 2 and again.new_samples == 0
    verify_dataset(str(out), check_pixels=False)


def test_a_half_done_slide_is_never_finished_with_another_slides_tiles(tmp_path: Path) -> None:
    first = _slide(tmp_path / "batch1" / "S1.svs", seed=1)
    second = _slide(tmp_path / "batch2" / "S1.svs", seed=2)
    out = tmp_path / "ds"
    assert run_shard([first], out, shard_size="60KB", **SMALL).ok
    frags = sorted((out / "_state" / "index").rglob("*.parquet"))
    assert len(frags) >= 2, "the test needs the slide spread over several shards"
    frags[0].unlink()  # an interrupted run: one shard's samples are missing
    with pytest.raises(ShardError, match="already holds slide 'S1'"):
        run_shard([second], out, shard_size="60KB", **SMALL)
    # The slide itself, even moved, is resumed: only its missing regions are cut.
    moved = tmp_path / "batch3" / "S1.svs"
    moved.parent.mkdir()
    shutil.move(first, moved)
    got = run_shard([moved], out, shard_size="60KB", **SMALL)
    assert got.ok and got.new_samples > 0
    rows = _manifest(out)
    assert {r["slide_sha256"] for r in rows} == {_sha(moved)}
    record = json.loads((out / "_state" / "slides" / "S1.json").read_text())
    assert record["uri"] == str(moved.resolve()) and record["sha256"] == _sha(moved)
    assert record["size"] == moved.stat().st_size
    verify_dataset(str(out), check_pixels=False)


def test_a_slide_replaced_in_place_is_not_taken_for_the_one_sharded(tmp_path: Path) -> None:
    """A re-scan saved over the old file: same path, other bytes."""
    path = _slide(tmp_path / "S1.svs", seed=1)
    out = tmp_path / "ds"
    assert run_shard([path], out, **SMALL).ok
    _slide(path, seed=2)
    with pytest.raises(ShardError, match=r"S1\.svs: .* holds slide 'S1' cut from this file before"):
        run_shard([path], out, **SMALL)


def test_names_that_fold_to_one_id_are_refused_up_front(tmp_path: Path) -> None:
    """``A.1`` and ``A-1`` both fold to the id ``A-1``: refused before anything is written, or
    told apart by ``--on-conflict suffix``, and the labels CSV names each by its file."""
    dotted = _slide(tmp_path / "in" / "A.1.svs", seed=1)
    dashed = _slide(tmp_path / "in" / "A-1.svs", seed=2)
    out = tmp_path / "ds"
    with pytest.raises(ShardError) as err:
        run_shard([tmp_path / "in"], out, **SMALL)
    assert str(dotted) in str(err.value) and str(dashed) in str(err.value)
    assert not out.exists(), "a refused run writes nothing"

    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nA.1.svs,tumor\nA-1,benign\n")
    got = run_shard([tmp_path / "in"], out, on_conflict="suffix", labels=labels, **SMALL)
    assert got.ok, got.problems
    sid = _suffixed("A-1", dotted)
    labels_of = {r["slide"]: r["label"] for r in _manifest(out)}
    assert labels_of == {"A-1": "benign", sid: "tumor"}
    assert _slides(out) == {"A-1": {str(dashed.resolve())}, sid: {str(dotted.resolve())}}
    # Annotation files are matched by name: which slide A.1.geojson belongs to is not known.
    (tmp_path / "geojson").mkdir()
    (tmp_path / "geojson" / "A.1.geojson").write_text(
        '{"type": "FeatureCollection", "features": []}'
    )
    with pytest.raises(ShardError, match="rename the file instead"):
        run_shard([tmp_path / "in"], out, on_conflict="suffix", annotations=tmp_path / "geojson",
                  **SMALL)  # fmt: skip


def test_the_same_bytes_under_two_paths_of_one_id_are_one_slide(tmp_path: Path) -> None:
    a = _slide(tmp_path / "b1" / "S1.svs", seed=1)
    (tmp_path / "b2").mkdir()
    b = Path(shutil.copy2(a, tmp_path / "b2" / "S1.svs"))
    got = run_shard([a, b], tmp_path / "ds", **SMALL)
    assert got.ok and any(str(b) in n and "same bytes" in n for n in got.notes)
    assert set(_slides(tmp_path / "ds")) == {"S1"}


def test_on_conflict_takes_refuse_or_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--on-conflict"):
        run_shard([tmp_path], tmp_path / "ds", on_conflict="rename", **SMALL)


# --------------------------------------------------------------------------- nothing read


def test_only_missing_inputs_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = run_shard([tmp_path / "gone.svs", tmp_path / "also-gone.svs"], out, **SMALL)
    assert not report.ok
    assert report.skipped[str(tmp_path / "gone.svs")] == "no such file: check the path"
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    # The command line: exit 1, and still nothing written (config.yaml included).
    cmd = [sys.executable, "-m", "resdistill", "shard", str(tmp_path / "gone.svs"), "--out",
           str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "COLUMNS": "300"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert "gone.svs" in res.stderr and not out.exists()


def test_unreadable_slides_lock_no_settings(tmp_path: Path) -> None:
    """A file that is there but no slide is read (its plan fails): no config, manifest or
    dataset.json, so a later run with other settings is not refused."""
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide")
    out = tmp_path / "ds"
    report = run_shard([bad], out, **SMALL)
    assert not report.ok and str(bad) in report.skipped
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert [f for f in left if "lease" not in f] == [], left  # the lease's own files aside
    good = _slide(tmp_path / "S1.svs", seed=1)
    assert run_shard([good], out, **{**SMALL, "tile_px": 64}).ok


def test_relative_slide_paths_are_made_absolute(tmp_path: Path, monkeypatch) -> None:
    """A Ray worker of ``ray start`` or a cluster runs in another folder: a relative path given on
    the command line must reach it as the absolute path of the same file."""
    from sharding.inputs import slide_inputs

    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "S1.svs").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    pairs, problems = slide_inputs(["slides/S1.svs", "slides"])
    assert problems == []
    assert pairs == [("S1", str(tmp_path / "slides" / "S1.svs"))]
