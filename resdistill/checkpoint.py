"""Checkpoints: one format, one writer, one reader, used by every stage and command.

A checkpoint is a folder (``<storage>/<run>/checkpoint_epochNNNN``, local or ``s3://``)::

    model.pt     {**ModelCard fields, "state_dict": {name: tensor}}   what evaluation needs
    trainer.pt   {"optimizer", "state" (TrainState), "config" (TrainConfig), stage extras}
    meta.json    {"format", "epoch", "metrics", "model" (the card), "time", "resdistill"
                  (version, commit), "config" (the run's options)}   for people

Both ``.pt`` files hold only tensors and plain containers, so they are read with
``torch.load(..., weights_only=True)``: a checkpoint cannot run code on the reader's machine.
model.pt's ``format`` (:data:`CHECKPOINT_FORMAT`) is checked on every load: a checkpoint written
in a newer format is refused in one line, never misread (:func:`check_format`).
The :class:`ModelCard` records what the model reads (magnification, tile size, normalization and
the dataset's read chain), so evaluation and prediction read exactly what training read; every
consumer normalises inputs with :func:`normalization_of` (the card's statistics, else one fallback).

A model is named to a command by any of (:func:`resolve_spec`): a checkpoint folder, its
``model.pt`` (or any ``*.pt``), a tune result JSON ``{"checkpoint": url, "config": {...}}``, or a
run summary JSON (``best_checkpoint``, else ``latest_checkpoint``).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from resdistill.errors import CheckpointError
from resdistill.model_spec import (  # noqa: F401 - re-exported: the model-argument helpers
    MODEL_FILE,
    _missing_checkpoint,
    absolute_url,
    checkpoint_url,
    folder_name,
    read_url,
    resolve_spec,
)

TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"
CHECKPOINT_FORMAT = 1
#: dataset.json fields that decide which pixels a model sees: stored with every model.
READ_CHAIN_KEYS = ("magnifications", "mpp", "tile_px", "image_format", "quality", "min_tissue",
                   "low_mags_from", "tissue", "format_version")  # fmt: skip
#: model.pt fields a model needs besides its weights.
REQUIRED_META = ("arch", "classes", "mag")
#: The normalisation of a checkpoint or dataset that records no statistics (see
#: :func:`normalization_of`): per-channel mean and std of [0, 1] pixels.
FALLBACK_MEAN = (0.5, 0.5, 0.5)
FALLBACK_STD = (0.25, 0.25, 0.25)
_fallback_warned: set[str] = set()


@dataclass(frozen=True)
class ModelCard:
    """What ``model.pt`` says about its network, besides the weights.

    ``mag`` is a magnification name (``10x``, ``2p5x``); ``normalization`` the per-channel
    ``{"mean": [r, g, b], "std": [r, g, b]}`` of [0, 1] pixels the model was trained with, and
    ``"stain"``, the stain normalisation reference its tiles went through first, when one did
    (:mod:`resdistill.data.stain_norm`);
    ``read_chain`` the dataset's :data:`READ_CHAIN_KEYS`; ``teacher`` (students) names the
    teacher checkpoint, its arch, magnification and classes; ``loss`` the loss settings;
    ``backbone`` a pretrained or timm network's :class:`resdistill.backbones.BackboneSpec`
    (timm name and arguments, weights file path, sha256 and licence note, frozen, head, input
    geometry), None for a random-initialised ResNet.
    """

    stage: str
    arch: str
    classes: tuple[str, ...]
    mag: str
    tile_px: int = 0
    normalization: Mapping[str, Any] | None = None
    dataset: str | None = None
    read_chain: Mapping[str, Any] = field(default_factory=dict)
    train_splits: tuple[str, ...] | None = None
    teacher: Mapping[str, Any] | None = None
    loss: Mapping[str, Any] | None = None
    backbone: Mapping[str, Any] | None = None
    format: int = CHECKPOINT_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mean_std(self) -> tuple[list[float], list[float]] | None:
        """The normalization the card records, or None; score with :func:`normalization_of`."""
        norm = self.normalization or {}
        if not norm.get("mean") or not norm.get("std"):
            return None
        return [float(v) for v in norm["mean"]], [max(float(v), 1e-3) for v in norm["std"]]

    def stain_reference(self) -> dict[str, Any] | None:
        """The stain normalisation the model's inputs need, or None (see the class docstring)."""
        ref = (self.normalization or {}).get("stain")
        return dict(ref) if ref else None

    def to_dict(self) -> dict[str, Any]:
        """model.pt's metadata: the card's fields plus ``num_classes`` (plain values)."""
        out = {k: v for k, v in asdict(self).items()}
        out["classes"] = list(self.classes)
        if self.train_splits is not None:
            out["train_splits"] = list(self.train_splits)
        out["num_classes"] = self.num_classes
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "model.pt") -> ModelCard:
        """The card of a model.pt payload; :class:`CheckpointError` when a required field is
        missing or ``num_classes`` disagrees with the class names."""
        missing = [k for k in REQUIRED_META if k not in doc]
        if missing:
            raise CheckpointError(
                f"{where}: the checkpoint lacks {', '.join(missing)}: it was not written by "
                "resdistill teacher/distill"
            )
        classes = tuple(str(c) for c in doc["classes"])
        n = int(doc.get("num_classes") or len(classes))
        if n != len(classes):
            raise CheckpointError(f"{where}: num_classes {n} but {len(classes)} class names")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in doc.items() if k in known}
        kwargs["classes"] = classes
        kwargs["tile_px"] = int(doc.get("tile_px") or 0)
        if doc.get("train_splits") is not None:
            kwargs["train_splits"] = tuple(doc["train_splits"])
        kwargs["read_chain"] = dict(doc.get("read_chain") or {})
        return cls(**kwargs)


