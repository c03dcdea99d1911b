"""Classifier networks: torchvision ResNets that return logits and their last feature map.

Teacher and student share this family (see the paper summary in the README): the same
architecture, fed a high-magnification tile (teacher) or the low-magnification tile of the same
region (student). Distillation uses both outputs of :meth:`ResNetClassifier.forward`:

* ``logits``: ``fc(flatten(avgpool(F)))``, shape ``(N, num_classes)``;
* ``features`` ``F``: the output of ``layer4`` (the last convolutional stage), shape
  ``(N, C, H / 32, W / 32)`` with ``C = 512`` for resnet18/34, ``2048`` for resnet50 and ``256``
  for resnet-small (spatial size rounded up by the strided convolutions, at least 1x1).

torchvision weights always start random (``weights=None``): nothing is downloaded. A network
may start from a local weights file instead (``--weights``), and ``--arch timm:<name>`` builds
any timm model (a pathology foundation model, a small CNN) behind the same two outputs:
:func:`build_model` with a :class:`resdistill.backbones.BackboneSpec` (see
:mod:`resdistill.backbones.timm_net` for the ViT's feature grid and input geometry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Supported architectures and the channel count of their last feature map. ``resnet-small`` is
#: the paper's reference network (see :func:`small_resnet`).
ARCHITECTURES: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet-small": 256,
}
DEFAULT_ARCH = "resnet18"

#: Stage widths and GroupNorm groups of ``resnet-small``.
SMALL_WIDTHS = (32, 64, 128, 256)
SMALL_GROUPS = 8


def small_resnet(num_classes: int) -> nn.Module:
    """The paper's reference network as a torchvision ``ResNet``: ``BasicBlock``, one block per
    stage, widths 32/64/128/256, GroupNorm (8 groups) instead of BatchNorm.

    torchvision's constructor fixes the widths at 64..512, so the stem, stages and head are
    rebuilt here from its own ``BasicBlock`` with the same attribute names (``conv1``, ``bn1``,
    ``layer1``..``layer4``, ``fc``), hence the same forward. About 1/8 of resnet18's FLOPs.
    GroupNorm keeps per-sample statistics, so small per-worker batches need no SyncBatchNorm.
    """
    from torchvision.models.resnet import BasicBlock, ResNet, conv1x1

    def norm(channels: int) -> nn.Module:
        return nn.GroupNorm(SMALL_GROUPS, channels)

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, norm_layer=norm)
    w = SMALL_WIDTHS
    net.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = norm(w[0])
    inplanes = w[0]
    for i, planes in enumerate(w):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(conv1x1(inplanes, planes, stride), norm(planes))
        block = BasicBlock(inplanes, planes, stride, down, norm_layer=norm)
        setattr(net, f"layer{i + 1}", nn.Sequential(block))
        inplanes = planes
    net.fc = nn.Linear(w[-1], num_classes)
    for m in net.modules():  # torchvision's initialisation, for the replaced layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return net


class ResNetClassifier(nn.Module):
    """A torchvision ResNet whose forward returns ``(logits, last conv feature map)``."""

    def __init__(self, arch: str = DEFAULT_ARCH, num_classes: int = 2) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        import torchvision

        self.arch = arch
        self.num_classes = num_classes
        if arch == "resnet-small":
            self.net = small_resnet(num_classes)
        else:
            self.net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    @property
    def feature_channels(self) -> int:
        """Channels ``C`` of the feature map returned by :meth:`forward`."""
        return ARCHITECTURES[self.arch]

    @property
    def head_weight(self) -> torch.Tensor:
        """The linear head's weight ``(num_classes, C)`` (class attention maps use it)."""
        return self.net.fc.weight

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``layer4(layer3(layer2(layer1(maxpool(relu(bn1(conv1(x))))))))``."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map: ``fc(flatten(adaptive_avgpool_1x1(features)))``."""
        return self.net.fc(torch.flatten(self.net.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` of shape ``(N, 3, H, W)`` -> ``(logits (N, K), features (N, C, h, w))``."""
        f = self.features(x)
        return self.head(f), f

    def stage_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(logits, [layer1(...), layer2(...), layer3(...), layer4(...)])`` in one pass: the
        output of every stage (strides 4, 8, 16, 32), the last one :meth:`features`' map, for a
        loss on an earlier stage (``--feature-grid``, :mod:`resdistill.train.feature_tap`)."""
        n = self.net
        f = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        maps = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            f = layer(f)
            maps.append(f)
        return self.head(f), maps

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored in checkpoints next to the weights."""
        return {"arch": self.arch, "num_classes": self.num_classes}


def build_model(
    arch: str = DEFAULT_ARCH,
    num_classes: int = 2,
    backbone: Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
) -> nn.Module:
    """The network of ``arch`` with ``num_classes`` outputs: a :class:`ResNetClassifier`, or for
    ``timm:<name>`` a :class:`resdistill.backbones.timm_net.TimmClassifier` built from
    ``backbone`` (a :class:`~resdistill.backbones.BackboneSpec` as a dict; None: the
    architecture's defaults). Random weights, nothing downloaded; with ``pretrained`` the
    spec's weights file is loaded (a training run's start), and a frozen file-backed backbone
    always loads it (its weights are not in checkpoints). ValueError (one line) for an unknown
    architecture or weights that do not fit."""
    from resdistill.backbones import BackboneSpec, is_timm

    spec = BackboneSpec.from_dict(backbone) if backbone else BackboneSpec(arch=arch)
    if spec.arch != arch:
        raise ValueError(f"backbone record is for {spec.arch}, not {arch}")
    if is_timm(arch):
        from resdistill.backbones.timm_net import TimmClassifier

        return TimmClassifier(spec, num_classes, pretrained=pretrained)
    model = ResNetClassifier(arch=arch, num_classes=num_classes)
    if pretrained and spec.weights:
        from resdistill.backbones.timm_net import load_backbone_weights

        load_backbone_weights(model.net, spec)
    return model
