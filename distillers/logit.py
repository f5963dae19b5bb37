"""Logit-level methods of the paper's comparisons (SPEC sec. 2): ce, kd, ftkd, pesf, dml, kdcl.

Each loss is a weighted sum of ``kd_core.distill_terms`` fields plus detach choices.
``kd`` and ``pesf`` accept an optional feature term (``kd+NAME``, ``pesf+NAME``): an extra
``beta * L_feat`` on the student, computed from both networks' features. ``FeatureDistiller`` runs a
feature term on its own (``--method NAME``): ``CE + beta * L_feat``, no KL.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kd_core
from .base import DistillConfig, Distiller


class FeatureTerm(nn.Module):
    """An extra student-side loss on features; ``forward`` returns the unweighted loss.

    Subclasses set ``default_weight`` (beta) and may own trainable modules (projection heads),
    which are trained with the student at its learning rate.
    """

    default_weight = 1.0
    main_stage = True   # False: the term acts only through its initialisation stage (no loss, no features)

    def forward(self, s_feats: dict, t_feats: dict, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def bind_train_labels(self, labels: torch.Tensor) -> None:
        """The training set's labels in index order; terms that sample by class (CRD) keep them."""


class CEDistiller(Distiller):
    """Training from scratch (also how teachers are made): ``L = CE(s, y)``."""

    needs_teacher = False

    def forward(self, x, y, index=None):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits.float(), y)}


class _WithFeatureTerm(Distiller):
    def __init__(self, student, teacher, cfg: DistillConfig, feature_term: FeatureTerm | None = None) -> None:
        super().__init__(student, teacher, cfg)
        self.feature_term = feature_term

    def extra_modules(self) -> dict[str, nn.Module]:
        has_params = self.feature_term is not None and any(True for _ in self.feature_term.parameters())
        return {"feature_term": self.feature_term} if has_params else {}

    def _term(self) -> FeatureTerm | None:
        """The feature term when it adds a loss to this stage (under DDP, the wrapped module)."""
        term = self.feature_term
        term = term.module if isinstance(term, nn.parallel.DistributedDataParallel) else term
        return term if term is not None and term.main_stage else None

    def _students_and_teachers(self, x, teacher_grad: bool, teacher_features: bool = False):
        """Both forwards; features when a feature term needs them (the teacher's also on request)."""
        want = self._term() is not None
        with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
            t_out = self.teacher(x, features=True) if want or teacher_features else (self.teacher(x), None)
        s_out = self.student(x, features=True) if want else (self.student(x), None)
        return s_out[0], t_out[0], s_out[1], t_out[1]

    def _add_feature_term(self, losses: dict, s_feats, t_feats, y, index) -> None:
        term = self._term()
        if term is None:
            return
        t_feats = {k: _detach(v) for k, v in t_feats.items()}
        beta = self.cfg.feat_weight if self.cfg.feat_weight is not None else term.default_weight
        losses["feat"] = beta * self.feature_term(s_feats, t_feats, y, index)


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(u) for u in v)
    return v


class FeatureDistiller(_WithFeatureTerm):
    """A feature method on its own, as RepDistiller runs it (``-a 0``, Tian et al. 2020):
    ``CE(s, y) + beta * L_feat(s, t)``, teacher frozen, no KL term; the betas were tuned for this objective.
    """

    def forward(self, x, y, index=None):
        s, _, s_feats, t_feats = self._students_and_teachers(x, teacher_grad=False)
        losses = {"ce": F.cross_entropy(s.to(torch.promote_types(s.dtype, torch.float32)), y)}   # fp64 stays fp64
        self._add_feature_term(losses, s_feats, t_feats, y, index)
        return s, losses


class KDDistiller(_WithFeatureTerm):
    """Hinton et al. (2015): ``alpha * KL_tau(t || s) + w_ce * CE(s, y)`` (``w_ce`` = 1 - alpha unless set),
    teacher frozen."""

    def forward(self, x, y, index=None):
        s, t, s_feats, t_feats = self._students_and_teachers(x, teacher_grad=False)
        terms = kd_core.distill_terms(s, t, y, self.cfg.tau, adjust=self.use_label_adjust(False),
                                      detach_targets=True, backend=self.cfg.backend)
        losses = {"kl": self.cfg.alpha * terms.kl_ts, "ce": self.ce_weight() * terms.ce_s}
        self._add_feature_term(losses, s_feats, t_feats, y, index)
        return s, losses


