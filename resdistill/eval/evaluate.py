"""Evaluate trained models on a dataset split: tile and slide metrics, compute cost.

Pipeline for each model (any model argument, :mod:`resdistill.model_spec`)::

    load_model(spec)                      weights + card (stage, arch, classes, mag, tile_px,
                                          normalization) from ``model.pt`` (local or s3://),
                                          :func:`resdistill.checkpoint.load_model`
    predict_split(model, dataset, split)  every labelled tile of the split at the model's own
                                          magnification, eval mode, no augmentation, the
                                          checkpoint's normalization -> softmax probabilities
    evaluate_models(...)                  metrics, compute table, then
                                          :func:`resdistill.eval.report_files.write_report`

Metrics (:func:`score_predictions` with :func:`resdistill.measures.bootstrap.evaluate_predictions`,
95% percentile bootstrap intervals by default): accuracy, macro F1, macro precision, macro recall,
per-class one-vs-rest AUC and their mean, confusion matrix, ROC points.

* Tile level: one sample per tile, ``y_prob`` the model's softmax output; the bootstrap resamples
  slides (each with all its tiles), since tiles of one slide are not independent.
* Slide level: ``P(slide) = mean over the slide's tiles of P(tile)``
  (:func:`resdistill.measures.metrics.aggregate_slides`), the slide's label its tiles' predominant
  label (region labels from annotations may mix classes on a slide); the
  bootstrap resamples slides.

Compute (:func:`resdistill.measures.compute.compute_table`): parameters, FLOPs of one tile at the
model's input size ``(3, tile_px, tile_px)`` counted with ``FlopCounterMode`` (2 FLOPs per
multiply-accumulate), and measured inference images/s on this machine.

Errors that stop an evaluation before any work are one-line :class:`EvaluationError`\\ s (a
dataset without the checkpoint's magnification, a class list that differs from the dataset's, a
split without labelled tiles) or :class:`resdistill.checkpoint.CheckpointError`\\ s; both are
:class:`resdistill.errors.UsageError`\\ s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from resdistill.checkpoint import LoadedModel, load_model, normalization_of
from resdistill.config import resolve_device
from resdistill.errors import UsageError
from resdistill.eval.config import EvaluateConfig
from resdistill.eval.report_files import write_report
from resdistill.eval.results import EvaluationReport, ModelEvaluation, TilePredictions
from sharding.magnification import display_mag

__all__ = [
    "EvaluationError",
    "MismatchError",
    "check_compatible",
    "evaluate_models",
    "predict_split",
    "score_predictions",
]

#: ROC points per curve kept in ``evaluation.json`` (the plots use every point).
ROC_JSON_POINTS = 1000


class EvaluationError(UsageError):
    """Input that cannot be evaluated; the message is one line naming the input and the fix."""


class MismatchError(EvaluationError):
    """A model and a dataset that do not fit together: magnification, classes, size."""


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
            f"{model.url}: {model.name} was trained on {want} px tiles at {display_mag(mag)} but dataset "
            f"{info.url} has {have} px tiles there (another --tile-px): reshard with a matching size"
        )
    return mag


def _with_model_norm(info: Any, model: LoadedModel, mag: str) -> Any:
    """``info`` whose normalization at ``mag`` is the model's own, never the dataset's
    (:func:`resdistill.checkpoint.normalization_of`: the one policy predict and export share)."""
    mean, std = normalization_of(model)
    norm = dict(info.normalization)
    norm[mag] = {"mean": mean, "std": std}
    return replace(info, normalization=norm)


def local_device(device: str = "auto") -> str:
    """``--device`` resolved against this machine's GPUs (:func:`resdistill.config.resolve_device`,
    the rule training and prediction apply to the Ray cluster's)."""
    import torch

    return resolve_device(device, torch.cuda.device_count())


def predict_split(
    model: LoadedModel,
    info: Any,
    split: str = "test",
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    manifest: Any = None,
    on_batch: Callable[[int], None] | None = None,
) -> TilePredictions:
    """Run ``model`` over the labelled tiles of ``split`` of ``info`` at the model's magnification.

    Reads with :func:`resdistill.data.make_loader` (``train=False``: shards in order, each sample
    once, no augmentation) normalising with the checkpoint's mean/std
    (:func:`resdistill.checkpoint.normalization_of`; after its stain normalisation, when it was
    trained with one); the model runs in eval mode
    under ``torch.inference_mode``; ``probs = softmax(logits)``. ``on_batch(n)`` is called with
    the size of each batch (progress).
    """
    import torch

    from resdistill.data import make_loader, read_manifest

    mag = check_compatible(model, info)
    device = local_device(device)
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
        stain=model.card.stain_reference(),
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


