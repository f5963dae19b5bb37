"""Table 3's multi-stage baselines: TAKD, RCO and SFTN (SPEC sec. 2).

TAKD (Mirzadeh et al., AAAI 2020) and SFTN (Park et al., NeurIPS 2021) are lists of ordinary runs
(``STAGED_METHODS``, run in order by ``stages.run_stages``); RCO (Jin et al., ICCV 2019) is one run whose
teacher walks along checkpoints of its own training. The losses here are SFTN's first stage and RCO's
anchor schedule; every other stage is plain KD.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import engine
import kd_core
import stages
from models.bert import BertForSequenceClassification
from models.cifar import ResNet
from .base import DistillConfig, Distiller
from .logit import KDDistiller

# TAKD: teacher -> assistant -> student, vanilla KD at each step. SFTN: the teacher trained with student
# branches, then vanilla KD from it into a fresh student.
STAGED_METHODS: dict[str, list[stages.Stage]] = {
    "takd": [stages.Stage("assistant", "kd", student="assistant"),
             stages.Stage("student", "kd", teacher_from="assistant")],
    "sftn": [stages.Stage("teacher", "sftn_teacher", trains="teacher"),
             stages.Stage("student", "kd", teacher_from="teacher")],
}


# ----------------------------------------------------------------------------------------------
# RCO
# ----------------------------------------------------------------------------------------------
def rco_anchor_index(epoch: int, epochs: int, anchors: int) -> int:
    """Equal-interval schedule: anchor ``k`` teaches epochs ``[k E / n, (k + 1) E / n)``."""
    return min(anchors - 1, epoch * anchors // epochs)


class RCODistiller(KDDistiller):
    """RCO (Jin et al., ICCV 2019, route constrained optimisation): ``alpha * KL_tau(a_k || s) +
    (1 - alpha) * CE(s, y)`` where ``a_k`` is the teacher at the k-th anchor of its own training route
    (``anchors_dir``, saved by its ce run with ``anchor_epochs``), the last anchor the converged teacher.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, feature_term=None) -> None:
        super().__init__(student, teacher, cfg, feature_term)
        if cfg.anchors_dir is None:
            raise ValueError("rco needs anchors_dir: the anchors/ folder of the teacher's ce run (trained with "
                             "--set anchor_epochs=[...])")
        converged = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
        self.route = [*checkpoints.load_anchors(cfg.anchors_dir), converged]
        self.anchor = len(self.route) - 1

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        if epochs < len(self.route):
            raise ValueError(f"rco switches anchors between epochs: {len(self.route)} anchors need at least as "
                             f"many epochs, got {epochs}")
        index = rco_anchor_index(epoch, epochs, len(self.route))
        if index != self.anchor:
            engine.unwrap(self.teacher).load_state_dict(self.route[index])
            self.anchor = index


