"""Distillation methods: ``build_distiller("pesf", student, teacher, cfg)``.

A method name is a logit method (``ce``, ``kd``, ``ftkd``, ``pesf``, ``dml``, ``kdcl``), a feature
term alone (``pkt`` = ``kd+pkt``), or ``kd+NAME`` / ``pesf+NAME``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .base import DistillConfig, Distiller
from .feature import FACTORIES as FEATURE_FACTORIES
from .nlp import FACTORIES as NLP_FACTORIES
from .logit import (CEDistiller, DMLDistiller, FeatureTerm, FTKDDistiller, KDCLDistiller, KDDistiller,
                    PESFDistiller, min_logit_ensemble)

LOGIT_METHODS: dict[str, type[Distiller]] = {
    "ce": CEDistiller, "kd": KDDistiller, "ftkd": FTKDDistiller, "pesf": PESFDistiller,
    "dml": DMLDistiller, "kdcl": KDCLDistiller,
}
# name -> factory(student, teacher, cfg, num_train) -> FeatureTerm (distillers/feature.py).
FEATURE_TERMS: dict[str, Callable[..., FeatureTerm]] = dict(FEATURE_FACTORIES)
FEATURE_TERMS.update(NLP_FACTORIES)   # pkd (distillers/nlp.py)
COMBINABLE = ("kd", "pesf")


def method_names() -> list[str]:
    combos = [f"{base}+{name}" for base in COMBINABLE for name in FEATURE_TERMS]
    return sorted(LOGIT_METHODS) + sorted(FEATURE_TERMS) + combos


def parse_method(method: str) -> tuple[str, str | None]:
    """``"pesf+crd"`` -> ``("pesf", "crd")``; ``"crd"`` -> ``("kd", "crd")``; ``"kd"`` -> ``("kd", None)``."""
    base, _, feat = method.partition("+")
    if not feat and base in FEATURE_TERMS:
        base, feat = "kd", base
    if base not in LOGIT_METHODS or (feat and (feat not in FEATURE_TERMS or base not in COMBINABLE)):
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(method_names())}")
    return base, feat or None


def build_distiller(method: str, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
                    num_train: int = 0) -> Distiller:
    base, feat = parse_method(method)
    cls = LOGIT_METHODS[base]
    if feat is None:
        return cls(student, teacher, cfg)
    term = FEATURE_TERMS[feat](student, teacher, cfg, num_train)
    if not term.main_stage and cfg.init_epochs is not None and cfg.init_epochs <= 0:
        raise ValueError(f"{feat} acts only through its initialisation stage; init_epochs={cfg.init_epochs} would "
                         f"leave plain {base}")
    return cls(student, teacher, cfg, feature_term=term)


def needs_teacher(method: str) -> bool:
    return LOGIT_METHODS[parse_method(method)[0]].needs_teacher


__all__ = ["DistillConfig", "Distiller", "FeatureTerm", "LOGIT_METHODS", "FEATURE_TERMS", "build_distiller",
           "method_names", "parse_method", "needs_teacher", "min_logit_ensemble"]
