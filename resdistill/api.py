"""The Python API: ``import resdistill as rd``, one function per stage, for notebooks and scripts.

::

    ds = rd.shard("slides/", "shards/", labels="labels.csv", mags="10,5", tile_px=64)
    teacher = rd.train_teacher(data=ds.url, epochs=20, storage="runs", name="teacher")
    student = rd.distill(data=ds.url, teacher=teacher.run_url, student_mag="5x", storage="runs")
    scores = rd.evaluate([teacher.run_url, student.run_url], data=ds.url, split="test")
    slides = rd.predict_slides("slides/", student.run_url, out="predictions/", geojson="both")
    model = rd.load_model(student.run_url)

Each function builds the stage's typed config (:class:`~resdistill.config.TrainConfig`,
:class:`~sharding.options.ShardConfig`, :class:`~resdistill.eval.config.EvaluateConfig`,
:class:`~resdistill.predict.config.PredictConfig`) from keyword options named as the command's
flags (``--batch-size`` is ``batch_size=``; ``resdistill <command> --help`` lists them), or
takes such a config whole; the config validates as the command line's does (a bad value raises
:class:`~resdistill.fields.ConfigError` naming the option). Results are frozen dataclasses of
paths and metrics, or pandas DataFrames. Failures raise (:class:`~resdistill.errors.UsageError`,
one line, for input that cannot work) instead of returning exit codes.

Ray: a stage that runs on Ray (shard with more than one slide, training, predict) connects to
``address=`` when given, else to ``RAY_ADDRESS``, else starts a local Ray in this process and
leaves it running for the next call (``ray.shutdown()`` ends it). Every model argument takes
any form of :mod:`resdistill.model_spec` (a checkpoint folder, a run folder, a summary JSON...).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from os import PathLike
from typing import Any

from resdistill.errors import UsageError

__all__ = [
    "Model", "ShardResult", "TrainResult", "distill", "evaluate", "load_model", "predict_slides",
    "read_tiles", "shard", "train_teacher",
]  # fmt: skip

Path = str | PathLike[str]
#: options naming a file, folder or model: local paths are made absolute before a config is
#: built, as Ray workers and a later ``os.chdir`` must find them where the notebook meant
PATH_OPTIONS = frozenset({"data", "storage", "out", "labels", "annotations", "teacher", "cascade",
                          "targets", "summary_json", "resume_from", "trace_dir"})  # fmt: skip


@dataclass(frozen=True)
class ShardResult:
    """A sharded dataset: its root ``url`` (what training's ``data=`` takes), samples per split,
    the slides skipped with the reason, problems and notes (one line each)."""

    url: str
    samples: Mapping[str, int]
    slides: Mapping[str, int]
    skipped: Mapping[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    new_samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no slide, label row or annotation was skipped or repaired."""
        return not self.skipped and not self.problems


@dataclass(frozen=True)
class TrainResult:
    """A finished training run (the summary ``resdistill teacher`` / ``distill`` print).

    ``run_url`` is the run folder and ``best_checkpoint`` its chosen checkpoint (either is a
    model argument); ``best_metrics`` the chosen epoch's reported metrics (``val_accuracy``,
    ``val_macro_f1``, ...), ``last_metrics`` the last epoch's; ``metric`` and ``select`` say how
    the checkpoint was chosen, ``labelled_val_slides`` how many labelled slides that read."""

    stage: str
    name: str
    run_url: str
    best_checkpoint: str | None
    latest_checkpoint: str | None
    best_epoch: int | None
    epochs: int
    metric: str
    select: str
    best_metrics: Mapping[str, Any]
    last_metrics: Mapping[str, Any]
    elapsed_s: float
    labelled_val_slides: int = 0  # validation slides whose labels chose (the label budget)


def _keyword(flag: str) -> str:
    """``--batch-size`` -> ``batch_size``."""
    return flag.lstrip("-").replace("-", "_")


def _build(spec: Any, options: Mapping[str, Any], **positional: Any) -> Any:
    """``spec.config`` from keyword ``options`` (named as the command's flags or switches), the
    ``positional`` fields, the spec's defaults and fixed values; validated by the config."""
    from resdistill.commands.generate import leaves
    from resdistill.fields import ConfigError, from_plain

    offered = list(leaves(spec))  # the command's options, from their one declaration
    keys = {_keyword(leaf.flag): leaf.path for leaf in offered}
    switches = {_keyword(s.flag): s for s in spec.switches}
    doc: dict[str, Any] = {}
    for path, value in {**spec.defaults, **positional}.items():
        _set(doc, path, value)
    unknown = sorted(set(options) - set(keys) - set(switches))
    if unknown:
        raise ConfigError(
            f"{spec.name}: unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted({*keys, *switches}))}"
        )
    for key, value in options.items():
        if key in switches:
            if value:
                _set(doc, switches[key].path, switches[key].const)
        else:
            _set(doc, keys[key], _absolute(value) if key in PATH_OPTIONS else _plain(value))
    for path, value in spec.fixed.items():
        _set(doc, path, value)
    missing = [_keyword(leaf.flag) for leaf in offered if leaf.required
               and _keyword(leaf.flag) not in options and leaf.path not in positional]  # fmt: skip
    if missing:
        raise ConfigError(f"{spec.name}: {', '.join(f'{m}=' for m in missing)} required")
    return from_plain(spec.config, doc, strict=True)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """``doc[a][b] = value`` for the dotted ``path`` ``a.b``."""
    *heads, last = path.split(".")
    for head in heads:
        doc = doc.setdefault(head, {})
    doc[last] = value


def _plain(value: Any) -> Any:
    """Paths as text; lists as tuples."""
    if isinstance(value, PathLike):
        return str(value)
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def _absolute(value: Any) -> Any:
    """A local path made absolute (``s3://`` URLs and None unchanged)."""
    if value is None:
        return None
    from resdistill.model_spec import absolute_url

    return absolute_url(str(value))


def _paths(items: Path | Sequence[Path]) -> tuple[str, ...]:
    """One path or several, each absolute (:func:`_absolute`)."""
    if isinstance(items, str | PathLike):
        return (_absolute(items),)
    return tuple(_absolute(i) for i in items)


def shard(slides: Path | Sequence[Path], out: Path, **options: Any) -> ShardResult:
    """Tile ``slides`` (files, folders of them, ``s3://`` slides or prefixes) into a dataset at
    ``out`` (a folder or ``s3://``), as ``resdistill shard`` does, ``<out>/config.yaml``
    included; options as its flags (``labels=``, ``mags=``, ``tile_px=``, ``annotations=``,
    ``workers=0`` for no Ray...). A rerun resumes. Raises when the input cannot be used at all;
    slides skipped are in the result."""
    from resdistill.commands.shard import SPEC
    from resdistill.fields import to_plain
    from resdistill.run_config import write_run_config
    from sharding.pipeline import shard_slides

    cfg = _build(SPEC, {"progress": False, **options}, slides=_paths(slides), out=_absolute(out))
    report = shard_slides(cfg)
    if report.published:
        write_run_config(cfg.out, "shard", to_plain(cfg))
    return ShardResult(
        url=report.url, samples={k: c.samples for k, c in report.counts.items()},
        slides={k: c.slides for k, c in report.counts.items()}, skipped=dict(report.skipped),
        problems=tuple(report.problems), notes=tuple(report.notes),
        new_samples=report.new_samples, seconds=report.seconds,
    )  # fmt: skip


def _train(spec: Any, config: Any, options: Mapping[str, Any]) -> TrainResult:
    """Run a training command's config (given, or built from ``options``)."""
    from resdistill.config import TrainConfig
    from resdistill.train.driver import train

    if config is not None and (options or not isinstance(config, TrainConfig)):
        raise UsageError(f"{spec.name}: pass a TrainConfig or keyword options, not both")
    cfg = config if config is not None else _build(spec, options)
    return TrainResult(stage=cfg.stage, **asdict(train(cfg)))


def train_teacher(config: Any = None, **options: Any) -> TrainResult:
    """Train the high-magnification teacher (``resdistill teacher``) on Ray Train: a
    :class:`~resdistill.config.TrainConfig`, or its options (``data=`` required, ``arch=``,
    ``epochs=``, ``storage=``, ``name=``, ``workers=``, ...)."""
    from resdistill.commands.teacher import SPEC

    return _train(SPEC, config, options)


def distill(config: Any = None, **options: Any) -> TrainResult:
    """Distil a low-magnification student (``resdistill distill``): a TrainConfig, or options
    (``data=``, ``teacher=`` any model argument, ``student_mag=`` required; ``supervised=True``
    trains the labels-only baseline instead)."""
    from resdistill.commands.distill import SPEC

    return _train(SPEC, config, options)


def evaluate(models: Path | Sequence[Path], data: Path, **options: Any) -> Any:
    """Score ``models`` on a split of ``data`` (``resdistill evaluate``; ``split="test"`` by
    default, ``out=`` to also write its files): a pandas DataFrame, one row per model, with its
    tile metrics and their bootstrap interval (``accuracy``, ``accuracy_low``,
    ``accuracy_high``, ``macro_f1``, ...), slide metrics (``slide_accuracy``, ...) and compute
    (``params``, ``flops``, ``images_per_s``); ``DataFrame.attrs["files"]`` names what was
    written."""
    import pandas as pd

    from resdistill.commands.evaluate import SPEC
    from resdistill.eval.evaluation_run import run_evaluation

    options = {"out": None, **options}
    cfg = _build(SPEC, options, checkpoints=_paths(models), data=_absolute(data))
    report, _ = run_evaluation(cfg)
    rows = []
    for ev in report.models:
        row: dict[str, Any] = {"name": ev.name, "checkpoint": ev.model.url, "stage": ev.model.stage,
                               "arch": ev.model.card.arch, "mag": ev.model.mag,
                               "tiles": len(ev.predictions), "slides": ev.slide.get("n")}  # fmt: skip
        for prefix, metrics in (("", ev.tile), ("slide_", ev.slide)):
            for name, m in metrics.items():
                if isinstance(m, Mapping) and "value" in m:
                    row[prefix + name] = m["value"]
                    if m.get("low") is not None:
                        row[f"{prefix}{name}_low"] = m["low"]
                        row[f"{prefix}{name}_high"] = m["high"]
        row.update({k: ev.compute[k] for k in ("params", "flops", "images_per_s")})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs = {"split": report.split, "data": report.data, "files": dict(report.files)}
    return table


class _ErrorLines(io.TextIOBase):
    """stderr passed through, keeping the ``<command>: error:`` lines the command printed."""

    def __init__(self, prefix: str) -> None:
        self.real, self.prefix, self.lines = sys.stderr, prefix, []

    def write(self, text: str) -> int:
        self.lines += [ln for ln in text.splitlines() if ln.startswith(self.prefix)]
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()


def predict_slides(slides: Path | Sequence[Path], model: Path, out: Path, **options: Any) -> Any:
    """Classify ``slides`` with ``model`` (any model argument) into ``out``
    (``resdistill predict``: heatmaps, tables, ``geojson="both"`` for QuPath, ``cascade=`` a
    teacher...): ``slides.parquet`` as a pandas DataFrame, one row per slide (``class``,
    ``p_<class>``, ``tiles``, ``status``: ``ok`` or why the slide failed);
    ``DataFrame.attrs["out"]`` is ``out``, whose tiles :func:`read_tiles` reads. A rerun skips
    the slides done. Raises :class:`UsageError` when nothing can be predicted."""
    from resdistill.commands.predict import SPEC
    from resdistill.predict.driver import predict_command

    cfg = _build(SPEC, options, checkpoint=_absolute(model), slides=_paths(slides),
                 out=_absolute(out))  # fmt: skip
    tee = _ErrorLines("predict: error:")
    with contextlib.redirect_stderr(tee):
        code = predict_command(cfg)
    if code == 2:
        line = tee.lines[-1][len(tee.prefix) :].strip() if tee.lines else "refused (see above)"
        raise UsageError(f"predict: {line}")
    table = _read_table(cfg.out, "slides.parquet")
    table.attrs = {"out": cfg.out}
    return table


def _read_table(out: str, name: str) -> Any:
    import pyarrow.parquet as pq

    from sharding.storage import open_storage

    return pq.read_table(io.BytesIO(open_storage(out).read_bytes(name))).to_pandas()


def read_tiles(out: Path) -> Any:
    """The tiles of a prediction output (``tiles.parquet``): one row per scored region,
    ``slide, x, y`` (level-0 pixels), ``row, col, tissue, p_<class>...``."""
    return _read_table(str(out), "tiles.parquet")


@dataclass(frozen=True)
class Model:
    """A trained model in eval mode, with what it reads (:meth:`probabilities` applies it)."""

    url: str  # the checkpoint folder
    name: str
    stage: str | None
    arch: str
    classes: tuple[str, ...]
    mag: str  # the magnification it reads, e.g. 2p5x
    tile_px: int | None
    network: Any = field(repr=False)  # torch.nn.Module: x -> (logits, features)
    card: Any = field(repr=False)  # resdistill.checkpoint.ModelCard

    def probabilities(self, tiles: Any, batch_size: int = 64) -> Any:
        """Softmax probabilities ``(N, K)`` (numpy) of uint8 RGB tiles ``(N, H, W, 3)`` read at
        :attr:`mag`, normalised as training did (the card's stain reference, then
        ``(x / 255 - mean) / std``), in the order of :attr:`classes`."""
        import numpy as np
        import torch

        from resdistill.checkpoint import normalization_of

        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization_of(self.card))
        ref = self.card.stain_reference()
        stain = None
        if ref:
            from resdistill.data.stain_norm import normalizer

            stain = normalizer(ref)
        out = []
        tiles = np.asarray(tiles, dtype=np.uint8)
        with torch.inference_mode():
            for i in range(0, len(tiles), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(tiles[i : i + batch_size]))
                x = x.permute(0, 3, 1, 2).float() / 255.0
                x = stain(x) if stain is not None else x
                logits, _ = self.network((x - mean) / std)
                out.append(torch.softmax(logits.float(), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)


def load_model(spec: Path, device: str = "cpu") -> Model:
    """The model ``spec`` names (any model argument, local or ``s3://``), in eval mode."""
    from resdistill.checkpoint import load_model as load

    loaded = load(spec, device=device)
    return Model(url=loaded.url, name=loaded.name, stage=loaded.stage, arch=loaded.card.arch,
                 classes=tuple(loaded.classes), mag=loaded.mag, tile_px=loaded.tile_px,
                 network=loaded.model, card=loaded.card)  # fmt: skip