def read_chain(dataset_json: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`READ_CHAIN_KEYS` of a dataset.json document."""
    return {k: dataset_json[k] for k in READ_CHAIN_KEYS if k in dataset_json}


def write_checkpoint(
    folder: str | os.PathLike[str],
    *,
    card: ModelCard,
    state_dict: Mapping[str, Any],
    trainer: Mapping[str, Any],
    epoch: int,
    metrics: Mapping[str, Any],
) -> None:
    """Write model.pt, trainer.pt and meta.json into the local ``folder`` (see module doc)."""
    import torch

    folder = Path(folder)
    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    torch.save({**card.to_dict(), "state_dict": weights}, folder / MODEL_FILE)
    torch.save(dict(trainer), folder / TRAINER_FILE)
    from resdistill import __version__
    from resdistill.run_config import git_commit

    config = trainer.get("config")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "metrics": dict(metrics),
        "model": card.to_dict(),
        "time": time.time(),
        "resdistill": {"version": __version__, "commit": git_commit()},
        # the run's options (hyperparameters), without what the planner derived
        "config": {k: v for k, v in config.items() if k != "plan"} if config else None,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, default=str))


def load_checkpoint(url: str | os.PathLike[str], file: str = MODEL_FILE) -> dict[str, Any]:
    """``torch.load(<checkpoint url>/<file>, weights_only=True, map_location="cpu")``.

    ``url`` is a checkpoint folder (local path or ``s3://``) as printed by the run summary;
    ``FileNotFoundError`` naming the file when it is missing; :class:`CheckpointError` when the
    file's ``format`` is newer than this code reads (:func:`check_format`).
    """
    import torch

    from sharding.storage import open_storage

    store = open_storage(os.fspath(url))
    try:
        data = store.read_bytes(file)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store.child_url(file)}: not found; pass a checkpoint folder printed by a run"
        ) from None
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and "format" in payload:
        check_format(payload["format"], store.child_url(file))
    return payload


def check_format(version: Any, where: str) -> None:
    """Refuse (:class:`CheckpointError`, one line naming ``where``) a checkpoint ``format`` this
    code does not understand: newer than :data:`CHECKPOINT_FORMAT` (written by a later
    resdistill, whose fields this one would misread) or not a whole number. A file without the
    field is format 1."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: checkpoint format {version!r} is not a version number: "
                              "not a resdistill checkpoint")  # fmt: skip
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{where}: checkpoint format {version} is newer than this resdistill reads (format "
            f"{CHECKPOINT_FORMAT}): upgrade resdistill to load it"
        )


@dataclass
class LoadedModel:
    """A model in eval mode with its card, where it came from, and its tune config if any."""

    model: Any  # torch.nn.Module returning (logits, features)
    card: ModelCard
    url: str  # the checkpoint folder
    name: str = ""
    config: dict[str, Any] | None = None  # from a tune result JSON, when one was given

    @property
    def meta(self) -> dict[str, Any]:
        """model.pt without ``state_dict`` (the card as a dict)."""
        return self.card.to_dict()

    @property
    def mag(self) -> str:
        from sharding.magnification import Magnification

        return Magnification.parse(str(self.card.mag)).name

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def tile_px(self) -> int | None:
        return self.card.tile_px or None

    @property
    def stage(self) -> str | None:
        return self.card.stage or None


def load_model(
    spec: str | os.PathLike[str], *, name: str | None = None, device: str = "cpu"
) -> LoadedModel:
    """Load ``spec`` (see :func:`resolve_spec`) into a :class:`LoadedModel` in eval mode.

    Weights are read with ``weights_only=True`` and loaded strictly into
    :func:`resdistill.models.build_model` ``(arch, num_classes)``; a ``module.`` prefix left by
    DDP is stripped. :class:`CheckpointError` with one line when anything is missing or wrong.
    """
    import pickle
    import zipfile

    from resdistill.models import build_model
    from sharding.magnification import Magnification
    from sharding.storage import StorageError

    url, file, config = resolve_spec(spec)
    where = f"{url.rstrip('/')}/{file}"
    try:
        payload = load_checkpoint(url, file)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise (
            _missing_checkpoint(url)
            if file == MODEL_FILE
            else CheckpointError(f"{where}: no such checkpoint file")
        ) from None
    except StorageError as exc:
        raise CheckpointError(f"{url}: {exc}") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{where}: not a resdistill model checkpoint (no state_dict)")
    card = ModelCard.from_dict({k: v for k, v in payload.items() if k != "state_dict"}, where)
    try:  # a frozen backbone's weights are read from the file its card names (sha256 checked)
        model = build_model(card.arch, card.num_classes, card.backbone)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    state = {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in payload["state_dict"].items()
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{where}: weights do not fit {card.arch}: {first}") from None
    model.eval().to(device)
    try:
        Magnification.parse(str(card.mag))
    except ValueError as exc:
        raise CheckpointError(f"{where}: bad magnification: {exc}") from None
    loaded = LoadedModel(model=model, card=card, url=url, config=config)
    loaded.name = name or _default_name(loaded)
    return loaded


def _default_name(model: LoadedModel) -> str:
    """A display name: the card's stage (e.g. ``teacher``), the tune config's, else the folder."""
    if model.card.stage:
        return model.card.stage
    if model.config and model.config.get("stage"):
        return str(model.config["stage"])
    return folder_name(model.url) or "model"


def normalization_of(model: LoadedModel | ModelCard) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per RGB channel of [0, 1] pixels for ``model``'s inputs,
    ``x = (tile / 255 - mean) / std``: the one policy evaluate, predict, export and
    distillation's teacher apply, so a checkpoint is scored on the same inputs everywhere.

    The card's recorded statistics (std floored at 1e-3), as every checkpoint training writes
    has. Without them (an old or hand-made checkpoint): :data:`FALLBACK_MEAN` /
    :data:`FALLBACK_STD` and one ``warning:`` line on stderr per checkpoint and process. Fixed,
    not the scoring dataset's statistics, so a score depends on the checkpoint alone; the
    constants training uses when its dataset records none, so such a model gets what it was
    trained on; not a refusal, so old checkpoints stay usable.
    """
    card = model.card if isinstance(model, LoadedModel) else model
    recorded = card.mean_std()
    if recorded is not None:
        return recorded
    where = model.url if isinstance(model, LoadedModel) else f"{card.stage} {card.arch} {card.mag}"
    if where not in _fallback_warned:
        _fallback_warned.add(where)
        print(
            f"warning: {where}: the checkpoint records no normalization (mean/std): its inputs "
            f"are normalised with the fallback mean {FALLBACK_MEAN[0]:g}, std {FALLBACK_STD[0]:g}",
            file=sys.stderr,
        )
    return list(FALLBACK_MEAN), list(FALLBACK_STD)
