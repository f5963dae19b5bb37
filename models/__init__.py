"""Model zoo (SPEC §4): CIFAR ResNet/WRN/VGG (RepDistiller layout), torchvision's ImageNet ResNets and a
compact BERT, each with the adapter slots of SPEC §2 and ``forward(x, features=False)``."""
from __future__ import annotations

from torch import nn

from . import cifar, imagenet
from .common import ADAPTER_KINDS, count_trainable, is_adapter_key, load_checkpoint

__all__ = ["ADAPTER_KINDS", "available_models", "build_model", "count_trainable", "is_adapter_key",
           "load_checkpoint"]


def _bert(num_classes: int, config=None, pretrained=None, **kw) -> nn.Module:
    from .bert import BertForSequenceClassification
    if pretrained is not None:
        if config is not None:
            raise ValueError("give either config= or pretrained=, not both")
        return BertForSequenceClassification.from_pretrained(pretrained, num_classes, **kw)
    return BertForSequenceClassification(config, num_classes, **kw)


_REGISTRY = {**cifar.MODELS, **imagenet.MODELS, "bert": _bert}


def available_models() -> list[str]:
    return list(_REGISTRY)


def build_model(name: str, num_classes: int, adapter: str | None = None, slot: str = "head",
                bottleneck: int = 32, **options) -> nn.Module:
    """Build ``name`` with ``num_classes`` outputs and an optional adapter (``houlsby``/``lora``/``parallel``)
    in ``slot`` (``head``; ``stages`` for CNNs, ``layers`` for BERT). ``options``: ``scale`` (parallel),
    ``alpha`` (LoRA); ImageNet: ``weights`` (a torchvision weights enum or its name); BERT: ``config``
    (BertConfig, dict, config.json or folder) or ``pretrained`` (a Hugging Face folder)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](num_classes, adapter=adapter, slot=slot, bottleneck=bottleneck, **options)
