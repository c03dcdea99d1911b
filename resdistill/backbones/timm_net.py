"""A timm backbone behind the ``(logits, feature map)`` contract of :mod:`resdistill.models`.

For an input tile ``x`` ``(N, 3, H, W)`` normalised as the checkpoint's card says (the dataset's
statistics at its magnification), :class:`TimmClassifier` computes::

    x' = resize(x * in_scale + in_shift, (P, P))       # the input geometry, below
    F  = backbone.forward_features(x')                  # tokens (N, L, D) or a map (N, D, h, w)
    e  = backbone.forward_head(F, pre_logits=True)      # the pooled embedding (N, D), timm's own
                                                        # pooling (CLS token, mean, attention)
    logits = head(e)                                    # linear, or Linear-GELU-Linear (mlp)
    features = grid(F)                                  # (N, D, h, w)

**Input geometry** (how a teacher region maps to the backbone's input). ``in_scale``/``in_shift``
turn the card's normalisation into the backbone's own (timm's pretrained config of the
architecture, or ``mean``/``std`` from ``--backbone-args`` / a weights folder's config.json):
``scale = std_data / std_fm``, ``shift = (mean_data - mean_fm) / std_fm``, set once by the
training stage (:meth:`TimmClassifier.set_input_normalization`) and stored as buffers in the
checkpoint. The whole region is then resized to ``P x P`` (bilinear, antialiased when
shrinking), ``P`` = ``--input-px``, else the fixed input size of a ViT (e.g. 224), else no resize
(a CNN takes any size): one backbone input per region, the region's field of view kept, its
pixel size scaled by ``P / tile_px``. Being part of ``forward``, ``evaluate``, ``predict``,
``export`` and cached targets replay it; the checkpoint's read chain records it
(:func:`input_geometry`).

**Feature grid.** Token models: the prefix tokens (CLS, registers: ``num_prefix_tokens``) are
dropped and the patch tokens reshaped to their ``(H'/p, W'/p)`` grid; CNNs: the last map as is
(NHWC outputs permuted). A backbone whose features have no spatial layout gives its pooled
embedding as a 1x1 map, and :attr:`TimmClassifier.spatial_features` is False (distillation then
uses KD only).

**Frozen backbone** (``spec.frozen``): no gradients, always eval mode. With a weights file
(``spec.external``) the backbone's parameters are left out of :meth:`state_dict` (the file is
referenced, never copied into run folders) and :meth:`load_state_dict` takes them from the
network, which read them from the file at construction (sha256 checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resdistill.backbones.spec import MLP_HIDDEN, BackboneSpec, WeightsError, timm_name

#: ``create_model`` arguments naming a layer class, resolved from timm.layers or torch.nn
LAYER_ARGS = ("mlp_layer", "act_layer", "norm_layer", "embed_layer", "block_fn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_layer_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` with layer classes given by name (``"SwiGLUPacked"``, ``"torch.nn.SiLU"``)
    replaced by the class from ``timm.layers`` or ``torch.nn``; other names (``"silu"``) are
    left for timm to resolve. Only those two modules are looked in: a config cannot import
    arbitrary code."""
    import timm.layers

    out = dict(args)
    for key in LAYER_ARGS:
        value = out.get(key)
        if not isinstance(value, str):
            continue
        name = value.rsplit(".", 1)[-1]
        found = getattr(timm.layers, name, None) or getattr(nn, name, None)
        if callable(found):  # a class, or a partial of one (timm.layers.SwiGLUPacked)
            out[key] = found
    return out


