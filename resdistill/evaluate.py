"""Evaluate trained models on a dataset split: tile and slide metrics, compute cost, plots.

Pipeline for each model (a checkpoint folder, its ``model.pt``, or a tune result JSON)::

    load_model(spec)                      weights + metadata (stage, arch, classes, mag, tile_px,
                                          normalization) from ``model.pt`` (local or s3://)
    predict_split(model, dataset, split)  every labelled tile of the split at the model's own
                                          magnification, eval mode, no augmentation, the
                                          checkpoint's normalization -> softmax probabilities
    evaluate_models(...)                  metrics, compute table, JSON + PNG output

Metrics (:func:`resdistill.eval.metrics.evaluate_predictions`, 95% percentile bootstrap intervals by
default): accuracy, macro F1, macro precision, macro recall, per-class one-vs-rest AUC and their
mean, confusion matrix, ROC points.

* Tile level: one sample per tile, ``y_prob`` the model's softmax output.
* Slide level: ``P(slide) = mean over the slide's tiles of P(tile)``
  (:func:`resdistill.eval.metrics.aggregate_slides`), the slide's label its tiles' label; the
  bootstrap resamples slides.

Compute (:func:`resdistill.eval.compute.compute_table`): parameters, FLOPs of one tile at the model's
input size ``(3, tile_px, tile_px)`` counted with ``FlopCounterMode`` (2 FLOPs per
multiply-accumulate), and measured inference images/s on this machine.

Output (:func:`write_report`, a local folder or ``s3://``): ``evaluation.json``,
``predictions-<model>.csv`` (key, slide, label, one probability column per class),
``roc.png`` (one panel per class, one curve per model; tile level solid, slide level dashed) and
``accuracy_vs_flops.png`` (tile accuracy with its interval against FLOPs per tile, log scale).

Errors that stop an evaluation before any work are one-line :class:`EvaluationError`\\ s:
checkpoint not found or not a resdistill checkpoint, a dataset without the checkpoint's
magnification, a class list that differs from the dataset's, a split without labelled tiles.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from resdistill.checkpoint import CheckpointError, LoadedModel, load_model, resolve_spec

__all__ = [
    "CheckpointError",
    "EvaluationError",
    "EvaluationReport",
    "LoadedModel",
    "MismatchError",
    "ModelEvaluation",
    "TilePredictions",
    "check_compatible",
    "evaluate_models",
    "format_table",
    "load_model",
    "plot_accuracy_vs_flops",
    "plot_roc",
    "predict_split",
    "resolve_spec",
    "write_report",
]

REPORT_JSON = "evaluation.json"
ROC_PNG = "roc.png"
ACC_FLOPS_PNG = "accuracy_vs_flops.png"
#: ROC points per curve kept in ``evaluation.json`` (the plots use every point).
ROC_JSON_POINTS = 1000
#: Keys a checkpoint's ``model.pt`` must hold besides the weights.


class EvaluationError(ValueError):
    """Input that cannot be evaluated; the message is one line naming the input and the fix."""


class MismatchError(EvaluationError):
    """A model and a dataset (or slide) that do not fit together: magnification, classes, size."""


def unique_names(names: Sequence[str], mags: Sequence[str]) -> list[str]:
    """Make display names unique: ``name`` -> ``name@mag`` when clashing, then ``-2``, ``-3``..."""
    out = list(names)
    counts: dict[str, int] = {}
    for n in out:
        counts[n] = counts.get(n, 0) + 1
    out = [f"{n}@{m}" if counts[n] > 1 else n for n, m in zip(out, mags, strict=True)]
    seen: dict[str, int] = {}
    final = []
    for n in out:
        seen[n] = seen.get(n, 0) + 1
        final.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return final


# --------------------------------------------------------------------------------------------------
# Model vs dataset
# --------------------------------------------------------------------------------------------------


def check_compatible(model: LoadedModel, info: Any) -> str:
    """Check that ``info`` (a :class:`resdistill.data.DatasetInfo`) can feed ``model``.

    Returns the dataset's magnification name. Raises :class:`MismatchError` when the dataset has
    no images at the model's magnification, its classes differ from the model's (same names in
    the same, sorted, order), or its tile size there differs from the one the model was trained on.
    """
    from sharding.magnification import Magnification

    mag = model.mag
    if mag not in info.magnifications:
        have = ", ".join(str(Magnification.parse(m)) for m in info.magnifications)
        want = Magnification.parse(mag)
        raise MismatchError(
            f"{model.url}: {model.name} works at {want} but dataset {info.url} has only {have}: "
            f"evaluate on a dataset sharded with {want} in --mags"
        )
    if list(info.classes) != model.classes:
        raise MismatchError(
            f"{model.url}: class mismatch: {model.name} predicts {model.classes} but dataset "
            f"{info.url} has {list(info.classes)}: evaluate on a dataset with the same classes"
        )
    want, have = model.tile_px, info.tile_px.get(mag)
    if want and have and int(have) != want:
        raise MismatchError(
            f"{model.url}: {model.name} was trained on {want} px tiles at {mag} but dataset "
            f"{info.url} has {have} px tiles there (another --tile-px): reshard with a matching size"
        )
    return mag


def _with_model_norm(info: Any, model: LoadedModel, mag: str) -> Any:
    """``info`` whose normalization at ``mag`` is the model's own (as it was trained)."""
    ms = model.mean_std()
    if ms is None:
        return info
    norm = dict(info.normalization)
    norm[mag] = {"mean": ms[0], "std": ms[1]}
    return replace(info, normalization=norm)


