"""Pretrained backbones: timm architectures and local weights files.

* :mod:`~resdistill.backbones.spec` - :class:`BackboneSpec`, what a checkpoint records of its
  backbone (timm name and arguments, weights file, its sha256 and licence note, frozen or not,
  head, input geometry), and :func:`backbone_spec`, which builds it from ``--arch``,
  ``--weights`` and friends (one-line :class:`WeightsError` for a missing file or a hub name).
* :mod:`~resdistill.backbones.weights` - reading a weights file (safetensors, ``.pth``/``.bin``
  state dicts, nested ``{"state_dict"|"model": ...}``) and fitting its keys to a network
  (``module.``/``model.`` prefixes, extra head keys, timm's own converters), loaded strictly.
* :mod:`~resdistill.backbones.timm_net` - :class:`TimmClassifier`: a timm backbone behind the
  ``(logits, feature map)`` contract of :mod:`resdistill.models`, with the input geometry that
  maps a teacher region onto the backbone's input.

Nothing here downloads: ``--weights hf-hub:...`` is refused with the way to pass a local file.
"""

from resdistill.backbones.spec import (
    HUB_PREFIX,
    TIMM_PREFIX,
    BackboneSpec,
    WeightsError,
    backbone_spec,
    is_timm,
    timm_name,
)

__all__ = [
    "HUB_PREFIX",
    "TIMM_PREFIX",
    "BackboneSpec",
    "WeightsError",
    "backbone_spec",
    "is_timm",
    "timm_name",
]
