"""What a checkpoint records of its backbone, and how ``--arch``/``--weights`` become that record.

A :class:`BackboneSpec` is plain values (JSON- and ``weights_only``-safe): it travels in the
run's plan to the workers and in ``model.pt``'s card to every reader, so ``evaluate``,
``predict``, ``export`` and ``teacher-targets`` rebuild the same network. Weights files are
referenced (absolute path + sha256), never copied into run folders: a frozen backbone's weights
are read back from that file (its sha256 checked) whenever the checkpoint is loaded, and only
the head goes into ``model.pt``; a fine-tuned backbone's weights are the run's own and are
stored as usual.

Nothing here downloads. ``--weights hf-hub:ORG/NAME`` is refused in one line that says how to
pass the file once downloaded (the licence of a foundation model is accepted by its user, on
the hub, not by this tool).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TIMM_PREFIX = "timm:"
HUB_PREFIX = "hf-hub:"
#: hidden width of the ``mlp`` head: ``Linear(D, 512) -> GELU -> Linear(512, K)``
MLP_HIDDEN = 512
#: weights file names looked for inside a folder given to ``--weights`` (a downloaded hub repo)
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
#: a downloaded timm hub repo's config: ``{"architecture", "model_args", "pretrained_cfg"}``
CONFIG_JSON = "config.json"


class WeightsError(ValueError):
    """A weights file or backbone option that cannot be used (one line, naming the file)."""


def is_timm(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``timm:<name>``)."""
    return arch.startswith(TIMM_PREFIX)