class FTKDDistiller(Distiller):
    """FT-KD (PESF-KD sec. 3.1): the whole teacher trains with the student.

    ``teacher_kl=paper`` (the paper's text): ``L_s = alpha * KL_tau(adj(t) || s) + w_ce * CE(s, y)`` with the
    teacher NOT detached in the KL term, and ``L_t = w_tce * CE(t, y)``; no student-to-teacher KL term.
    ``teacher_kl=official`` (the authors' cv/helper/loops.py, lines 133-139 and 167): the student's target
    passes through numpy, so its KL sends the teacher no gradient; the teacher learns from
    ``w_tkl * KL_tau(t || adj(s).detach()) + w_tce * CE(t, y)`` (``w_tkl`` defaults to alpha).
    """

    teacher_mode = "full"

    def forward(self, x, y, index=None):
        t = self.teacher(x)
        s = self.student(x)
        official = self.cfg.teacher_kl == "official"
        adjust = self.use_label_adjust(True)
        terms = kd_core.distill_terms(s, t, y, self.cfg.tau, adjust=adjust, detach_targets=official,
                                      backend=self.cfg.backend)
        losses = {"kl": self.cfg.alpha * terms.kl_ts, "ce": self.ce_weight() * terms.ce_s,
                  "teacher_ce": self.cfg.w_tce * terms.ce_t}
        if official:
            student_target = (kd_core.label_adjust(s, y) if adjust else s).detach()
            losses["teacher_kl"] = self.teacher_kl_weight() * kd_core.kl_div(student_target, t, self.cfg.tau)
        return s, losses


class PESFDistiller(_WithFeatureTerm):
    """PESF-KD (sec. 3.2): a frozen teacher whose adapters learn from the labels and the student.

    ``L_s = alpha * KL_tau(adj(t).detach() || s) + w_ce * CE(s, y)`` (``w_ce`` = 1 - alpha unless set),
    ``L_t = w_tkl * KL_tau(adj(s).detach() || t) + w_tce * CE(t, y)`` (``w_tkl`` defaults to alpha);
    only the adapters are updated. The authors' code (cv/helper/loops.py) differs in two switches:
    ``student_target=unadapted`` puts the teacher's logits before its head adapter in the student's KL;
    ``teacher_kl=official`` uses ``KL_tau(t || adj(s).detach())`` (the adapted teacher is the target).
    """

    teacher_mode = "adapters"

    def __init__(self, student, teacher, cfg: DistillConfig, feature_term: FeatureTerm | None = None) -> None:
        super().__init__(student, teacher, cfg, feature_term)
        if cfg.student_target == "unadapted" and getattr(teacher, "adapters", None) is not None:
            raise ValueError("student_target=unadapted needs the head adapter slot (adapter_slot: head)")

    def forward(self, x, y, index=None):
        unadapted = self.cfg.student_target == "unadapted"
        s, t, s_feats, t_feats = self._students_and_teachers(x, teacher_grad=True, teacher_features=unadapted)
        adjust, tau = self.use_label_adjust(True), self.cfg.tau
        terms = kd_core.distill_terms(s, t_feats["logits_unadapted"] if unadapted else t, y, tau, adjust=adjust,
                                      detach_targets=True, backend=self.cfg.backend)
        teacher_terms = kd_core.distill_terms(s, t, y, tau, adjust=adjust, detach_targets=True,
                                              backend=self.cfg.backend) if unadapted else terms
        if self.cfg.teacher_kl == "official":
            teacher_kl = kd_core.kl_div((kd_core.label_adjust(s, y) if adjust else s).detach(), t, tau)
        else:
            teacher_kl = teacher_terms.kl_st
        losses = {"kl": self.cfg.alpha * terms.kl_ts, "ce": self.ce_weight() * terms.ce_s,
                  "teacher_kl": self.teacher_kl_weight() * teacher_kl,
                  "teacher_ce": self.cfg.w_tce * teacher_terms.ce_t}
        self._add_feature_term(losses, s_feats, t_feats, y, index)
        return s, losses


class DMLDistiller(Distiller):
    """Deep mutual learning (Zhang et al. 2018), teacher starting from its checkpoint.

    ``L_s = CE(s, y) + KL_1(t.detach() || s)``, ``L_t = CE(t, y) + KL_1(s.detach() || t)``.
    """

    teacher_mode = "full"

    def forward(self, x, y, index=None):
        t = self.teacher(x)
        s = self.student(x)
        terms = kd_core.distill_terms(s, t, y, 1.0, adjust=self.use_label_adjust(False),
                                      detach_targets=True, backend=self.cfg.backend)
        return s, {"ce": terms.ce_s, "kl": terms.kl_ts, "teacher_ce": terms.ce_t, "teacher_kl": terms.kl_st}


def min_logit_ensemble(logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """KDCL's MinLogit ensemble (Guo et al. 2020): per class, the minimum over networks of ``z - z_y``."""
    shifted = [z.float() - z.float().gather(1, y[:, None]) for z in logits]
    return torch.stack(shifted).amin(dim=0)


class KDCLDistiller(Distiller):
    """KDCL (Guo et al. 2020), MinLogit: ``CE + KL_tau(e || net)`` for both networks, ``e`` detached."""

    teacher_mode = "full"

    def forward(self, x, y, index=None):
        t = self.teacher(x)
        s = self.student(x)
        e = min_logit_ensemble([s.detach(), t.detach()], y)
        tau = self.cfg.tau
        return s, {"ce": F.cross_entropy(s.float(), y), "kl": kd_core.kl_div(s, e, tau),
                   "teacher_ce": F.cross_entropy(t.float(), y), "teacher_kl": kd_core.kl_div(t, e, tau)}
