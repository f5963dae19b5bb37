"""ImageNet ResNets: torchvision's ``resnet18/34/50`` (He et al. 2016) and its weights, unchanged. The
wrapper registers torchvision's own layers under torchvision's names (so its checkpoints load as they are)
and adds the adapter slots around them."""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from .common import Adaptable, check_adapter, make_adapter

NAMES = ("resnet18", "resnet34", "resnet50")
SLOTS = ("head", "stages")


def _block_with_preact(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision BasicBlock/Bottleneck, run through its own layers, also returning its output before
    the final ReLU (which torchvision's ``forward`` does not expose)."""
    identity = x if block.downsample is None else block.downsample(x)
    out = torch.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(torch.relu(out)))
    pre = out + identity
    return torch.relu(pre), pre


class TorchvisionResNet(Adaptable):
    """torchvision ResNet with adapter slots; ``stages`` = [stem (after max-pool), layer1..layer4]."""

    def __init__(self, name: str, num_classes: int = 1000, weights: Any = None, adapter: str | None = None,
                 slot: str = "head", bottleneck: int = 32, scale: float = 4.0, alpha: float | None = None,
                 **tv_kwargs) -> None:
        super().__init__()
        if name not in NAMES:
            raise ValueError(f"unknown torchvision ResNet {name!r}; valid: {', '.join(NAMES)}")
        check_adapter(adapter, slot, SLOTS, "ImageNet")
        builder = getattr(torchvision.models, name)
        # torchvision refuses num_classes != 1000 together with weights: load them, then replace the head.
        net = builder(weights=weights, **tv_kwargs) if weights is not None else \
            builder(num_classes=num_classes, **tv_kwargs)
        if net.fc.out_features != num_classes:
            net.fc = nn.Linear(net.fc.in_features, num_classes)
        for child_name, child in net.named_children():
            setattr(self, child_name, child)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        self.feature_dim = self.fc.in_features
        self.stage_channels = [self.conv1.out_channels] + [_out_channels(layer) for layer in layers]
        self.adapters = None
        if adapter is not None and slot == "stages":
            self.adapters = nn.ModuleList(make_adapter(adapter, c, bottleneck, conv=True, scale=scale)
                                          for c in self.stage_channels[1:])
        self._make_head_adapter(adapter if slot == "head" else None, self.feature_dim, self.fc,
                                bottleneck, scale, alpha)

    def forward(self, x: torch.Tensor, features: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages, preact = [x], [x]
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer[:-1](x)
            x, pre = _block_with_preact(layer[-1], x)
            if self.adapters is not None:
                x = self.adapters[i](x)
            stages.append(x)
            preact.append(pre)
        pooled, logits = self._head(torch.flatten(self.avgpool(x), 1), self.fc)
        if not features:
            return logits
        return logits, {"pooled": pooled, "stages": stages, "preact_stages": preact}


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features


MODELS = {name: (lambda name: lambda num_classes, **kw: TorchvisionResNet(name, num_classes, **kw))(name)
          for name in NAMES}