def timm_name(arch: str) -> str:
    """``timm:vit_base_patch16_224`` -> ``vit_base_patch16_224``."""
    return arch[len(TIMM_PREFIX) :] if is_timm(arch) else arch


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as a checkpoint records it (module docstring).

    ``arch`` is ``--arch`` (``timm:<name>`` or a torchvision ResNet); ``args`` timm's
    ``create_model`` keyword arguments (layer classes by name, :func:`resolve_layer_args`);
    ``weights`` the absolute path of the weights file ("" for random initialisation) and
    ``sha256`` its digest; ``licence`` the user's note; ``frozen`` whether the backbone is
    trained; ``head`` ``linear`` or ``mlp``; ``input_px`` the edge the backbone is fed (0: its
    own default) and ``mean``/``std`` its input normalisation (empty: timm's pretrained config of
    the architecture).
    """

    arch: str
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: str = ""
    sha256: str = ""
    licence: str = ""
    frozen: bool = False
    head: str = "linear"
    input_px: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def external(self) -> bool:
        """True when ``model.pt`` holds no backbone weights: they are read from ``weights``."""
        return self.frozen and bool(self.weights)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(args=dict(self.args), mean=list(self.mean), std=list(self.std))
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BackboneSpec:
        known = {k: doc[k] for k in cls.__dataclass_fields__ if k in doc}
        known["args"] = dict(known.get("args") or {})
        known["mean"] = tuple(float(v) for v in known.get("mean") or ())
        known["std"] = tuple(float(v) for v in known.get("std") or ())
        return cls(**known)

    def describe(self) -> str:
        """``timm:vit_large_patch16_224 (frozen, linear head) weights uni.bin sha256 1a2b3c4d5e6f``."""
        how = "frozen" if self.frozen else "trained"
        text = f"{self.arch} ({how}, {self.head} head)" if is_timm(self.arch) else self.arch
        if self.weights:
            text += f" weights {Path(self.weights).name} sha256 {self.sha256[:12]}"
        return text


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 8 MiB blocks; remembered per (path, size, mtime) in
    this process, so loading one backbone several times hashes it once."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def refuse_hub(text: str, flag: str = "--weights") -> None:
    """:class:`WeightsError` for a hub name: nothing is downloaded at run time."""
    if text.startswith(HUB_PREFIX):
        repo = text[len(HUB_PREFIX) :]
        raise WeightsError(
            f"{flag} {text}: resdistill never downloads weights at run time; download the "
            f"repository once (accepting its licence), e.g. `huggingface-cli download {repo} "
            f"--local-dir weights/{repo.split('/')[-1]}`, and pass {flag} with that folder or "
            "its model.safetensors / pytorch_model.bin"
        )


def locate_weights(text: str) -> tuple[Path, dict[str, Any]]:
    """``(weights file, the folder's config.json or {})`` for ``--weights TEXT``: a file, or a
    folder holding one of :data:`WEIGHTS_FILES` (and perhaps a timm ``config.json``).
    :class:`WeightsError` naming the path when there is none or it is a hub name."""
    refuse_hub(text)
    p = Path(text).expanduser()
    if p.is_dir():
        found = next((p / n for n in WEIGHTS_FILES if (p / n).is_file()), None)
        if found is None:
            raise WeightsError(
                f"--weights {text}: a folder without a weights file ({', '.join(WEIGHTS_FILES)})"
            )
        config = {}
        if (p / CONFIG_JSON).is_file():
            try:
                config = json.loads((p / CONFIG_JSON).read_text())
            except json.JSONDecodeError as exc:
                raise WeightsError(f"{p / CONFIG_JSON}: not valid JSON ({exc})") from None
        return found.resolve(), config if isinstance(config, dict) else {}
    if not p.is_file():
        raise WeightsError(
            f"--weights {text}: no such file: pass a local safetensors, .pth or .bin file (or a "
            "folder holding one)"
        )
    return p.resolve(), {}


def parse_backbone_args(text: str) -> dict[str, Any]:
    """``--backbone-args``: a JSON object, or the path of a JSON file holding one, of timm
    ``create_model`` keyword arguments; a timm hub ``config.json`` (``model_args`` and
    ``pretrained_cfg``) is read the same way. ``mean``/``std`` keys set the input normalisation.
    :class:`WeightsError` (one line) when it is neither."""
    if not text:
        return {}
    source = text
    if not text.lstrip().startswith("{"):
        p = Path(text).expanduser()
        if not p.is_file():
            raise WeightsError(f"--backbone-args {text}: neither a JSON object nor a JSON file")
        source = p.read_text()
    try:
        doc = json.loads(source)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"--backbone-args: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise WeightsError("--backbone-args: expected a JSON object of timm arguments")
    return doc


def split_config(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(create_model arguments, {"mean", "std", "input_px"})`` of a flat argument object or a
    timm hub ``config.json`` (``model_args`` + ``pretrained_cfg``)."""
    if "model_args" in doc or "pretrained_cfg" in doc:
        args = dict(doc.get("model_args") or {})
        cfg = doc.get("pretrained_cfg") or {}
        geometry = {k: cfg[k] for k in ("mean", "std") if k in cfg}
        if cfg.get("input_size"):
            geometry["input_px"] = int(cfg["input_size"][-1])
    else:
        args = {k: v for k, v in doc.items() if k not in ("mean", "std")}
        geometry = {k: doc[k] for k in ("mean", "std") if k in doc}
    args.pop("num_classes", None)  # the head is resdistill's
    args.pop("pretrained", None)  # never downloaded
    return args, geometry


def backbone_spec(model: Any) -> BackboneSpec | None:
    """The :class:`BackboneSpec` of a :class:`~resdistill.config.ModelConfig`, or None for a
    torchvision ResNet without ``--weights`` (the random-initialised networks need no record).

    Reads the weights file's sha256 (and a weights folder's ``config.json``); explicit
    ``--backbone-args``, ``--input-px`` win over the folder's config. :class:`WeightsError` (one
    line naming the flag or file) for a hub name, a missing file, bad arguments, or
    ``--freeze-backbone`` on a torchvision ResNet.
    """
    arch = model.arch
    refuse_hub(timm_name(arch), "--arch timm:")
    timm = is_timm(arch)
    if not timm and model.freeze_backbone:
        raise WeightsError(
            f"--freeze-backbone needs a timm backbone (--arch timm:<name>), not {arch}: e.g. "
            "--arch timm:resnet50 for an ImageNet ResNet-50 from a local file"
        )
    if not timm and (model.backbone_args or model.input_px):
        raise WeightsError(
            "--backbone-args and --input-px are for timm backbones (--arch timm:...)"
        )
    if not timm and not model.weights:
        return None
    args: dict[str, Any] = {}
    geometry: dict[str, Any] = {}
    weights, sha = "", ""
    if model.weights:
        path, config = locate_weights(model.weights)
        args, geometry = split_config(config)
        weights, sha = str(path), file_sha256(path)
    given, given_geometry = split_config(parse_backbone_args(model.backbone_args))
    args.update(given)
    geometry.update(given_geometry)
    for key in ("mean", "std"):
        if key in geometry and len(geometry[key]) != 3:
            raise WeightsError(f"--backbone-args: {key} needs 3 numbers (R, G, B)")
    return BackboneSpec(
        arch=arch,
        args=args,
        weights=weights,
        sha256=sha,
        licence=model.weights_licence,
        frozen=bool(model.freeze_backbone),
        head=model.head,
        input_px=int(model.input_px or geometry.get("input_px", 0)),
        mean=tuple(float(v) for v in geometry.get("mean", ())),
        std=tuple(float(v) for v in geometry.get("std", ())),
    )