def evaluate_models(
    cfg: EvaluateConfig,
    *,
    models: Sequence[LoadedModel] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Evaluate every model of ``cfg.checkpoints`` (or the already loaded ``models``) on
    ``cfg.split`` of the dataset ``cfg.data``; write the report to ``cfg.out`` when set.

    All models are loaded and checked against the dataset first (:func:`check_compatible`), so a
    mismatch fails before any long work. Then, per model: :func:`predict_split`, tile and slide
    metrics (:func:`score_predictions`: ``n_boot`` bootstrap resamples of slides at level
    ``1 - alpha``), and a compute row (FLOPs of one ``(3, tile_px, tile_px)`` tile, images/s
    measured with batches of ``bench_batch`` for about ``bench_seconds``). With ``out`` the
    report is written by :func:`write_report`.
    """
    from resdistill.data import DatasetInfo, read_manifest, slide_patients
    from resdistill.measures.compute import compute_table

    if models is None:
        models = [load_model(s) for s in cfg.checkpoints]
    if not models:
        raise EvaluationError("no model given: pass one or more checkpoints")
    data, split = cfg.data, cfg.split
    device = local_device(cfg.device)
    say = log or (lambda _msg: None)
    if cfg.names:
        for m, n in zip(models, cfg.names, strict=True):
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
    manifest = read_manifest(
        info.url, columns=("key", "slide", "split", "label", "shard", "patient")
    )
    patients = slide_patients(manifest)
    mixed = bool(info.raw.get("annotations"))  # region labels: slides may hold several classes

    results: list[ModelEvaluation] = []
    for m in models:
        mag = m.mag
        px = int(m.tile_px or info.tile_px[mag])
        say(
            f"{m.name}: {m.meta.get('arch')} at {display_mag(mag)} ({px} px) on {info.url} [{split}]"
        )
        preds = predict_split(
            m, info, split, batch_size=cfg.batch_size, num_workers=cfg.loader_workers,
            device=device, manifest=manifest,
        )  # fmt: skip
        tile, slide = score_predictions(
            preds,
            m.classes,
            mixed=mixed,
            n_boot=cfg.n_boot,
            alpha=cfg.alpha,
            seed=cfg.seed,
            patients=patients,
        )
        say(f"{m.name}: measuring FLOPs and images/s at (3, {px}, {px}) on {device}")
        compute = compute_table(
            {m.name: (m.model, (3, px, px))}, batch=cfg.bench_batch, seconds=cfg.bench_seconds,
            device=device, repeats=cfg.bench_repeats, warmup=1,
        )[0]  # fmt: skip
        results.append(ModelEvaluation(m.name, m, preds, tile, slide, compute))
    report = EvaluationReport(info.url, split, results, cfg.n_boot, cfg.alpha, cfg.seed)
    if cfg.out is not None:
        write_report(report, cfg.out, plots=cfg.plots)
    return report


def score_predictions(
    preds: TilePredictions,
    classes: Sequence[str],
    *,
    mixed: bool = False,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    patients: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tile, slide)`` metric reports of one model's predictions on a split.

    Tile level: every tile a sample, intervals from the cluster bootstrap: units are resampled
    with replacement (within their class) and each drawn unit brings all its tiles, because tiles
    of a slide, and slides of a patient, are not independent. The unit is the patient when
    ``patients`` (``{slide: patient}``, the manifest's) names one for every slide, else the slide.
    Slide level: ``P(slide) = mean over its tiles of P(tile)``, the label its tiles'
    (predominant, with ``mixed`` region labels) label, units resampled. Both state
    ``"resample"`` (``patient`` or ``slide``) and ``"n_slides"``; the slide report also lists
    ``slides``, ``tiles_per_slide`` and ``prob``. ROC points of the tile report are thinned.
    """
    from resdistill.measures.bootstrap import evaluate_predictions
    from resdistill.measures.metrics import aggregate_slides

    slides = [str(s) for s in preds.slides]
    by_patient = bool(patients) and all(s in patients for s in set(slides))
    unit = (lambda s: patients[s]) if by_patient else (lambda s: s)  # type: ignore[index]
    kw = {"n_boot": n_boot, "alpha": alpha, "seed": seed,
          "unit": "patient" if by_patient else "slide"}  # fmt: skip
    tile = evaluate_predictions(preds.labels, preds.probs, classes,
                                groups=np.array([unit(s) for s in slides]), **kw)  # fmt: skip
    _thin_roc(tile)
    agg = aggregate_slides(preds.slides, preds.probs, preds.labels, mixed_labels=mixed)
    slide_units = np.array([unit(str(s)) for s in agg.slide_ids])
    slide = evaluate_predictions(agg.y_true, agg.y_prob, classes, groups=slide_units, **kw)
    tile["n_slides"] = slide["n_slides"] = int(agg.slide_ids.size)
    slide["slides"] = [str(s) for s in agg.slide_ids]
    slide["tiles_per_slide"] = [int(n) for n in agg.n_tiles]
    slide["prob"] = agg.y_prob.tolist()
    return tile, slide


def _thin_roc(metrics: dict[str, Any], max_points: int = ROC_JSON_POINTS) -> None:
    """Keep at most ``max_points`` evenly spaced points (first and last included) of each ROC
    curve in ``metrics["roc"]``, so the JSON stays small for large splits (plots use all)."""
    for curve in (metrics.get("roc") or {}).values():
        n = len(curve["fpr"])
        if n > max_points:
            idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
            curve["fpr"] = [curve["fpr"][i] for i in idx]
            curve["tpr"] = [curve["tpr"][i] for i in idx]
