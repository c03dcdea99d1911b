"""End-to-end sharding through the CLI on a real local Ray cluster: local folder and S3 endpoint,
resume, kill -9, and every kind of bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sharding.pipeline import SCRATCH_PREFIX
from sharding.storage import open_storage
from tests.dataset_checks import verify_dataset
from tests.fixtures_ray import wait_for
from tests.slide_factory import blob_image, truncate, write_slide

pytestmark = pytest.mark.slow


def shard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "resdistill", "shard", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def blob_slides(tmp_path_factory) -> Path:
    """Three small 40x Aperio-style slides with one tissue island each."""
    folder = tmp_path_factory.mktemp("blobs")
    for i, (w, h) in enumerate([(2048, 1536), (1536, 1536), (2560, 1024)]):
        write_slide(folder / f"blob-{i}.svs", blob_image(w, h, seed=i), app_mag=40, mpp=0.25)
    (folder / "labels.csv").write_text("slide,label,patient\nblob-0,tumor,P0\nblob-1,benign,P1\n")
    return folder


MAGS = ["--mags", "20,10,5", "--tile-px", "128"]


def test_shard_local_roundtrip_and_resume(blob_slides, tmp_path, ray_cluster):
    out = tmp_path / "ds"
    res = shard(
        str(blob_slides),
        "--out",
        str(out),
        *MAGS,
        "--labels",
        str(blob_slides / "labels.csv"),
        "--shard-size",
        "300KB",
        "--address",
        ray_cluster,
    )
    assert res.returncode == 0, res.stderr
    report = verify_dataset(str(out))
    desc = report["desc"]
    assert desc["magnifications"] == ["20x", "10x", "5x"]
    assert desc["tile_px"] == {"20x": 128, "10x": 64, "5x": 32}
    assert desc["classes"] == ["benign", "tumor"]
    assert set(report["slides"]) == {"blob-0", "blob-1", "blob-2"}
    assert report["slides"]["blob-2"] == {"unlabeled"}
    assert desc["counts"]["unlabeled"]["per_class"] == {}
    assert desc["counts"]["train"]["shards"] >= 2, "shards should stay near --shard-size"
    for stats in desc["normalization"].values():
        assert all(0 < m < 1 for m in stats["mean"]) and all(0 < s < 0.5 for s in stats["std"])
    assert "Sharded into" in res.stderr and "total" in res.stderr

    # A rerun with the same inputs does nothing and leaves the same manifest.
    before = (out / "manifest.parquet").read_bytes()
    again = shard(
        str(blob_slides),
        "--out",
        str(out),
        *MAGS,
        "--labels",
        str(blob_slides / "labels.csv"),
        "--shard-size",
        "300KB",
        "--address",
        ray_cluster,
    )
    assert again.returncode == 0, again.stderr
    assert "3 slide(s) already done" in again.stderr
    assert (out / "manifest.parquet").read_bytes() == before

    # Other settings on the same output are refused with one line, nothing touched.
    clash = shard(
        str(blob_slides),
        "--out",
        str(out),
        "--mags",
        "20,10",
        "--tile-px",
        "128",
        "--address",
        ray_cluster,
    )
    assert clash.returncode == 2
    assert "other settings" in clash.stderr and "--overwrite" in clash.stderr
    assert (out / "manifest.parquet").read_bytes() == before


def test_shard_to_s3_multipart(blob_slides, s3_bucket, ray_cluster, monkeypatch):
    monkeypatch.setenv("RESDISTILL_MULTIPART_THRESHOLD", str(5 * 1024 * 1024 + 1))
    url = f"{s3_bucket}/datasets/blobs"
    res = shard(
        str(blob_slides),
        "--out",
        url,
        *MAGS,
        "--labels",
        str(blob_slides / "labels.csv"),
        "--shard-size",
        "6MB",
        "--format",
        "png",
        "--address",
        ray_cluster,
    )
    assert res.returncode == 0, res.stderr
    report = verify_dataset(url)
    assert report["desc"]["image_format"] == "png"
    assert report["samples"] > 50
    store = open_storage(url)
    assert store.exists("manifest.parquet") and store.exists("dataset.json")


def test_kill_9_then_rerun_keeps_manifest_exact(tmp_path, ray_cluster):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        write_slide(slides / f"k{i}.svs", blob_image(3072, 2048, seed=10 + i), app_mag=40, mpp=0.25)
    out = tmp_path / "ds"
    args = [
        sys.executable,
        "-m",
        "resdistill",
        "shard",
        "--no-progress",
        str(slides),
        "--out",
        str(out),
        *MAGS,
        "--shard-size",
        "150KB",
        "--address",
        ray_cluster,
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    index = out / "_state" / "index"
    try:
        wait_for(
            lambda: index.exists() and len(list(index.rglob("*.parquet"))) >= 2,
            timeout=240,
            what="two published shards",
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "manifest.parquet").exists(), "the run finished before it was killed"
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())  # what the child used
    scratch = list(tmp.glob(f"{SCRATCH_PREFIX}{proc.pid}-*"))
    assert scratch, "the killed run should have left its scratch folder"
    # Simulate the worst moment too: a shard published without its index fragment.
    first = sorted((out / "unlabeled").glob("*.tar"))[0]
    shutil.copy(first, out / "unlabeled" / "shard-999999.tar")

    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = verify_dataset(str(out))
    assert not (out / "unlabeled" / "shard-999999.tar").exists()
    assert not any(p.exists() for p in scratch), "the rerun removes the dead run's scratch"

    fresh = tmp_path / "fresh"
    clean = shard(
        str(slides), "--out", str(fresh), *MAGS, "--shard-size", "150KB", "--address", ray_cluster
    )
    assert clean.returncode == 0, clean.stderr
    fresh_rows = verify_dataset(str(fresh), check_pixels=False)["rows"]
    assert {r["key"] for r in report["rows"]} == {r["key"] for r in fresh_rows}
    per_shard: dict[str, set] = {}
    for r in fresh_rows:
        per_shard.setdefault(r["shard"], set()).add(r["slide"])
    assert max(len(v) for v in per_shard.values()) >= 2, (
        f"shards should mix samples of several slides: {per_shard}"
    )


def test_bad_inputs_each_get_one_line_and_the_rest_is_sharded(blob_slides, tmp_path, ray_cluster):
    slides = tmp_path / "in"
    slides.mkdir()
    good = shutil.copy(blob_slides / "blob-0.svs", slides / "good.svs")
    shutil.copy(blob_slides / "blob-1.svs", slides / "good2.svs")
    shutil.copy(blob_slides / "blob-1.svs", slides / "twice.svs")
    shutil.copy(blob_slides / "blob-2.svs", slides / "nolabel.svs")
    truncate(Path(good), slides / "cut.svs", keep=0.4)
    (slides / "notes.tif").write_text("this is not a slide")
    write_slide(slides / "glass.svs", blob_image(1024, 1024, blank=True), app_mag=40, mpp=0.25)
    write_slide(slides / "nompp.tif", blob_image(1024, 1024), app_mag=None)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\ngood,tumor\nnolabel,\nghost,tumor\ntwice,tumor\ntwice,benign\n")
    out = tmp_path / "ds"
    res = shard(
        str(slides), "--out", str(out), *MAGS, "--labels", str(labels), "--address", ray_cluster
    )
    assert res.returncode == 1, res.stderr
    err = " ".join(res.stderr.split())
    for needle in [
        "cut.svs",  # truncated
        "notes.tif: not a slide OpenSlide can read",
        "glass.svs: no region has a tissue fraction",
        "nompp.tif: the slide records neither microns per pixel nor objective power: pass --mpp",
        "'ghost' is not among the input slides",
        "'nolabel' has an empty label",
        "'twice' is listed again",
    ]:
        assert needle in err, needle
    assert "Skipped 6 slide(s)" in err
    report = verify_dataset(str(out))
    # The labelled slide and the slide absent from the CSV are sharded, nothing else.
    assert report["slides"] == {"good": {"train"}, "good2": {"unlabeled"}}
    # With --mpp the slide without metadata is sharded.
    fixed = shard(
        str(slides / "nompp.tif"),
        "--out",
        str(tmp_path / "ds2"),
        *MAGS,
        "--mpp",
        "0.25",
        "--address",
        ray_cluster,
    )
    assert fixed.returncode == 0, fixed.stderr
    assert set(verify_dataset(str(tmp_path / "ds2"))["slides"]) == {"nompp"}


def test_unusable_options_exit_2(blob_slides, tmp_path):
    bad_labels = tmp_path / "l.csv"
    bad_labels.write_text("name,class\n")
    for args, needle in [
        (["--mags", "5,10"], "highest first"),
        (["--tile-px", "224", "--mags", "10,3"], "divides evenly"),
        (["--labels", str(bad_labels)], "no rows"),
        (["--shard-size", "huge"], "cannot read size"),
    ]:
        res = shard(str(blob_slides), "--out", str(tmp_path / "x"), "--workers", "0", *args)
        assert res.returncode == 2, (args, res.stderr)
        assert needle in res.stderr


def test_synthetic_slides_both_formats_to_s3(synthetic_slides, s3_bucket, ray_cluster):
    """SVS and generic TIFF at 20x and 40x, default magnifications, read back from S3."""
    url = f"{s3_bucket}/synth"
    res = shard(
        str(synthetic_slides.root),
        "--out",
        url,
        "--labels",
        str(synthetic_slides.labels_csv),
        "--mags",
        "10,5,2.5",
        "--tile-px",
        "112",
        "--splits",
        "0.5,0.25,0.25",
        "--address",
        ray_cluster,
    )
    assert res.returncode == 0, res.stderr
    report = verify_dataset(url)
    assert set(report["slides"]) == {s.slide for s in synthetic_slides.slides}
    formats = {s.format for s in synthetic_slides.slides}
    assert formats == {"svs", "tiff"}
    rows = report["rows"]
    labels = {s.slide: s.label for s in synthetic_slides.slides if s.labeled}
    assert all(r["label"] == labels.get(r["slide"]) for r in rows)


def test_real_he_slide_and_its_pyramid(real_slide, real_pyramid, tmp_path, ray_cluster):
    """The CC0 Aperio sample (20x, one level) and a multi-level pyramid of the same pixels give
    the same regions; tiles agree within JPEG error."""
    outs = {}
    for name, path in {"flat": real_slide, "pyramid": real_pyramid}.items():
        out = tmp_path / name
        res = shard(
            str(path),
            "--out",
            str(out),
            "--mags",
            "10,5,2.5",
            "--tile-px",
            "128",
            "--address",
            ray_cluster,
        )
        assert res.returncode == 0, res.stderr
        outs[name] = verify_dataset(str(out))
    flat, pyr = outs["flat"], outs["pyramid"]
    assert flat["samples"] > 20, "the real slide has plenty of tissue"
    coords = lambda rep: {(r["x"], r["y"]) for r in rep["rows"]}  # noqa: E731
    overlap = coords(flat) & coords(pyr)
    assert len(overlap) >= 0.9 * len(coords(flat))


def test_slides_read_from_s3_through_node_cache(synthetic_slides, s3_bucket, ray_cluster, tmp_path):
    """s3:// slide inputs are listed, fetched once into the node cache and sharded like local ones."""
    store = open_storage(f"{s3_bucket}/scans")
    chosen = synthetic_slides.slides[:2]
    for s in chosen:
        store.put_file(s.path.name, s.path)
    out = tmp_path / "from-s3"
    res = shard(
        f"{s3_bucket}/scans",
        "--out",
        str(out),
        "--mags",
        "10,5",
        "--tile-px",
        "64",
        "--address",
        ray_cluster,
    )
    assert res.returncode == 0, res.stderr
    report = verify_dataset(str(out))
    assert set(report["slides"]) == {s.slide for s in chosen}
    local = tmp_path / "from-disk"
    res = shard(
        *[str(s.path) for s in chosen],
        "--out",
        str(local),
        "--mags",
        "10,5",
        "--tile-px",
        "64",
        "--address",
        ray_cluster,
    )
    assert res.returncode == 0, res.stderr
    assert {r["key"] for r in report["rows"]} == {
        r["key"] for r in verify_dataset(str(local))["rows"]
    }