@dataclass
class TilePredictions:
    """Softmax outputs of one model on the labelled tiles of a split (manifest order of shards)."""

    keys: list[str]
    slides: np.ndarray  # (N,) slide id of each tile
    labels: np.ndarray  # (N,) class index
    probs: np.ndarray  # (N, K) float64
    seconds: float = 0.0  # wall time of the pass (decode + inference)

    def __len__(self) -> int:
        return len(self.keys)

    def to_csv(self, classes: Sequence[str]) -> str:
        """``key,slide,label,prob_<class>...`` one row per tile (probabilities with 8 digits)."""
        out = io.StringIO()
        out.write(",".join(["key", "slide", "label", *[f"prob_{c}" for c in classes]]) + "\n")
        for key, slide, label, p in zip(
            self.keys, self.slides, self.labels, self.probs, strict=True
        ):
            probs = ",".join(f"{v:.8f}" for v in p)
            out.write(f"{key},{slide},{classes[int(label)]},{probs}\n")
        return out.getvalue()


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_split(
    model: LoadedModel,
    info: Any,
    split: str = "test",
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | None = None,
    manifest: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> TilePredictions:
    """Run ``model`` over the labelled tiles of ``split`` of ``info`` at the model's magnification.

    Reads with :func:`resdistill.data.make_loader` (``train=False``: shards in order, each sample
    once, no augmentation) normalising with the checkpoint's mean/std; the model runs in eval mode
    under ``torch.inference_mode``; ``probs = softmax(logits)``. ``on_batch(n)`` is called with
    the size of each batch (progress).
    """
    import torch

    from resdistill.data import make_loader, read_manifest

    mag = check_compatible(model, info)
    device = device or _auto_device()
    if manifest is None:
        manifest = read_manifest(info.url, columns=("key", "slide", "split", "label", "shard"))
    cols = manifest.select(["key", "slide"]).to_pydict()
    slide_of = dict(zip(cols["key"], cols["slide"], strict=True))
    loader = make_loader(
        _with_model_norm(info, model, mag),
        [split],
        [mag],
        batch_size=batch_size,
        train=False,
        num_workers=num_workers,
        labelled_only=True,
        pin_memory=device.startswith("cuda"),
        manifest=manifest,
    )
    net = model.model
    net.eval().to(device)
    keys: list[str] = []
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader.epoch():
                x = batch.images[0].to(device, non_blocking=True)
                logits, _ = net(x)
                probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
                labels.append(batch.labels.numpy())
                keys.extend(batch.keys)
                if on_batch is not None:
                    on_batch(len(batch))
    finally:
        loader.close()
    seconds = time.perf_counter() - t0
    if not keys:
        raise EvaluationError(
            f"{info.url}: split {split!r} has no labelled tiles: choose another --split"
        )
    return TilePredictions(
        keys=keys,
        slides=np.array([slide_of.get(k, k.rsplit("_", 2)[0]) for k in keys]),
        labels=np.concatenate(labels).astype(np.int64),
        probs=np.concatenate(probs),
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------------
# Evaluating several models together
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelEvaluation:
    """One model's results on the split."""

    name: str
    model: LoadedModel
    predictions: TilePredictions
    tile: dict[str, Any]  # evaluate_predictions on tiles
    slide: dict[str, Any]  # evaluate_predictions on slides, plus "slides": [ids]
    compute: dict[str, Any]  # a compute_table row

    def to_json(self) -> dict[str, Any]:
        from sharding.magnification import Magnification

        m = self.model
        mag = Magnification.parse(m.mag)
        return {
            "name": self.name,
            "checkpoint": m.url,
            "stage": m.stage,
            "arch": m.meta.get("arch"),
            "mag": m.mag,
            "magnification": mag.power,
            "mpp": mag.mpp,
            "tile_px": self.compute["input_shape"][-1],
            "classes": m.classes,
            "trained_on": m.meta.get("dataset"),
            "config": m.config,
            "n_tiles": len(self.predictions),
            "eval_seconds": self.predictions.seconds,
            "tile": self.tile,
            "slide": self.slide,
            "compute": self.compute,
        }


@dataclass
class EvaluationReport:
    """All models evaluated on one split of one dataset, and where the output went."""

    data: str
    split: str
    models: list[ModelEvaluation]
    n_boot: int
    alpha: float
    seed: int
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        import torch

        from resdistill import __version__

        return {
            "tool": f"resdistill {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": self.data,
            "split": self.split,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "seed": self.seed,
            "torch_threads": torch.get_num_threads(),
            "models": [m.to_json() for m in self.models],
            "files": self.files,
        }


def evaluate_models(
    specs: Sequence[str | os.PathLike[str] | LoadedModel],
    data: str,
    split: str = "test",
    *,
    out: str | None = None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | None = None,
    bench_batch: int = 32,
    bench_seconds: float = 2.0,
    bench_repeats: int = 5,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Evaluate every model of ``specs`` on ``split`` of the dataset ``data``; write to ``out``.

    All models are loaded and checked against the dataset first (:func:`check_compatible`), so a
    mismatch fails before any long work. Then, per model: :func:`predict_split`, tile metrics,
    slide metrics (mean tile probability per slide) with ``n_boot`` bootstrap resamples at level
    ``1 - alpha``, and a compute row (FLOPs of one ``(3, tile_px, tile_px)`` tile, images/s
    measured with batches of ``bench_batch`` for about ``bench_seconds``). With ``out`` the
    report is written by :func:`write_report`.
    """
    from resdistill.data import DatasetInfo, read_manifest
    from resdistill.eval.compute import compute_table
    from resdistill.eval.metrics import aggregate_slides, evaluate_predictions

    if not specs:
        raise EvaluationError("no model given: pass one or more checkpoints")
    if names is not None and len(names) != len(specs):
        raise EvaluationError(f"{len(names)} names for {len(specs)} models")
    device = device or _auto_device()
    say = log or (lambda _msg: None)
    models = [s if isinstance(s, LoadedModel) else load_model(s) for s in specs]
    if names is not None:
        for m, n in zip(models, names, strict=True):
            m.name = n
    for m, n in zip(
        models, unique_names([m.name for m in models], [m.mag for m in models]), strict=True
    ):
        m.name = n
    try:
        info = DatasetInfo.load(data)
    except FileNotFoundError as exc:
        raise EvaluationError(str(exc)) from None
    for m in models:
        check_compatible(m, info)
    manifest = read_manifest(info.url, columns=("key", "slide", "split", "label", "shard"))

    results: list[ModelEvaluation] = []
    for m in models:
        mag = m.mag
        px = int(m.tile_px or info.tile_px[mag])
        say(f"{m.name}: {m.meta.get('arch')} at {mag} ({px} px) on {info.url} [{split}]")
        preds = predict_split(
            m, info, split, batch_size=batch_size, num_workers=num_workers, device=device,
            manifest=manifest,
        )  # fmt: skip
        tile = evaluate_predictions(
            preds.labels, preds.probs, m.classes, n_boot=n_boot, alpha=alpha, seed=seed
        )
        _thin_roc(tile)
        agg = aggregate_slides(preds.slides, preds.probs, preds.labels)
        slide = evaluate_predictions(
            agg.y_true, agg.y_prob, m.classes, n_boot=n_boot, alpha=alpha, seed=seed
        )
        slide["slides"] = [str(s) for s in agg.slide_ids]
        slide["tiles_per_slide"] = [int(n) for n in agg.n_tiles]
        slide["prob"] = agg.y_prob.tolist()
        say(f"{m.name}: measuring FLOPs and images/s at (3, {px}, {px}) on {device}")
        compute = compute_table(
            {m.name: (m.model, (3, px, px))}, batch=bench_batch, seconds=bench_seconds,
            device=device, repeats=bench_repeats, warmup=1,
        )[0]  # fmt: skip
        results.append(ModelEvaluation(m.name, m, preds, tile, slide, compute))
    report = EvaluationReport(info.url, split, results, n_boot, alpha, seed)
    if out is not None:
        write_report(report, out, plots=plots)
    return report


def _thin_roc(metrics: dict[str, Any], max_points: int = ROC_JSON_POINTS) -> None:
    """Keep at most ``max_points`` evenly spaced points (first and last included) of each ROC
    curve in ``metrics["roc"]``, so the JSON stays small for large splits (plots use all)."""
    for curve in (metrics.get("roc") or {}).values():
        n = len(curve["fpr"])
        if n > max_points:
            idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
            curve["fpr"] = [curve["fpr"][i] for i in idx]
            curve["tpr"] = [curve["tpr"][i] for i in idx]


# --------------------------------------------------------------------------------------------------
# Output: JSON, CSV, plots, table
# --------------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """A file-name-safe form of a model name (letters, digits, ``.``, ``_``, ``-``, ``@``)."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", name).strip("-") or "model"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_roc(report: EvaluationReport) -> bytes:
    """PNG: one panel per class; per model its one-vs-rest ROC (tile level solid, slide dashed)."""
    from matplotlib.figure import Figure

    from resdistill.eval.metrics import roc_curve

    classes = report.models[0].model.classes
    k = len(classes)
    cols = min(k, 3)
    rows = int(math.ceil(k / cols))
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours = [f"C{i % 10}" for i in range(len(report.models))]
    for c, name in enumerate(classes):
        ax = axes[c]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        for ev, colour in zip(report.models, colours, strict=True):
            auc = ev.tile["auc"][name]["value"]
            if auc is not None:
                fpr, tpr, _ = roc_curve(ev.predictions.labels == c, ev.predictions.probs[:, c])
                ax.plot(
                    fpr,
                    tpr,
                    color=colour,
                    lw=1.5,
                    label=f"{ev.name} {ev.model.mag} tiles AUC {auc:.3f}",
                )
            s_auc = ev.slide["auc"][name]["value"]
            if s_auc is not None and ev.slide.get("roc", {}).get(name):
                r = ev.slide["roc"][name]
                ax.plot(
                    r["fpr"],
                    r["tpr"],
                    color=colour,
                    lw=1.0,
                    ls="--",
                    label=f"{ev.name} slides AUC {s_auc:.3f}",
                )
        ax.set_title(f"{name} vs rest")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=7)
    for ax in axes[k:]:
        ax.set_visible(False)
    fig.suptitle(f"ROC on {report.split} of {report.data}", fontsize=9)
    return _png(fig)


def plot_accuracy_vs_flops(report: EvaluationReport) -> bytes:
    """PNG: tile accuracy (with its bootstrap interval) against FLOPs per tile, log x axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    for i, ev in enumerate(report.models):
        acc = ev.tile["accuracy"]
        x = ev.compute["flops"]
        lo = acc["low"] if acc["low"] is not None else acc["value"]
        hi = acc["high"] if acc["high"] is not None else acc["value"]
        ax.errorbar(
            [x], [acc["value"]], yerr=[[acc["value"] - lo], [hi - acc["value"]]],
            fmt="o", color=f"C{i % 10}", capsize=4, label=f"{ev.name} ({ev.model.mag})",
        )  # fmt: skip
        s = ev.slide["accuracy"]["value"]
        if s is not None:
            ax.plot([x], [s], marker="s", mfc="none", color=f"C{i % 10}", ls="none")
        ax.annotate(
            f"{ev.model.mag}",
            (x, acc["value"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.margins(x=0.25)
    lows = [
        v
        for ev in report.models
        for v in (ev.tile["accuracy"]["low"], ev.slide["accuracy"]["value"])
        if v is not None
    ]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.02)
    ax.set_xlabel("FLOPs per tile (counted, 2 per multiply-accumulate)")
    ax.set_ylabel("accuracy (tiles: dot with 95% CI; slides: square)")
    ax.set_title(f"accuracy vs compute on {report.split}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def write_report(report: EvaluationReport, out: str, *, plots: bool = True) -> dict[str, str]:
    """Write ``evaluation.json``, one predictions CSV per model and the plots to ``out``.

    ``out`` is a local folder or ``s3://bucket/prefix``; each file is published atomically.
    Returns ``{kind: url}`` (also stored in the JSON under ``files``).
    """
    from sharding.storage import open_storage

    store = open_storage(out)
    files: dict[str, str] = {}
    for ev in report.models:
        rel = f"predictions-{safe_name(ev.name)}.csv"
        store.write_bytes(rel, ev.predictions.to_csv(ev.model.classes).encode())
        files[f"predictions:{ev.name}"] = store.child_url(rel)
    if plots:
        store.write_bytes(ROC_PNG, plot_roc(report))
        files["roc"] = store.child_url(ROC_PNG)
        store.write_bytes(ACC_FLOPS_PNG, plot_accuracy_vs_flops(report))
        files["accuracy_vs_flops"] = store.child_url(ACC_FLOPS_PNG)
    files["report"] = store.child_url(REPORT_JSON)
    report.files = files
    store.write_bytes(REPORT_JSON, json.dumps(report.to_json(), indent=1).encode())
    return files


def _ci(d: Mapping[str, Any], digits: int = 3) -> str:
    v = d.get("value")
    if v is None:
        return "-"
    lo, hi = d.get("low"), d.get("high")
    if lo is None or hi is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def human_flops(flops: float) -> str:
    """``3.63 G``, ``227 M``, ``14.2 k``: three significant digits with an SI prefix."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= div:
            return f"{flops / div:.3g} {unit}"
    return f"{flops:.3g}"


def format_table(report: EvaluationReport) -> Any:
    """One rich table: model, magnification, tiles, accuracy [CI], macro F1 [CI], macro AUC,
    slide accuracy (slides), FLOPs per tile, params, images/s."""
    from rich.table import Table

    pct = int(round(100 * (1 - report.alpha)))
    table = Table(
        title=f"{report.split} split of {report.data} ({pct}% CI: {report.n_boot} bootstrap resamples)",
        header_style="bold",
    )
    for col, just in (
        ("model", "left"), ("mag", "right"), ("tiles", "right"), (f"accuracy [{pct}% CI]", "left"),
        (f"macro F1 [{pct}% CI]", "left"), ("AUC", "right"), ("slide acc (n)", "left"),
        ("FLOPs/tile", "right"), ("params", "right"), ("images/s", "right"),
    ):  # fmt: skip
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for ev in report.models:
        s = ev.slide["accuracy"]["value"]
        table.add_row(
            ev.name,
            ev.model.mag,
            str(len(ev.predictions)),
            _ci(ev.tile["accuracy"]),
            _ci(ev.tile["macro_f1"]),
            _ci({"value": ev.tile["macro_auc"]["value"]}),
            f"{s:.3f} ({ev.slide['n']})" if s is not None else "-",
            human_flops(ev.compute["flops"]),
            f"{ev.compute['params'] / 1e6:.2f} M",
            f"{ev.compute['images_per_s']:.0f}",
        )
    return table