# ----------------------------------------------------------------------------------------------
# SFTN, stage 1: the teacher with student branches
# ----------------------------------------------------------------------------------------------
class ResNetBranches(nn.Module):
    """Branch ``i``: teacher stage ``i``'s output -> bridge (1x1 conv, BN, ReLU) -> the student's stages
    ``i + 1 ..`` -> its classifier, for ``i = 1 .. S - 1`` (SFTN's CIFAR ResNets)."""

    def __init__(self, student: ResNet, teacher: ResNet) -> None:
        super().__init__()
        if len(student.stage_channels) != len(teacher.stage_channels):
            raise ValueError("sftn grafts student stages onto teacher stages: both need the same number of stages")
        pairs = list(zip(teacher.stage_channels[1:-1], student.stage_channels[1:-1]))
        self.bridges = nn.ModuleList(nn.Sequential(nn.Conv2d(t, s, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU())
                                     for t, s in pairs)

    def forward(self, student: ResNet, t_feats: dict) -> list[torch.Tensor]:
        stages = (student.layer1, student.layer2, student.layer3)
        logits = []
        for i, bridge in enumerate(self.bridges, start=1):
            x = bridge(t_feats["stages"][i])
            for layer in stages[i:]:
                for block in layer:
                    x, _ = block(x)
            logits.append(student.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return logits


class BertBranches(nn.Module):
    """Three layer groups: branch ``k`` (k = 1, 2) takes the teacher's hidden states after layer ``k N / 3``
    through a linear bridge (identity at the start when the widths match) into student layers ``k M / 3 ..``,
    its pooler and its classifier."""

    groups = 3

    def __init__(self, student: BertForSequenceClassification, teacher: BertForSequenceClassification) -> None:
        super().__init__()
        n, m = teacher.config.num_hidden_layers, student.config.num_hidden_layers
        if m < self.groups:
            raise ValueError(f"sftn grafts {self.groups} layer groups: the student needs at least {self.groups} "
                             f"layers, got {m}")
        self.cuts = [(k * n // self.groups, k * m // self.groups) for k in range(1, self.groups)]
        self.bridges = nn.ModuleList(nn.Linear(teacher.config.hidden_size, student.config.hidden_size)
                                     for _ in self.cuts)
        for bridge in self.bridges:
            if bridge.in_features == bridge.out_features:
                nn.init.eye_(bridge.weight)
                nn.init.zeros_(bridge.bias)

    def forward(self, student: BertForSequenceClassification, t_feats: dict) -> list[torch.Tensor]:
        attention = t_feats["attention_mask"]
        logits = []
        for (t_layer, s_layer), bridge in zip(self.cuts, self.bridges):
            x = bridge(t_feats["hidden_states"][t_layer])
            mask = (1.0 - attention[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in student.bert.encoder.layer[s_layer:]:
                x, _ = layer(x, mask)
            pooled = torch.tanh(student.bert.pooler.dense(x[:, 0]))
            logits.append(student._head(pooled, student.classifier, student.dropout)[1])
        return logits


def graft_branches(student: nn.Module, teacher: nn.Module) -> nn.Module:
    if isinstance(student, ResNet) and isinstance(teacher, ResNet):
        return ResNetBranches(student, teacher)
    if isinstance(student, BertForSequenceClassification) and isinstance(teacher, BertForSequenceClassification):
        return BertBranches(student, teacher)
    raise ValueError(f"sftn grafts student blocks onto ResNet or BERT teachers; got a {type(teacher).__name__} "
                     f"teacher and a {type(student).__name__} student")


def sftn_teacher_loss(t: torch.Tensor, branches: list[torch.Tensor], y: torch.Tensor, w_ce: float, w_kl: float,
                      tau: float) -> dict[str, torch.Tensor]:
    """SFTN eq. 3: ``CE(t, y) + w_ce sum_i CE(b_i, y) + w_kl sum_i KL_tau(b_i || t)``, gradients to both."""
    return {"teacher_ce": F.cross_entropy(t.float(), y),
            "branch_ce": w_ce * sum(F.cross_entropy(b.float(), y) for b in branches),
            "branch_kl": w_kl * sum(kd_core.kl_div(t, b, tau) for b in branches)}


class SFTNTeacherDistiller(Distiller):
    """SFTN's first stage (Park et al., NeurIPS 2021): the teacher learns with student branches on its
    stage outputs, ``L_T = CE(t, y) + 1 * sum_i CE(b_i, y) + 3 * sum_i KL_1(b_i || t)`` (lambda_T = 1,
    lambda_R^CE = 1, lambda_R^KL = 3, tau = 1); teacher (at teacher_lr), bridges and the student blocks the
    branches use (at lr) all train. The teacher is this stage's product; the student is discarded.
    """

    teacher_mode = "full"
    w_branch_ce, w_branch_kl, branch_tau = 1.0, 3.0, 1.0

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(student, teacher, cfg)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # The branches run student blocks outside the student's DDP wrapper, whose gradients would not sync.
            raise ValueError("sftn's teacher stage runs in one process; start it without torchrun")
        self.branches = graft_branches(student, teacher)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"branches": self.branches}

    def forward(self, x, y, index=None):
        t, t_feats = self.teacher(x, features=True)
        branch_logits = self.branches(engine.unwrap(self.student), t_feats)
        return t, sftn_teacher_loss(t, branch_logits, y, self.w_branch_ce, self.w_branch_kl, self.branch_tau)
