"""Distillation methods: ``build_distiller("pesf", student, teacher, cfg)``.

A method name is a logit method (``ce``, ``kd``, ``ftkd``, ``pesf``, ``dml``, ``kdcl``), a feature
term alone, or ``kd+NAME`` / ``pesf+NAME`` (the term added to that method's loss). Alone, a CV term
runs as RepDistiller runs it, ``CE + beta * L_feat`` without KL (``FeatureDistiller``); ``pkd`` and
``tinybert`` mean ``kd+pkd`` and ``kd+tinybert``, since their papers' objectives include the KD term.
``rco`` and ``sftn_teacher`` are logit methods too; ``takd`` and ``sftn`` are multi-stage methods
(``STAGED_METHODS``: a list of such runs, run in order by ``stages.run_stages``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .base import DistillConfig, Distiller
from .feature import FACTORIES as FEATURE_FACTORIES
from .feature import RANDOM_STEP_TERMS
from .nlp import FACTORIES as NLP_FACTORIES
from .logit import (CEDistiller, DMLDistiller, FeatureDistiller, FeatureTerm, FTKDDistiller, KDCLDistiller,
                    KDDistiller, PESFDistiller, min_logit_ensemble)
from .staged import STAGED_METHODS, RCODistiller, SFTNTeacherDistiller

LOGIT_METHODS: dict[str, type[Distiller]] = {
    "ce": CEDistiller, "kd": KDDistiller, "ftkd": FTKDDistiller, "pesf": PESFDistiller,
    "dml": DMLDistiller, "kdcl": KDCLDistiller, "rco": RCODistiller, "sftn_teacher": SFTNTeacherDistiller,
}
# name -> factory(student, teacher, cfg, num_train) -> FeatureTerm (distillers/feature.py).
FEATURE_TERMS: dict[str, Callable[..., FeatureTerm]] = dict(FEATURE_FACTORIES)
FEATURE_TERMS.update(NLP_FACTORIES)   # pkd (distillers/nlp.py)
COMBINABLE = ("kd", "pesf")
# The logit objective of a feature term named alone: "ce" (FeatureDistiller, RepDistiller's "-a 0") for the
# CV terms; "kd" for PKD (Sun et al. 2019, eq. 8 of the PESF-KD appendix) and TinyBERT (its prediction step).
ALONE_BASE: dict[str, str] = {**{name: "ce" for name in FEATURE_FACTORIES},
                              **{name: "kd" for name in NLP_FACTORIES}}
# The distiller class that carries a feature term, by logit objective.
WITH_FEATURE: dict[str, type[Distiller]] = {"ce": FeatureDistiller, "kd": KDDistiller, "pesf": PESFDistiller}


def method_names() -> list[str]:
    combos = [f"{base}+{name}" for base in COMBINABLE for name in FEATURE_TERMS]
    return sorted(LOGIT_METHODS) + sorted(STAGED_METHODS) + sorted(FEATURE_TERMS) + combos


def parse_method(method: str) -> tuple[str, str | None]:
    """``"pesf+crd"`` -> ``("pesf", "crd")``; ``"crd"`` -> ``("ce", "crd")``; ``"pkd"`` -> ``("kd", "pkd")``;
    ``"kd"`` -> ``("kd", None)``."""
    base, _, feat = method.partition("+")
    if not feat and base in FEATURE_TERMS:
        return ALONE_BASE[base], base
    if base not in LOGIT_METHODS or (feat and (feat not in FEATURE_TERMS or base not in COMBINABLE)):
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(method_names())}")
    return base, feat or None


def _distiller_class(method: str) -> type[Distiller]:
    base, feat = parse_method(method)
    return WITH_FEATURE[base] if feat else LOGIT_METHODS[base]


def build_distiller(method: str, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
                    num_train: int = 0, train_labels: torch.Tensor | None = None) -> Distiller:
    """``train_labels``: the training set's labels in index order (CRD's class-aware negatives; its length
    is the bank size); ``num_train`` gives only the size, for terms that need no labels."""
    base, feat = parse_method(method)
    cls = _distiller_class(method)
    if feat is None:
        return cls(student, teacher, cfg)
    term = FEATURE_TERMS[feat](student, teacher, cfg, len(train_labels) if train_labels is not None else num_train)
    if train_labels is not None:
        term.bind_train_labels(train_labels)
    if not term.main_stage and cfg.init_epochs is not None and cfg.init_epochs <= 0:
        raise ValueError(f"{feat} acts only through its initialisation stage; init_epochs={cfg.init_epochs} would "
                         f"leave plain {base}")
    return cls(student, teacher, cfg, feature_term=term)


def draws_random_numbers_in_step(method: str) -> bool:
    """True when a training step of ``method`` draws random numbers (CRD's negatives; the networks use no
    dropout), i.e. when a CUDA graph of the step depends on the generator it replays from."""
    if method in STAGED_METHODS:
        return False   # their stages are kd and sftn_teacher runs
    return parse_method(method)[1] in RANDOM_STEP_TERMS


def needs_teacher(method: str) -> bool:
    if method in STAGED_METHODS:
        return True
    return _distiller_class(method).needs_teacher


__all__ = ["DistillConfig", "Distiller", "FeatureTerm", "LOGIT_METHODS", "FEATURE_TERMS", "ALONE_BASE",
           "build_distiller", "method_names", "parse_method", "needs_teacher", "draws_random_numbers_in_step",
           "min_logit_ensemble",
           "STAGED_METHODS"]
