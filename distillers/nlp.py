"""NLP feature terms (SPEC sec. 2): ``pkd``, the extra ``beta * L_PT`` of ``kd+pkd`` / ``pesf+pkd`` on BERT.

Patient KD (Sun et al. 2019, PKD-Skip), as in the authors' code and in MetaDistil's (Zhou et al. 2022,
``nlp/distillation_meta.py``), which the PESF-KD paper follows for GLUE: the [CLS] vectors of the
student's intermediate layers and of the teacher layers they are mapped to, each L2-normalised, compared
by the mean squared error over all elements (batch x layers x hidden). The student's last layer is left
out: its [CLS] vector feeds the prediction layer, which the KD term already matches. Student layer ``k``
(1-based, ``k = 1 .. M-1``) is mapped to teacher layer ``k * (N // M)`` (12 -> 6: teacher layers 2, 4, 6,
8, 10). ``beta = 100`` (Sun et al.; the paper's appendix A.3.1): the per-element mean is small, so beta
is large.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DistillConfig
from .logit import FeatureTerm


def pkd_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(student, teacher)`` indices into the ``hidden_states`` lists (0 = embeddings, k = output of layer k)."""
    if student_layers < 2:
        raise ValueError(f"pkd needs a student with at least 2 layers (the last is left to the KD term), "
                         f"got {student_layers}")
    if teacher_layers < student_layers:
        raise ValueError(f"pkd maps student layers onto a deeper teacher; got a {student_layers}-layer student "
                         f"and a {teacher_layers}-layer teacher")
    step = teacher_layers // student_layers
    return [(k, k * step) for k in range(1, student_layers)]


def pkd_loss(s_hidden: list[torch.Tensor], t_hidden: list[torch.Tensor],
             pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Mean squared error of the L2-normalised [CLS] vectors of the paired layers (at least float32)."""
    s = torch.stack([s_hidden[i][:, 0] for i, _ in pairs], dim=1)
    t = torch.stack([t_hidden[j][:, 0] for _, j in pairs], dim=1)
    dtype = torch.promote_types(s.dtype, torch.float32)   # bf16 under autocast: normalise in fp32
    return F.mse_loss(F.normalize(s.to(dtype), dim=-1), F.normalize(t.to(dtype), dim=-1))


class PKD(FeatureTerm):
    default_weight = 100.0

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        s_cfg, t_cfg = student.config, teacher.config
        if s_cfg.hidden_size != t_cfg.hidden_size:
            raise ValueError(f"pkd compares hidden states directly: the student's width {s_cfg.hidden_size} must "
                             f"equal the teacher's {t_cfg.hidden_size}")
        self.pairs = pkd_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

    def forward(self, s_feats: dict, t_feats: dict, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            return pkd_loss(s_feats["hidden_states"], t_feats["hidden_states"], self.pairs)


def _pkd(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, num_train: int) -> PKD:
    return PKD(student, teacher)


# name -> factory(student, teacher, cfg, num_train), merged into distillers.FEATURE_TERMS.
FACTORIES: dict[str, Callable[..., FeatureTerm]] = {"pkd": _pkd}