def create_backbone(spec: BackboneSpec) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, **args)`` (``img_size`` =
    ``spec.input_px`` for models that take one). :class:`WeightsError` for an unknown name or
    arguments timm refuses."""
    import timm

    name = timm_name(spec.arch)
    args = resolve_layer_args(spec.args)
    if not timm.is_model(name):
        raise WeightsError(f"--arch {spec.arch}: timm has no model {name!r} (timm.list_models)")
    try:
        if spec.input_px and "img_size" not in args:
            try:
                return timm.create_model(
                    name, pretrained=False, num_classes=0, img_size=spec.input_px, **args
                )
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
        return timm.create_model(name, pretrained=False, num_classes=0, **args)
    except (TypeError, ValueError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"--arch {spec.arch}: timm cannot build it with {dict(spec.args)} "
                           f"({first})") from None  # fmt: skip


def fixed_input_px(backbone: nn.Module) -> int:
    """The input edge a ViT-like backbone needs (0 when it takes any size)."""
    pe = getattr(backbone, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(backbone, "dynamic_img_size", False):
        return 0
    return int(size[0]) if isinstance(size, tuple | list) else int(size)


def make_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    """``linear``: ``Linear(dim, K)``; ``mlp``: ``Linear(dim, 512) -> GELU -> Linear(512, K)``."""
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(dim, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, num_classes)
        )
    raise WeightsError(f"--head {kind}: choose linear or mlp")


class TimmClassifier(nn.Module):
    """See the module docstring. ``pretrained`` loads ``spec.weights`` (training start); an
    external (frozen, file-backed) backbone always loads it, checking its sha256."""

    def __init__(self, spec: BackboneSpec, num_classes: int, *, pretrained: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.spec = spec
        self.arch = spec.arch
        self.num_classes = num_classes
        self.backbone = create_backbone(spec)
        #: classifier keys of the weights file that were not loaded (a pretraining head)
        self.dropped_head_keys: list[str] = []
        if spec.weights and (pretrained or spec.external):
            self.dropped_head_keys = load_backbone_weights(self.backbone, spec)
        dim = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.embed_dim = dim
        self.classifier = make_head(spec.head, dim, num_classes)
        self.input_px = int(spec.input_px or fixed_input_px(self.backbone))
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.fm_mean = tuple(spec.mean or cfg.get("mean") or IMAGENET_MEAN)
        self.fm_std = tuple(spec.std or cfg.get("std") or IMAGENET_STD)
        self.register_buffer("in_scale", torch.ones(1, 3, 1, 1))
        self.register_buffer("in_shift", torch.zeros(1, 3, 1, 1))
        self.prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        self.spatial_features = True  # False once a forward finds no spatial layout
        if spec.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    # -- the ResNetClassifier interface ------------------------------------------------------

    @property
    def feature_channels(self) -> int:
        return int(self.backbone.num_features)

    @property
    def head_weight(self) -> torch.Tensor | None:
        """The linear head's weight ``(K, D)`` (None for the mlp head). Class attention maps
        (``--attention-weight``) need a global-average-pool + linear head over the feature map,
        which a token model's CLS pooling is not: the planner refuses them for timm networks."""
        return self.classifier.weight if isinstance(self.classifier, nn.Linear) else None

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "backbone": self.spec.to_dict()}  # fmt: skip

    def train(self, mode: bool = True) -> TimmClassifier:
        super().train(mode)
        if self.spec.frozen:
            self.backbone.eval()
        return self

    # -- forward -----------------------------------------------------------------------------

    def set_input_normalization(self, mean: Any, std: Any) -> None:
        """Set ``in_scale``/``in_shift`` so inputs normalised with ``(mean, std)`` reach the
        backbone normalised with its own (module docstring)."""
        m, s, fm, fs = (torch.tensor([float(v) for v in t], dtype=torch.float32).view(1, 3, 1, 1)
                        for t in (mean, std, self.fm_mean, self.fm_std))  # fmt: skip
        self.in_scale.copy_(s / fs)
        self.in_shift.copy_((m - fm) / fs)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input geometry: renormalise, then resize to ``input_px`` (when set)."""
        x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        px = self.input_px
        if px and tuple(x.shape[-2:]) != (px, px):
            shrink = x.shape[-1] > px or x.shape[-2] > px
            x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False,
                              antialias=bool(shrink))  # fmt: skip
        return x

    def grid(self, feats: torch.Tensor, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The feature map ``(N, D, h, w)`` of ``forward_features``' output (module docstring)."""
        if feats.dim() == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            return feats
        if feats.dim() == 3:
            tokens = feats[:, self.prefix_tokens :]
            n = tokens.shape[1]
            patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
            if patch is not None:
                h, w = x.shape[-2] // int(patch[0]), x.shape[-1] // int(patch[1])
            else:
                h = w = int(round(n**0.5))
            if n > 0 and h * w == n:
                return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        self.spatial_features = False
        return emb[:, :, None, None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding ``(N, D)`` the head reads (what the embedding cache stores)."""
        feats = self.backbone.forward_features(self.prepare(x))
        return self.backbone.forward_head(feats, pre_logits=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(N, 3, H, W)`` -> ``(logits (N, K), features (N, D, h, w))``."""
        x = self.prepare(x)
        feats = self.backbone.forward_features(x)
        emb = self.backbone.forward_head(feats, pre_logits=True)
        return self.classifier(emb), self.grid(feats, x, emb)

    # -- checkpoints: a frozen, file-backed backbone stays out of model.pt --------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        out = super().state_dict(*args, **kwargs)
        if self.spec.external:
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") + "backbone."
            for k in [k for k in out if k.startswith(prefix)]:
                del out[k]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:  # fmt: skip
        if self.spec.external:
            own = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
            state_dict = {**own, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_backbone_weights(backbone: nn.Module, spec: BackboneSpec) -> list[str]:
    """Load ``spec.weights`` into ``backbone`` after checking the file's sha256 against the
    recorded one (:class:`WeightsError`, one line, when the file is gone or changed)."""
    from pathlib import Path

    from resdistill.backbones.spec import file_sha256
    from resdistill.backbones.weights import load_weights

    path = find_weights(spec)
    if spec.sha256:
        got = file_sha256(path)
        if got != spec.sha256:
            raise WeightsError(
                f"{path}: sha256 {got[:12]} is not the {spec.sha256[:12]} the checkpoint "
                "recorded: these are other weights; restore the original file"
            )
    return load_weights(backbone, Path(path), spec.arch)


def find_weights(spec: BackboneSpec) -> str:
    """The recorded weights file, else ``$RESDISTILL_WEIGHTS_DIR/<its name>`` (weights moved to
    another machine); :class:`WeightsError` naming both when neither exists."""
    import os
    from pathlib import Path

    path = Path(spec.weights)
    if path.is_file():
        return str(path)
    folder = os.environ.get("RESDISTILL_WEIGHTS_DIR", "")
    if folder and (Path(folder) / path.name).is_file():
        return str(Path(folder) / path.name)
    raise WeightsError(
        f"{spec.weights}: the backbone weights this checkpoint needs are not there (sha256 "
        f"{spec.sha256[:12]}; weights are referenced, never copied into run folders): put the "
        "file back, or set RESDISTILL_WEIGHTS_DIR to a folder holding it"
    )
