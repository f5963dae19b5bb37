"""Shared pieces of the model zoo: adapter construction (SPEC §2), the frozen-backbone mode and
checkpoint loading with a precise error for a wrong architecture (SPEC §4)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from kd_core import Adapter, LoRALinear, ParallelAdapter

ADAPTER_KINDS = ("houlsby", "lora", "parallel", "official")
ADAPTER_PREFIXES = ("adapter.", "adapters.")


def is_adapter_key(key: str) -> bool:
    return key.startswith(ADAPTER_PREFIXES)


def check_adapter(adapter: str | None, slot: str, slots: Iterable[str], family: str) -> None:
    """Reject adapter/slot combinations that a model family does not have."""
    slots = tuple(slots)
    if adapter is not None and adapter not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter {adapter!r}; valid: None, {', '.join(ADAPTER_KINDS)}")
    if slot not in slots:
        raise ValueError(f"slot {slot!r} does not exist for {family} models; valid: {', '.join(slots)}")
    if adapter == "lora" and slot == "stages":
        raise ValueError("adapter 'lora' needs a linear layer; the CNN 'stages' slot has only convolutions "
                         "(use 'houlsby' or 'parallel', or slot='head')")
    if adapter == "official" and slot != "head":
        raise ValueError("adapter 'official' offsets the logits; it has only slot='head'")


def _borrow(wrapper: nn.Module, attr: str, module: nn.Module) -> nn.Module:
    # The wrapped layer stays registered only where the backbone has it, so its parameters keep their
    # published state-dict keys and are neither duplicated nor trained under the adapter prefix.
    del wrapper._modules[attr]
    object.__setattr__(wrapper, attr, module)
    return wrapper


def make_adapter(kind: str, dim: int, bottleneck: int = 32, *, conv: bool = False,
                 linear: nn.Linear | None = None, scale: float = 4.0, alpha: float | None = None) -> nn.Module:
    """One adapter site. ``houlsby``/``parallel`` act on a ``dim``-wide feature (sequentially / in parallel
    to the identity, or, with ``linear``, parallel to that layer); ``lora`` updates ``linear`` (rank = bottleneck)."""
    if kind == "houlsby":
        return Adapter(dim, bottleneck, conv=conv)
    if kind == "parallel":
        if linear is None:
            return ParallelAdapter(dim, dim, bottleneck, scale, conv=conv)
        return _borrow(ParallelAdapter(linear.in_features, linear.out_features, bottleneck, scale, sublayer=linear),
                       "sublayer", linear)
    if kind == "lora":
        if linear is None:
            raise ValueError("a lora adapter needs the linear layer it updates")
        return _borrow(LoRALinear(linear, bottleneck, alpha), "base", linear)
    raise ValueError(f"unknown adapter {kind!r}; valid: {', '.join(ADAPTER_KINDS)}")


class OfficialLogitAdapter(nn.Module):
    """The PESF-KD authors' adapter (github 1170300319/PESF-KD, cv/models/adapter.py): a logit offset
    ``d(h) = W3 relu(W2 W1 h)`` (``W1``: dim -> classes, ``W2``: classes -> bottleneck, ``W3``: bottleneck
    -> classes), PyTorch's default random init; the head returns ``fc(h) - d(h)`` in training and
    ``fc(h) + d(h)`` in evaluation, as that code does."""

    def __init__(self, dim: int, num_classes: int, bottleneck: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, num_classes), nn.Linear(num_classes, bottleneck), nn.ReLU(),
                                 nn.Linear(bottleneck, num_classes))

    def offset(self, logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        delta = self.net(pooled)
        return logits - delta if self.training else logits + delta


def project(linear: nn.Linear, adapter: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Output of ``linear`` at an adapter site: a Houlsby adapter follows it, parallel/LoRA ones wrap it."""
    if adapter is None:
        return linear(x)
    if isinstance(adapter, Adapter):
        return adapter(linear(x))
    return adapter(x)


class Adaptable(nn.Module):
    """Base of every model: adapters live under ``adapter`` (head slot) or ``adapters`` (stages/layers)."""

    _frozen = False

    def _make_head_adapter(self, kind: str | None, dim: int, classifier: nn.Linear, bottleneck: int,
                           scale: float, alpha: float | None) -> None:
        if kind == "official":
            self.adapter = OfficialLogitAdapter(dim, classifier.out_features, bottleneck)
            return
        self.adapter = None if kind is None else make_adapter(
            kind, dim, bottleneck, linear=classifier if kind == "lora" else None, scale=scale, alpha=alpha)

    def _head(self, pooled: torch.Tensor, classifier: nn.Linear,
              dropout: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled feature after the head adapter, logits); a LoRA head adapter replaces the classifier.

        Under autocast a head with an adapter runs in fp32 (adapter, dropout, classifier): in bf16 an
        adapter's offset below ~4e-3 of the O(1) pooled feature is rounded away before the logits."""
        if self.adapter is not None and torch.is_autocast_enabled(pooled.device.type):
            with torch.autocast(pooled.device.type, enabled=False):
                return self._adapted_head(pooled.float(), classifier, dropout)
        return self._adapted_head(pooled, classifier, dropout)

    def _adapted_head(self, pooled: torch.Tensor, classifier: nn.Linear,
                      dropout: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.adapter, OfficialLogitAdapter):
            x = pooled if dropout is None else dropout(pooled)
            return pooled, self.adapter.offset(classifier(x), pooled)
        lora = isinstance(self.adapter, LoRALinear)
        if self.adapter is not None and not lora:
            pooled = self.adapter(pooled)
        x = pooled if dropout is None else dropout(pooled)
        return pooled, (self.adapter if lora else classifier)(x)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_adapter_key(n)]

    def freeze_backbone(self, batch_stats: bool = False) -> "Adaptable":
        """Train only the adapters; the backbone (BatchNorm statistics, dropout) stays in eval mode, or with
        ``batch_stats`` follows train/eval like the adapters (the authors' code: BatchNorm on batch statistics)."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_key(name))
        self._frozen = not batch_stats
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Adaptable":
        super().train(mode)
        if self._frozen:
            for name, child in self.named_children():
                if name not in ("adapter", "adapters"):
                    child.train(False)
        return self


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that receive updates (the paper's "params" column)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _read_state_dict(source: str | Path | Mapping) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        if str(source).endswith(".safetensors"):
            from safetensors.torch import load_file
            source = load_file(str(source))
        else:
            source = torch.load(source, map_location="cpu", weights_only=True)
    if "model" in source and isinstance(source["model"], Mapping):
        source = source["model"]
    sd = dict(source)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: nn.Module, source: str | Path | Mapping) -> list[str]:
    """Load a plain or ``{"model": state_dict}`` checkpoint strictly, except that adapter keys may be
    missing (a plain teacher into an adapted model). Returns the adapter keys left at initialisation.
    Raises ValueError naming the missing, unexpected and mis-shaped keys otherwise."""
    sd = _read_state_dict(source)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not is_adapter_key(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def block(title: str, keys: list[str]) -> str:
            return f"\n  {title} ({len(keys)}): " + (", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                                                      if keys else "none")
        raise ValueError(f"checkpoint does not match {type(model).__name__}:" + block("missing", missing)
                         + block("unexpected", unexpected) + block("mis-shaped", shapes))
    model.load_state_dict(sd, strict=False)
    return [k for k in own if k not in sd and is_adapter_key(k)]
