"""NLP feature terms (SPEC sec. 2) on BERT: ``pkd`` and ``tinybert``, each also as ``pesf+NAME``.

Patient KD (Sun et al. 2019, PKD-Skip), as in the authors' code and in MetaDistil's (Zhou et al. 2022,
``nlp/distillation_meta.py``), which the PESF-KD paper follows for GLUE: the [CLS] vectors of the
student's intermediate layers and of the teacher layers they are mapped to, each L2-normalised, compared
by the mean squared error over all elements (batch x layers x hidden). The student's last layer is left
out: its [CLS] vector feeds the prediction layer, which the KD term already matches. Student layer ``k``
(1-based, ``k = 1 .. M-1``) is mapped to teacher layer ``k * (N // M)`` (12 -> 6: teacher layers 2, 4, 6,
8, 10). ``beta = 100`` (Sun et al.; the paper's appendix A.3.1): the per-element mean is small, so beta
is large.

TinyBERT's task-specific distillation (Jiao et al. 2020, ``task_distill.py`` of the authors' code) has two
steps: intermediate-layer distillation (attention scores, hidden states through a learned projection,
embeddings; no prediction loss), then prediction-layer distillation. Here the first step is the term's
initialisation stage (``init_epochs``, default 10 as in the authors' README; constant lr, the student's,
where the authors' code uses 5e-5 with warm-up and linear decay) and the second is the run's logit
objective: ``kd`` with ``alpha=1, tau=1`` (the shipped configs) has the minimiser of TinyBERT's soft
cross-entropy, whose mean over N x C makes its gradient 1/C of the KL's; ``pesf+tinybert`` puts PESF-KD's
teacher update on that second step. The projection only serves the first step: it starts fresh there
(the general models' ``fit_dense`` weights are not loaded) and is dropped afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DistillConfig
from .feature import InitStage, StagedTerm, _fp32
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
    return F.mse_loss(F.normalize(_fp32(s), dim=-1), F.normalize(_fp32(t), dim=-1))


def _bert_configs(name: str, student: nn.Module, teacher: nn.Module) -> tuple:
    if not (hasattr(student, "config") and hasattr(teacher, "config")):
        raise ValueError(f"{name} distils BERT layers; it needs BERT models (train_glue.py), got "
                         f"{type(student).__name__} and {type(teacher).__name__}")
    return student.config, teacher.config


class PKD(FeatureTerm):
    default_weight = 100.0

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        s_cfg, t_cfg = _bert_configs("pkd", student, teacher)
        if s_cfg.hidden_size != t_cfg.hidden_size:
            raise ValueError(f"pkd compares hidden states directly: the student's width {s_cfg.hidden_size} must "
                             f"equal the teacher's {t_cfg.hidden_size}")
        self.pairs = pkd_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

    def forward(self, s_feats: dict, t_feats: dict, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            return pkd_loss(s_feats["hidden_states"], t_feats["hidden_states"], self.pairs)


def _pkd(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, num_train: int) -> PKD:
    return PKD(student, teacher)


def tinybert_layer_map(student_layers: int, teacher_layers: int) -> tuple[list[tuple[int, int]],
                                                                         list[tuple[int, int]]]:
    """TinyBERT's uniform map with ``step = N / M``: hidden states ``(m, m * step)`` for ``m = 0 .. M``
    (0 = embeddings), attentions of layer ``m`` to teacher layer ``m * step``; as indices into the
    ``hidden_states`` and ``attentions`` lists."""
    if teacher_layers % student_layers:
        raise ValueError(f"tinybert maps layers uniformly: the teacher's {teacher_layers} layers must be a multiple "
                         f"of the student's {student_layers}")
    step = teacher_layers // student_layers
    hidden = [(m, m * step) for m in range(student_layers + 1)]
    attention = [(m - 1, m * step - 1) for m in range(1, student_layers + 1)]
    return hidden, attention


def tinybert_loss(s_feats: dict, t_feats: dict, projection: nn.Module,
                  pairs: tuple[list[tuple[int, int]], list[tuple[int, int]]]) -> torch.Tensor:
    """``sum_m MSE(A_s^m, A_t^g(m)) + sum_m MSE(H_s^m W, H_t^g(m))`` (embeddings included), in float32.

    ``A`` are the attention scores before the softmax; as in the authors' code, those of padded keys are
    set to 0 in both networks (they still count in the mean), and every position's hidden state counts.
    """
    hidden, attention = pairs
    keep = s_feats["attention_mask"][:, None, None, :].bool()
    att = sum(F.mse_loss(torch.where(keep, _fp32(s_feats["attentions"][i]), 0.0),
                         torch.where(keep, _fp32(t_feats["attentions"][j]), 0.0)) for i, j in attention)
    rep = sum(F.mse_loss(projection(_fp32(s_feats["hidden_states"][i])), _fp32(t_feats["hidden_states"][j]))
              for i, j in hidden)
    return att + rep


class TinyBERT(StagedTerm):
    default_init_epochs = 10
    main_stage = False   # the prediction-layer step is the run's logit loss

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        s_cfg, t_cfg = _bert_configs("tinybert", student, teacher)
        if s_cfg.num_attention_heads != t_cfg.num_attention_heads:
            raise ValueError(f"tinybert compares attention scores head by head: the student has "
                             f"{s_cfg.num_attention_heads} heads, the teacher {t_cfg.num_attention_heads}")
        self.widths = (s_cfg.hidden_size, t_cfg.hidden_size)
        self.pairs = tinybert_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

    def init_stage(self, student: nn.Module) -> InitStage:
        param = next(student.parameters())
        projection = nn.Linear(*self.widths).to(param.device)

        def loss(s_feats: dict, t_feats: dict) -> torch.Tensor:
            with torch.autocast(param.device.type, enabled=False):
                return tinybert_loss(s_feats, t_feats, projection, self.pairs)

        return InitStage([student, projection], loss)


def _tinybert(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, num_train: int) -> TinyBERT:
    return TinyBERT(student, teacher)


# name -> factory(student, teacher, cfg, num_train), merged into distillers.FEATURE_TERMS.
FACTORIES: dict[str, Callable[..., FeatureTerm]] = {"pkd": _pkd, "tinybert": _tinybert}
