"""CIFAR networks of the distillation benchmark of Tian et al. (2020, "Contrastive Representation
Distillation", github.com/HobbitLong/RepDistiller): ResNet (He et al. 2016, CIFAR variant), WideResNet
(Zagoruyko & Komodakis 2016) and VGG with BatchNorm. Parameter names and shapes follow that code, so its
published teacher checkpoints load directly. ``features=True`` also returns its ``is_feat`` features
(``preact_stages`` = its ``preact=True`` list; like there, the stem entry is the same in both lists)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Adaptable, check_adapter, make_adapter

SLOTS = ("head", "stages")


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def _init(model: nn.Module, linear_std: float | None = None) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


class CifarNet(Adaptable):
    """Common tail: stage adapters, head adapter, feature dict. Subclasses implement ``_stages``."""

    def _add_adapters(self, adapter: str | None, slot: str, bottleneck: int, scale: float = 4.0,
                      alpha: float | None = None) -> None:
        check_adapter(adapter, slot, SLOTS, "CIFAR")
        self.adapters = None
        if adapter is not None and slot == "stages":
            self.adapters = nn.ModuleList(make_adapter(adapter, c, bottleneck, conv=True, scale=scale)
                                          for c in self.stage_channels[1:])
        self._make_head_adapter(adapter if slot == "head" else None, self.feature_dim, self.classifier_layer,
                                bottleneck, scale, alpha)

    def _stage_adapter(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.adapters is None else self.adapters[i](x)

    def forward(self, x: torch.Tensor, features: bool = False):
        stages, preact, last = self._stages(x)
        raw = torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)
        pooled, logits = self._head(raw, self.classifier_layer)
        if not features:
            return logits
        feats = {"pooled": pooled, "stages": stages, "preact_stages": preact}
        if self.adapters is None:   # the logits before the head adapter (stage adapters have no such view)
            feats["logits_unadapted"] = logits if self.adapter is None else self.classifier_layer(raw)
        return logits, feats


class BasicBlock(nn.Module):
    """Post-activation residual block; returns (output, output before its final ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        pre = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre


class ResNet(CifarNet):
    """CIFAR ResNet of depth 6n+2 with BasicBlocks (RepDistiller ``models/resnet.py``)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100,
                 adapter: str | None = None, slot: str = "head", bottleneck: int = 32, **adapter_opts) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1 = _conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(*(BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1)
                                                       for j in range(n))))
            cin = w
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)
        self.feature_dim, self.stage_channels = widths[3], list(widths)
        self._add_adapters(adapter, slot, bottleneck, **adapter_opts)

    @property
    def classifier_layer(self) -> nn.Linear:
        return self.fc

    def _stages(self, x: torch.Tensor):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, preact = [x], [x]
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for block in layer:
                x, pre = block(x)
            x = self._stage_adapter(i, x)
            stages.append(x)
            preact.append(pre)
        return stages, preact, x


class WideBlock(nn.Module):
    """Pre-activation wide block; also returns ``bn1(x)``, the pre-ReLU value of its input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.bn1(x)
        a = F.relu(normed)
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.convShortcut is None else self.convShortcut(a)), normed


class _WideStage(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.Sequential(*blocks)


class WideResNet(CifarNet):
    """WRN-depth-k (RepDistiller ``models/wrn.py``, no dropout). A pre-activation network: ``stages`` are
    the raw stage outputs and ``preact_stages`` the same after the BatchNorm that precedes the next ReLU,
    as in that code."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, adapter: str | None = None,
                 slot: str = "head", bottleneck: int = 32, **adapter_opts) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(3, widths[0])
        for i, stride in enumerate((1, 2, 2), start=1):
            setattr(self, f"block{i}", _WideStage([WideBlock(widths[i - 1] if j == 0 else widths[i], widths[i],
                                                             stride if j == 0 else 1) for j in range(n)]))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)
        nn.init.zeros_(self.fc.bias)
        self.feature_dim, self.stage_channels = widths[3], widths
        self._add_adapters(adapter, slot, bottleneck, **adapter_opts)

    @property
    def classifier_layer(self) -> nn.Linear:
        return self.fc

    def _stages(self, x: torch.Tensor):
        x = self.conv1(x)
        stages, preact = [x], [x]
        for i, stage in enumerate((self.block1, self.block2, self.block3)):
            for j, block in enumerate(stage.layer):
                x, normed = block(x)
                if i > 0 and j == 0:
                    preact.append(normed)
            x = self._stage_adapter(i, x)
            stages.append(x)
        normed = self.bn1(x)
        preact.append(normed)
        return stages, preact, F.relu(normed)


VGG_CFG = {8: [[64], [128], [256], [512], [512]],
           11: [[64], [128], [256, 256], [512, 512], [512, 512]],
           13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
           19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]]}


def _vgg_block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [_conv3x3(cin, w, bias=True), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])  # the block's last ReLU runs outside, to expose the pre-activation


class VGG(CifarNet):
    """VGG with BatchNorm, no FC stack (RepDistiller ``models/vgg.py``, ``vgg*_bn``); ``block0`` is the stem.
    As there, the fourth max-pool runs only on 64-pixel inputs."""

    def __init__(self, depth: int, num_classes: int = 100, adapter: str | None = None, slot: str = "head",
                 bottleneck: int = 32, **adapter_opts) -> None:
        super().__init__()
        cfg, cin = VGG_CFG[depth], 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _vgg_block(widths, cin))
            cin = widths[-1]
        self.classifier = nn.Linear(512, num_classes)
        _init(self, linear_std=0.01)
        self.feature_dim, self.stage_channels = 512, [w[-1] for w in cfg]
        self._add_adapters(adapter, slot, bottleneck, **adapter_opts)

    @property
    def classifier_layer(self) -> nn.Linear:
        return self.classifier

    def _stages(self, x: torch.Tensor):
        pool_last = x.shape[2] == 64
        x = F.relu(self.block0(x))
        stages, preact = [x], [x]
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4)):
            if i < 3 or pool_last:
                x = F.max_pool2d(x, 2)
            pre = block(x)
            x = self._stage_adapter(i, F.relu(pre))
            stages.append(x)
            preact.append(pre)
        return stages, preact, x


def _resnet(depth: int, widths=(16, 16, 32, 64)):
    return lambda num_classes, **kw: ResNet(depth, widths, num_classes, **kw)


MODELS = {
    **{f"resnet{d}": _resnet(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet(32, (32, 64, 128, 256)),
    "wrn_16_2": lambda num_classes, **kw: WideResNet(16, 2, num_classes, **kw),
    "wrn_40_2": lambda num_classes, **kw: WideResNet(40, 2, num_classes, **kw),
    **{f"vgg{d}": (lambda d: lambda num_classes, **kw: VGG(d, num_classes, **kw))(d) for d in VGG_CFG},
}
