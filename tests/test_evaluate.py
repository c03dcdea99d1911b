"""``resdistill evaluate`` and ``resdistill predict``: metrics, compute table, plots, heatmaps, errors.

Checkpoints are written through ``resdistill.checkpoint.write_checkpoint``, as training writes
them, from small ResNets whose heads are fitted here to a contract-conforming
dataset (``tests.fixtures_data.write_dataset``), so that the metrics are far from chance and a
label or key mix-up would show. Predictions are checked against an independent pass that reads
the tar shards with ``tarfile`` and PIL, the metrics against ``resdistill.measures.bootstrap`` and
scikit-learn on those predictions, the FLOPs against ``count_flops``, and ``predict`` against the
sharding planner's functions on the real Aperio slide.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from resdistill import checkpoint as T
from resdistill.commands import evaluate as eval_cmd
from resdistill.commands import predict as predict_cmd
from resdistill.models import build_model
from tests.fixtures_data import write_dataset

pytestmark = pytest.mark.timeout(300)

CLASSES = ("benign", "tumor")
TEST_SAMPLES = 48
TEST_SLIDES = 6


# ---------------------------------------------------------------------------------------------
# Fixtures: a dataset and checkpoints in the teacher's format
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    *,
    stage: str,
    mag: str,
    tile_px: int,
    classes: tuple[str, ...] | list[str] = CLASSES,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    dataset: str = "",
    read_chain: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` into ``folder`` through the project's writer
    (:func:`resdistill.checkpoint.write_checkpoint`), normalised with ``mean``/``std`` (default
    0.5/0.25) and with ``read_chain``, the dataset's read chain as training records it."""
    card = T.ModelCard(
        stage=stage, arch="resnet18", classes=tuple(classes), mag=mag, tile_px=tile_px,
        normalization={"mean": mean or [0.5, 0.5, 0.5], "std": std or [0.25, 0.25, 0.25]},
        dataset=dataset, read_chain=read_chain or {},
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    T.write_checkpoint(
        folder, card=card, state_dict=model.state_dict(), trainer={}, epoch=1, metrics={}
    )
    return folder


def _fit(data: Path, mag: str, seed: int, dims: int | None = None) -> torch.nn.Module:
    """A resnet18 (random convolutions, seeded) whose head is fitted to the train split at ``mag``.

    The head is the nearest-class-mean classifier on the pooled features ``f``:
    ``logit_k = (f . mu_k - |mu_k|^2 / 2) / c`` with ``mu_k`` the mean feature of class ``k`` and
    ``c = |mu_1 - mu_0|^2 / 4`` (a margin of 2 logits at the class means), so the model is far
    better than chance in no time (gradient steps crawl on a loaded 2-core machine). With
    ``dims`` only the first ``dims`` features are used: a weaker model, with errors to measure.
    """
    from resdistill.data import DatasetInfo, make_loader

    torch.manual_seed(seed)
    info = DatasetInfo.load(str(data))
    model = build_model("resnet18", info.num_classes).eval()
    loader = make_loader(
        info, ["train"], [mag], batch_size=64, train=False, num_workers=0, labelled_only=True
    )
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader.epoch():
            feats.append(torch.flatten(model.net.avgpool(model.features(batch.images[0])), 1))
            labels.append(batch.labels)
    f, y = torch.cat(feats), torch.cat(labels)
    if dims is not None:
        f[:, dims:] = 0
    mu = torch.stack([f[y == k].mean(0) for k in range(info.num_classes)])
    c = float(((mu[1] - mu[0]) ** 2).sum()) / 4
    with torch.no_grad():
        model.net.fc.weight.copy_(mu / c)
        model.net.fc.bias.copy_(-(mu**2).sum(1) / (2 * c))
    return model


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10x (32 px) + 5x (16 px); test split: 48 tiles of 6 slides (3 per class) in 3 shards."""
    root = tmp_path_factory.mktemp("eval-data")
    write_dataset(
        root,
        classes=CLASSES,
        samples={"train": 64, "test": TEST_SAMPLES},
        shards={"train": 2, "test": 3},
        slides_per_split=TEST_SLIDES,
        seed=3,
    )
    return root


@pytest.fixture(scope="module")
def checkpoints(eval_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fitted 10x "teacher" and a weaker 5x "student" checkpoint, with the dataset's
    normalization."""
    from resdistill.data import DatasetInfo

    info = DatasetInfo.load(str(eval_data))
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for stage, mag, px, dims in (("teacher", "10x", 32, None), ("student", "5x", 16, 2)):
        model = _fit(eval_data, mag, seed=1, dims=dims)
        mean, std = info.mean_std(mag)
        out[stage] = save_checkpoint(
            root / stage / "checkpoint_epoch0001", model, stage=stage, mag=mag, tile_px=px,
            mean=list(mean), std=list(std), dataset=str(eval_data),
        )  # fmt: skip
    return out


def _cli(module: Any, argv: list[str]) -> int:
    """``resdistill <module's command> ARGV`` as the command line runs it (the generated parser,
    then ``run``): the exit status, 2 for an option the config refuses."""
    from resdistill.commands.generate import main

    try:
        return main(module.SPEC, module.run, argv)
    except SystemExit as exc:  # argparse's exit for a refused option, --help, --print-config
        return int(exc.code or 0)


def _load(folder: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of checkpoint ``folder`` and its card (as a dict)."""
    loaded = T.load_model(folder)
    return loaded.model, loaded.meta


@pytest.fixture(scope="module")
def reference(eval_data: Path, checkpoints: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """:func:`_independent_predictions` of each checkpoint (computed once)."""
    return {stage: _independent_predictions(eval_data, ckpt) for stage, ckpt in checkpoints.items()}


def _independent_predictions(data: Path, ckpt: Path, split: str = "test") -> dict[str, Any]:
    """Read every test shard with tarfile + PIL and run the model: key -> (slide, label, probs)."""
    import pyarrow.parquet as pq

    model, payload = _load(ckpt)
    mean = torch.tensor(payload["normalization"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(payload["normalization"]["std"]).view(1, 3, 1, 1)
    manifest = pq.read_table(data / "manifest.parquet").to_pylist()
    rows = {r["key"]: r for r in manifest if r["split"] == split}
    out = {}
    for shard in sorted({r["shard"] for r in rows.values()}):
        with tarfile.open(data / shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext != f"{payload['mag']}.jpg":
                    continue
                img = np.asarray(
                    Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                )
                x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255.0
                with torch.no_grad():
                    logits, _ = model((x - mean) / std)
                probs = torch.softmax(logits, 1)[0].numpy().astype(np.float64)
                out[key] = (rows[key]["slide"], CLASSES.index(rows[key]["label"]), probs)
    assert len(out) == len(rows)
    return out


def _approx_metrics(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "macro_auc"):
        for bound in ("value", "low", "high"):
            assert ours[key][bound] == pytest.approx(ref[key][bound], abs=1e-6), (key, bound)
    for c in CLASSES:
        for bound in ("value", "low", "high"):
            assert ours["auc"][c][bound] == pytest.approx(ref["auc"][c][bound], abs=1e-6)
    assert ours["confusion_matrix"] == ref["confusion_matrix"]
    assert ours["n"] == ref["n"]


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(
    eval_data: Path, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("eval-out")
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = _cli(
            eval_cmd,
            [
                str(checkpoints["teacher"]), str(checkpoints["student"] / T.MODEL_FILE),
                "--data", str(eval_data), "--split", "test", "--out", str(out),
                "--n-boot", "300", "--bench-seconds", "0.2", "--bench-batch", "8",
                "--loader-workers", "1", "--batch-size", "10",
            ],
        )  # fmt: skip
    return rc, out, buf.getvalue()


def test_evaluate_predictions_match_an_independent_pass(
    evaluated: tuple[int, Path, str], reference: dict[str, dict[str, Any]]
) -> None:
    rc, out, _ = evaluated
    assert rc == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "student"]
    for m, stage in zip(report["models"], ("teacher", "student"), strict=True):
        ref = reference[stage]
        lines = (out / f"predictions-{stage}.csv").read_text().splitlines()
        assert lines[0] == "key,slide,label,prob_benign,prob_tumor"
        rows = [line.split(",") for line in lines[1:]]
        assert sorted(r[0] for r in rows) == sorted(ref)  # every test tile exactly once
        for key, slide, label, *probs in rows:
            assert slide == ref[key][0]
            assert label == CLASSES[ref[key][1]]
            np.testing.assert_allclose([float(p) for p in probs], ref[key][2], atol=2e-5)
        assert m["n_tiles"] == TEST_SAMPLES
        assert m["mag"] == ("10x" if stage == "teacher" else "5x")


def test_evaluate_metrics_match_resdistill_metrics_and_sklearn(
    evaluated: tuple[int, Path, str], reference: dict[str, dict[str, Any]]
) -> None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from resdistill.measures.bootstrap import evaluate_predictions
    from resdistill.measures.metrics import aggregate_slides

    report = json.loads((evaluated[1] / "evaluation.json").read_text())
    for m in report["models"]:
        ref = reference[m["name"]]
        keys = sorted(ref)
        y = np.array([ref[k][1] for k in keys])
        p = np.array([ref[k][2] for k in keys])
        slides = np.array([ref[k][0] for k in keys])
        tile = m["tile"]
        assert report["n_boot"] == 300 and tile["n_boot"] == 300
        # bootstrap draws depend on the tile order: compare in the report's own order
        lines = (evaluated[1] / f"predictions-{m['name']}.csv").read_text().splitlines()[1:]
        order = [line.split(",", 1)[0] for line in lines]
        y_o = np.array([ref[k][1] for k in order])
        p_o = np.array([ref[k][2] for k in order])
        s_o = np.array([ref[k][0] for k in order])
        # tile intervals resample slides (each with all its tiles)
        _approx_metrics(
            tile,
            evaluate_predictions(y_o, p_o, CLASSES, n_boot=300, seed=0, groups=s_o, unit="slide"),
        )
        assert (tile["resample"], tile["n_units"], tile["n_slides"]) == ("slide", 6, 6)
        assert (m["n_tiles"], m["n_slides"], m["resample"]) == (TEST_SAMPLES, TEST_SLIDES, "slide")
        assert tile["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)))
        assert tile["macro_f1"]["value"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
        assert tile["auc"]["tumor"]["value"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-9)
        lo, hi = tile["accuracy"]["low"], tile["accuracy"]["high"]
        assert lo <= tile["accuracy"]["value"] <= hi
        lo, hi = tile["macro_auc"]["low"], tile["macro_auc"]["high"]
        assert 0 <= lo <= hi <= 1
        # fitted models are far from chance on this data: labels and keys were not mixed up
        assert tile["accuracy"]["value"] >= (0.9 if m["name"] == "teacher" else 0.6)
        if tile["accuracy"]["value"] < 1:
            assert tile["accuracy"]["high"] > tile["accuracy"]["low"]
        # slide level: mean tile probability per slide
        agg = aggregate_slides(slides, p, y)
        slide_ref = evaluate_predictions(agg.y_true, agg.y_prob, CLASSES, n_boot=300, seed=0)
        assert m["slide"]["n"] == TEST_SLIDES == slide_ref["n"]
        assert m["slide"]["slides"] == [str(s) for s in agg.slide_ids]
        np.testing.assert_allclose(m["slide"]["prob"], agg.y_prob, atol=2e-5)
        assert m["slide"]["accuracy"]["value"] == pytest.approx(slide_ref["accuracy"]["value"])
        assert m["slide"]["confusion_matrix"] == slide_ref["confusion_matrix"]


def test_evaluate_compute_table_counts_flops(
    evaluated: tuple[int, Path, str], checkpoints: dict[str, Path]
) -> None:
    from resdistill.measures.compute import count_flops, count_params

    rc, out, stdout = evaluated
    report = json.loads((out / "evaluation.json").read_text())
    flops = {}
    for m in report["models"]:
        model, payload = _load(checkpoints[m["name"]])
        px = payload["tile_px"]
        c = m["compute"]
        assert c["input_shape"] == [3, px, px]
        assert c["flops"] == count_flops(model, (3, px, px)) > 0
        assert c["params"] == count_params(model)
        assert c["images_per_s"] > 0
        flops[m["name"]] = c["flops"]
    assert flops["student"] < flops["teacher"]
    # the one table names both models with their magnification and numbers
    assert "teacher" in stdout and "student" in stdout and "10x" in stdout and "5x" in stdout
    acc = report["models"][0]["tile"]["accuracy"]
    assert f"{acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]" in stdout
    # the resampling unit and the slides beside the tiles
    assert "resamples of slides" in stdout and f"{TEST_SAMPLES} ({TEST_SLIDES})" in stdout


def test_evaluate_writes_valid_plots(evaluated: tuple[int, Path, str]) -> None:
    out = evaluated[1]
    report = json.loads((out / "evaluation.json").read_text())
    for name in ("roc.png", "accuracy_vs_flops.png"):
        path = out / name
        assert report["files"][name.removesuffix(".png")] == str(path)
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width > 200 and img.height > 200
            img.verify()
        with Image.open(path) as img:  # not a blank canvas
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def test_evaluate_writes_its_config(
    evaluated: tuple[int, Path, str], eval_data: Path, checkpoints: dict[str, Path]
) -> None:
    """``<out>/config.yaml``: the resolved options and the dataset's fingerprint; ``--config`` on
    it resolves to the run's config (paths absolute)."""
    import yaml

    from resdistill.commands.generate import parse
    from resdistill.data import DatasetInfo
    from resdistill.run_config import dataset_fingerprint

    rc, out, _ = evaluated
    assert rc == 0
    doc = yaml.safe_load((out / "config.yaml").read_text())
    assert doc["resdistill"]["command"] == "evaluate"
    raw = DatasetInfo.load(str(eval_data)).raw
    assert doc["dataset"]["fingerprint"] == dataset_fingerprint(raw)
    again = parse(eval_cmd.SPEC, ["--config", str(out / "config.yaml")])
    ckpts = (str(checkpoints["teacher"]), str(checkpoints["student"] / T.MODEL_FILE))
    assert (again.checkpoints, again.data, again.out) == (ckpts, str(eval_data), str(out))
    assert (again.n_boot, again.bench_batch, again.batch_size, again.loader_workers) == (
        300,
        8,
        10,
        1,
    )


def test_evaluate_tune_result_json_on_s3(
    tiny_dataset_s3: str, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoint, dataset and output on S3; the model named by a tune result JSON."""
    from resdistill.eval.config import EvaluateConfig
    from resdistill.eval.evaluate import evaluate_models
    from sharding.storage import open_storage

    ckpt_url = tiny_dataset_s3.rsplit("/", 1)[0] + "/runs/t1/checkpoint_epoch0001"
    store = open_storage(ckpt_url)
    for f in (T.MODEL_FILE, T.META_FILE):
        store.put_file(f, checkpoints["teacher"] / f)
    tune = tmp_path / "best.json"
    tune.write_text(json.dumps({"checkpoint": ckpt_url, "config": {"lr": 0.01, "stage": "x"}}))
    out = tiny_dataset_s3.rsplit("/", 1)[0] + "/eval"
    report = evaluate_models(EvaluateConfig(
        checkpoints=(str(tune),), data=tiny_dataset_s3, split="test", out=out, n_boot=50,
        loader_workers=0, bench_seconds=0.05, bench_batch=4, plots=False,
    ))  # fmt: skip
    (m,) = report.models
    assert m.model.url == ckpt_url
    assert m.name == "teacher"
    assert m.model.config == {"lr": 0.01, "stage": "x"}
    assert len(m.predictions) == 8  # the tiny dataset's test split
    doc = json.loads(open_storage(out).read_bytes("evaluation.json"))
    assert doc["models"][0]["config"]["lr"] == 0.01
    assert doc["data"] == tiny_dataset_s3
    assert open_storage(out).exists("predictions-teacher.csv")

    from resdistill.checkpoint import CheckpointError, load_model

    missing = tiny_dataset_s3.rsplit("/", 1)[0] + "/runs/t1/checkpoint_epoch0009"
    with pytest.raises(CheckpointError, match="no model.pt there"):
        load_model(missing)
    with pytest.raises(CheckpointError, match="is a run folder"):
        load_model(ckpt_url.rsplit("/", 1)[0])


def test_resolve_spec_forms(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """A folder, its model.pt, a tune result, a run summary, a relative path in a JSON."""
    from resdistill.checkpoint import load_model, resolve_spec

    folder = checkpoints["teacher"]
    assert resolve_spec(folder) == (str(folder), T.MODEL_FILE, None)
    assert resolve_spec(folder / T.MODEL_FILE) == (str(folder), T.MODEL_FILE, None)
    summary = folder.parent / "summary.json"
    summary.write_text(json.dumps({"best_checkpoint": str(folder), "latest_checkpoint": "x"}))
    assert resolve_spec(summary) == (str(folder), T.MODEL_FILE, None)
    tune = folder.parent / "tune.json"
    tune.write_text(json.dumps({"checkpoint": folder.name, "config": {"temperature": 2.0}}))
    assert resolve_spec(tune) == (str(folder), T.MODEL_FILE, {"temperature": 2.0})
    loaded = load_model(tune, name="kd")
    assert (loaded.name, loaded.mag, loaded.tile_px, loaded.classes) == (
        "kd",
        "10x",
        32,
        list(CLASSES),
    )
    assert not loaded.model.training
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}}))
    with pytest.raises(ValueError, match="names no checkpoint"):
        resolve_spec(bad)


def _bad_ckpt(root: Path, name: str, **kw: Any) -> Path:
    torch.manual_seed(0)
    classes = kw.pop("classes", CLASSES)
    return save_checkpoint(
        root / name, build_model("resnet18", len(classes)), classes=classes, **kw
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "no such checkpoint"),
        ("run-folder", "is a run folder, not a checkpoint"),
        ("mag", "works at 2.5x but dataset"),
        ("classes", "class mismatch"),
        ("tile-px", "trained on 64 px tiles at 10x"),
        ("split", "has no labelled tiles"),
        ("not-a-checkpoint", "not a readable checkpoint"),
    ],
)
def test_evaluate_errors_are_one_line(
    case: str,
    needle: str,
    eval_data: Path,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt: Path = checkpoints["teacher"]
    split = "test"
    if case == "missing":
        ckpt = tmp_path / "nowhere" / "checkpoint_epoch0003"
    elif case == "run-folder":
        ckpt = checkpoints["teacher"].parent
    elif case == "mag":
        ckpt = _bad_ckpt(tmp_path, "m", stage="student", mag="2p5x", tile_px=8)
    elif case == "classes":
        ckpt = _bad_ckpt(tmp_path, "c", stage="t", mag="10x", tile_px=32, classes=("a", "b", "c"))
    elif case == "tile-px":
        ckpt = _bad_ckpt(tmp_path, "p", stage="t", mag="10x", tile_px=64)
    elif case == "split":
        split = "val"  # the dataset has no val split
    elif case == "not-a-checkpoint":
        ckpt = tmp_path / "junk"
        ckpt.mkdir()
        (ckpt / T.MODEL_FILE).write_bytes(b"not a torch file")
    rc = _cli(
        eval_cmd,
        [str(ckpt), "--data", str(eval_data), "--split", split, "--out", str(tmp_path / "o"),
         "--loader-workers", "0", "--bench-seconds", "0.05"],
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if line.startswith("evaluate: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    if case in ("missing", "mag", "classes"):
        assert str(ckpt) in errors[0]
    assert not (tmp_path / "o" / "evaluation.json").exists()


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def test_predict_real_slide_heatmap(
    real_slide: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import openslide

    from resdistill.predict.heatmaps import LEFT_PX, TOP_PX
    from sharding.slide import read_region_at, slide_info
    from sharding.tissue import detect_tissue, grid, region_size0

    out = tmp_path / "pred"
    ckpt = checkpoints["student"]  # 5x, 16 px tiles: region = 16 px * 2 um / 0.499 um = 64 px
    rc = _cli(predict_cmd, [str(ckpt), str(real_slide), "--out", str(out), "--heatmap", "all"])
    assert rc == 0
    from resdistill.commands.generate import parse

    again = parse(predict_cmd.SPEC, ["--config", str(out / "config.yaml")])  # the run's options
    assert (again.checkpoint, again.slides, again.out, again.heatmap) == (
        str(ckpt),
        (str(real_slide),),
        str(out),
        "all",
    )
    sid = "CMU-1-Small-Region"
    doc = json.loads((out / f"{sid}.json").read_text())
    heat = np.load(out / f"{sid}.heatmap.npy")

    # the planner's grid at the model's magnification, recomputed with the sharding functions
    with openslide.OpenSlide(str(real_slide)) as slide:
        info = slide_info(slide, str(real_slide))
        size0 = region_size0(info, 2.0, 16)
        xs, ys = grid(info.width, info.height, size0)
        frac = detect_tissue(slide, info).fractions(xs, ys, size0)
        thumb = np.asarray(slide.get_thumbnail((1600, 1600)).convert("RGB"))
        model, payload = _load(ckpt)
        i = int(np.flatnonzero(frac >= 0.5)[0])
        tile = np.asarray(read_region_at(slide, info, int(xs[i]), int(ys[i]), size0, 16))
    assert size0 == 64
    rows, cols = info.height // size0, info.width // size0
    assert heat.shape == (rows, cols, 2) == (46, 34, 2)
    assert doc["grid"] == {
        "rows": rows, "cols": cols, "size0": 64, "x0": int(xs[0]), "y0": int(ys[0])
    }  # fmt: skip
    tissue = ~np.isnan(heat[..., 0])
    assert tissue.ravel().tolist() == (frac >= 0.5).tolist()
    tiles = pq.read_table(out / "tiles.parquet").to_pandas()
    assert doc["n_tiles"] == int(tissue.sum()) == len(tiles) > 50
    np.testing.assert_allclose(heat[tissue].sum(axis=1), 1.0, atol=1e-5)

    # slide class = argmax of the mean tile probabilities
    mean = heat[tissue].mean(axis=0)
    assert doc["class"] == CLASSES[int(mean.argmax())]
    np.testing.assert_allclose([doc["probabilities"][c] for c in CLASSES], mean, atol=1e-6)

    # one tile through the model by hand gives the same probabilities
    norm = payload["normalization"]
    x = torch.from_numpy(tile.copy()).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        expected = torch.softmax(model(x)[0], 1)[0].numpy()
    np.testing.assert_allclose(heat[i // cols, i % cols], expected, atol=1e-5)
    first = tiles.iloc[0]
    assert (first["x"], first["y"]) == (xs[i], ys[i])
    assert [first[f"p_{c}"] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)

    # heatmap PNGs: the slide picture (long side --heatmap-px) painted on tissue cells,
    # untouched elsewhere
    assert (doc["background"]["width"], doc["background"]["height"]) == thumb.shape[1::-1]
    sx, sy = info.width / thumb.shape[1], info.height / thumb.shape[0]
    for c in CLASSES:
        with Image.open(out / f"{sid}.heatmap-{c}.png") as img:
            assert img.format == "PNG"
            assert img.size[0] >= thumb.shape[1] and img.size[1] >= thumb.shape[0]
            picture = np.asarray(img.convert("RGB"))
        # the slide picture lies in the PNG at (LEFT_PX, TOP_PX), one pixel per pixel
        arr = picture[TOP_PX : TOP_PX + thumb.shape[0], LEFT_PX : LEFT_PX + thumb.shape[1]]

        def cell(j: int, arr: np.ndarray = arr) -> tuple[np.ndarray, np.ndarray]:
            x0, y0 = int(round(xs[j] / sx)), int(round(ys[j] / sy))
            x1, y1 = int(round((xs[j] + size0) / sx)), int(round((ys[j] + size0) / sy))
            return arr[y0:y1, x0:x1], thumb[y0:y1, x0:x1]

        painted, base = cell(i)
        assert np.abs(painted.astype(int) - base.astype(int)).mean() > 5
        bare = int(np.flatnonzero(frac < 0.5)[0])
        painted, base = cell(bare)
        assert np.array_equal(painted, base)


def test_predict_errors(
    real_slide: Path,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a file that is not a slide: skipped with one line naming it, exit 1
    junk = tmp_path / "broken.svs"
    junk.write_bytes(b"this is not a slide")
    rc = _cli(predict_cmd, [str(checkpoints["student"]), str(junk), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = [x for x in err.splitlines() if "skipped" in x]
    assert str(junk) in line and "not a slide OpenSlide can read" in line
    assert not (tmp_path / "o" / "broken.json").exists()

    # a model at 40x on a 20x slide: refused, never upsampled
    ckpt = _bad_ckpt(tmp_path, "hi", stage="teacher", mag="40x", tile_px=32)
    rc = _cli(predict_cmd, [str(ckpt), str(real_slide), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "never upsamples" in err and str(real_slide) in err

    # checkpoint not found
    rc = _cli(predict_cmd, [str(tmp_path / "none"), str(real_slide), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such checkpoint" in err[0]

    # unknown heatmap class
    rc = _cli(
        predict_cmd,
        [str(checkpoints["student"]), str(real_slide), "--out", str(tmp_path / "o"), "--heatmap", "x"],
    )  # fmt: skip
    assert rc == 2 and "unknown class" in capsys.readouterr().err
