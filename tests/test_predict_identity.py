"""A prediction belongs to its slide: its path and its bytes, never just its name.

``/batch1/case7/S1.svs`` is predicted into ``--out``; ``/batch2/case9/S1.svs`` (other bytes, same
name) must never be taken as done with case 7's class: it is refused with one line naming both
files, or with ``--on-conflict suffix`` predicted under its own id. The same bytes moved to
another folder are still the slide (skipped as done). Two slides whose names fold to one id
(``A.1`` and ``A-1``) are refused before anything is written. Every record names its source:
``<slide>.json``, the slide's tiles part and ``slides.parquet`` carry its uri, size and
fingerprint. Real slides (tifffile pyramids read by OpenSlide) on the session's Ray cluster.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sharding.slide_identity import fingerprint
from tests.cli_lines import error_lines
from tests.slide_factory import blob_image, write_slide
from tests.test_evaluate import save_checkpoint
from tests.test_predict_scale import chain, model, predict, table

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _slide(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_slide(path, blob_image(1024, 768, seed=seed), app_mag=5, mpp=2.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ident")
    return save_checkpoint(
        root / "student", model(0, 0.2), stage="student", mag="1p25x", tile_px=16,
        read_chain=chain(),
    )  # fmt: skip


def test_a_slide_with_a_done_ones_name_is_not_done(
    ckpt: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case7 = _slide(tmp_path / "batch1" / "case7" / "S1.svs", seed=0)
    case9 = _slide(tmp_path / "batch2" / "case9" / "S1.svs", seed=5)
    out = tmp_path / "out"
    assert predict(ray_cluster, ckpt, [str(case7)], str(out)) == 0
    record = json.loads((out / "S1.json").read_text())
    want = fingerprint(case7)
    assert record["source"] == want.to_record()
    part = pq.read_schema(out / "parts" / "S1.tiles.parquet").metadata[b"resdistill.source"]
    assert json.loads(part) == want.to_record()
    row = table(str(out), "slides.parquet").iloc[0]
    assert (row.slide_uri, row.slide_size, row.slide_sha256) == (
        str(case7),
        case7.stat().st_size,
        want.sha256,
    )
    capsys.readouterr()

    rc = predict(ray_cluster, ckpt, [str(case9)], str(out))
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1, errors
    assert str(case9) in errors[0] and str(case7) in errors[0] and "--on-conflict" in errors[0]
    assert json.loads((out / "S1.json").read_text()) == record  # nothing already written is lost

    rc = predict(ray_cluster, ckpt, [str(case9)], str(out), "--on-conflict", "suffix")
    assert rc == 0
    alt = f"S1-{fingerprint(case9).sha256[:8]}"
    rows = table(str(out), "slides.parquet").set_index("slide")
    assert list(rows.index) == [alt]
    assert rows.loc[alt, "slide_uri"] == str(case9)
    tiles = table(str(out), "tiles.parquet")
    mine = tiles[tiles["slide"] == alt][["p_benign", "p_tumor"]].to_numpy().mean(axis=0)
    assert rows.loc[alt, ["p_benign", "p_tumor"]].astype(float).tolist() == pytest.approx(mine)
    assert json.loads((out / "S1.json").read_text()) == record
    assert json.loads((out / f"{alt}.json").read_text())["source"]["uri"] == str(case9)
    capsys.readouterr()

    # the same ids again (a rerun): both done, each by its own bytes
    rc = predict(ray_cluster, ckpt, [str(case7), str(case9)], str(out), "--on-conflict", "suffix")
    assert rc == 0 and "2 done before (skipped)" in capsys.readouterr().out.replace("\n", " ")
    rows = table(str(out), "slides.parquet").set_index("slide")
    assert rows.loc["S1", "slide_uri"] == str(case7) and rows.loc[alt, "slide_uri"] == str(case9)


def test_a_moved_slide_is_still_done(
    ckpt: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _slide(tmp_path / "scanner" / "S2.svs", seed=1)
    out = tmp_path / "out"
    assert predict(ray_cluster, ckpt, [str(first)], str(out)) == 0
    record = json.loads((out / "S2.json").read_text())
    moved = tmp_path / "archive" / "S2.svs"
    moved.parent.mkdir()
    shutil.move(first, moved)
    capsys.readouterr()
    assert predict(ray_cluster, ckpt, [str(moved)], str(out)) == 0
    assert "1 done before (skipped)" in capsys.readouterr().out.replace("\n", " ")
    assert json.loads((out / "S2.json").read_text()) == record


def test_two_slides_folding_to_one_id_are_refused_up_front(
    ckpt: Path, ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dotted = _slide(tmp_path / "in" / "A.1.svs", seed=2)
    dashed = _slide(tmp_path / "in" / "A-1.svs", seed=3)
    out = tmp_path / "out"
    rc = predict(ray_cluster, ckpt, [str(tmp_path / "in")], str(out))
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1, errors
    assert str(dotted) in errors[0] and str(dashed) in errors[0]
    # refused before anything was written (a lease on --out, if any, is not a result)
    written = (
        [p for p in out.rglob("*") if p.is_file() and "lease" not in p.name] if out.exists() else []
    )
    assert written == []

    rc = predict(ray_cluster, ckpt, [str(tmp_path / "in")], str(out), "--on-conflict", "suffix")
    assert rc == 0
    rows = table(str(out), "slides.parquet").set_index("slide")
    assert sorted(rows["slide_uri"]) == sorted([str(dashed), str(dotted)])
    assert len(set(rows.index)) == 2 and "A-1" in rows.index
