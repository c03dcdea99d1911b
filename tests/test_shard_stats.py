"""dataset.json's normalisation statistics come from the training data only (train and
unlabeled): val and test pixels never move them, and the file says which splits they used."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sharding.manifest import STATS_SPLITS, dataset_description, manifest_schema
from sharding.pipeline import run_shard
from tests.dataset_checks import verify_dataset
from tests.slide_factory import blob_image, write_slide

MAG = "10x"


def _table(values: dict[str, float]) -> pa.Table:
    """A manifest of two samples per split; every channel of a ``split`` sample has the pixel
    mean ``values[split]`` and mean square ``values[split] ** 2`` (a flat image)."""
    rows = []
    for split, v in values.items():
        for i in range(2):
            rows.append({"key": f"{split}{i}_0_0", "slide": f"{split}{i}", "x": 0, "y": 0,
                         "split": split, "label": None if split == "unlabeled" else "a",
                         "shard": f"{split}/shard-000000.tar", f"mean_{MAG}": [v] * 3,
                         f"sqmean_{MAG}": [v * v] * 3})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=manifest_schema([MAG]))


def _describe(table: pa.Table) -> dict:
    return dataset_description(
        table, mags=[(MAG, 1.0)], tile_px={MAG: 32}, image_format="jpeg", classes=["a"],
        splits={"train": 0.7, "val": 0.15, "test": 0.15}, seed=0, min_tissue=0.5, tool="test",
    )  # fmt: skip


def test_statistics_ignore_val_and_test_samples() -> None:
    """Train at 0.2 and unlabeled at 0.6 (equal counts): mean 0.4, std 0.2 whatever val and test
    hold; the old formula over every split would have moved with them."""
    base = _describe(_table({"train": 0.2, "unlabeled": 0.6, "val": 0.5, "test": 0.5}))
    moved = _describe(_table({"train": 0.2, "unlabeled": 0.6, "val": 0.95, "test": 0.01}))
    for desc in (base, moved):
        stats = desc["normalization"][MAG]
        assert stats["mean"] == pytest.approx([0.4] * 3, abs=1e-6)
        assert stats["std"] == pytest.approx([0.2] * 3, abs=1e-5)
        assert desc["stats_splits"] == list(STATS_SPLITS) == ["train", "unlabeled"]
        assert desc["samples"] == 8 and desc["counts"]["test"]["samples"] == 2


def test_no_training_samples_leaves_no_statistics() -> None:
    """A held-out-only dataset records none (readers fall back), never test-split numbers."""
    desc = _describe(_table({"val": 0.5, "test": 0.3}))
    assert desc["normalization"] == {} and desc["stats_splits"] == ["train", "unlabeled"]


def _stats(rows: list[dict], mag: str, splits: tuple[str, ...]) -> tuple[list, list]:
    keep = [r for r in rows if r["split"] in splits]
    mean = np.mean([r[f"mean_{mag}"] for r in keep], axis=0)
    sq = np.mean([r[f"sqmean_{mag}"] for r in keep], axis=0)
    return mean.tolist(), [math.sqrt(max(v, 1e-12)) for v in (sq - mean**2)]


def _slides(folder: Path, recolour: str | None = None) -> Path:
    """Four labelled 40x slides and an unlabelled one; ``recolour``'s tissue is blue, not pink."""
    folder.mkdir()
    for i in range(5):
        img = blob_image(768, 768, seed=i)
        if f"s{i}" == recolour:
            img = img[..., ::-1].copy()
        write_slide(folder / f"s{i}.svs", img, app_mag=40, mpp=0.25)
    rows = ["slide,label", "s0,benign", "s1,tumor", "s2,benign", "s3,tumor"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_sharded_dataset_statistics_do_not_see_the_test_slide(tmp_path: Path) -> None:
    """Shard the same cohort twice, the second time with the test slide's colours changed: the
    test split's pixels differ, dataset.json's statistics stay the same, and they are the
    train + unlabeled rows' exact mean/std."""
    kw = {"mags": "10,5", "tile_px": 64, "splits": (0.5, 0.25, 0.25), "workers": 0,
          "progress": False}  # fmt: skip
    first = _slides(tmp_path / "a")
    assert run_shard([first], str(tmp_path / "ds-a"), labels=first / "labels.csv", **kw).ok
    a = verify_dataset(str(tmp_path / "ds-a"), check_pixels=False)
    split = {s: next(iter(v)) for s, v in a["slides"].items()}
    (test_slide,) = [s for s, v in split.items() if v == "test"]

    second = _slides(tmp_path / "b", recolour=test_slide)
    assert run_shard([second], str(tmp_path / "ds-b"), labels=second / "labels.csv", **kw).ok
    b = verify_dataset(str(tmp_path / "ds-b"), check_pixels=False)
    assert {s: next(iter(v)) for s, v in b["slides"].items()} == split

    for mag in ("10x", "5x"):
        test_a = _stats(a["rows"], mag, ("test",))[0]
        test_b = _stats(b["rows"], mag, ("test",))[0]
        assert abs(test_a[0] - test_b[0]) > 0.05, "the recoloured test slide should differ"
        assert a["desc"]["normalization"][mag] == b["desc"]["normalization"][mag]
        mean, std = _stats(a["rows"], mag, STATS_SPLITS)
        assert a["desc"]["normalization"][mag]["mean"] == pytest.approx(mean, abs=1e-5)
        assert a["desc"]["normalization"][mag]["std"] == pytest.approx(std, abs=1e-5)
    assert b["desc"]["stats_splits"] == ["train", "unlabeled"]
    assert json.loads((tmp_path / "ds-b" / "dataset.json").read_text())["stats_splits"]
