"""The one interface every distillation method implements (after mdistiller's ``Distiller``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn


CRD_NEGATIVES = ("other_class", "uniform")


@dataclass
class DistillConfig:
    """Loss weights and learning rates shared by the methods; every value comes from the run config."""
    alpha: float = 0.9          # weight of the KL term
    w_ce: float | None = None   # weight of the student's CE; None: 1 - alpha (the authors' code: gamma = 1)
    tau: float = 4.0            # KD temperature
    w_tce: float = 0.5          # weight of the teacher's own CE (FT-KD, PESF-KD)
    w_tkl: float | None = None  # weight of PESF-KD's student-to-teacher KL; None: alpha
    label_adjust: bool | None = None   # None: the method's default (on for ftkd / pesf)
    lr: float = 0.05            # student (and extra student-side modules)
    teacher_lr: float = 1e-3    # teachers trained in full (ftkd, dml, kdcl)
    adapter_lr: float = 1e-4    # teacher adapters (pesf)
    feat_weight: float | None = None   # beta of a feature term; None: the term's default
    init_epochs: int | None = None     # initialisation stage (fitnet/ab/ft/fsp); None: the method's default
    crd_negatives: str = "other_class"  # CRD's negatives: other_class (RepDistiller's default) | uniform
    anchors_dir: str | None = None     # rco: the anchors/ folder of the teacher's ce run
    backend: str = "auto"       # kd_core backend
    # The authors' code as switches (defaults: the paper's text; README "Fidelity switches").
    teacher_bn: str = "eval"          # train: a frozen teacher's BatchNorm uses and updates batch statistics
    student_target: str = "adapted"   # unadapted: the student's KL target is the teacher before its head adapter
    teacher_kl: str = "paper"         # official: the teacher learns from KL_tau(t || adj(s).detach()) (pesf, ftkd)
    teacher_params: str = "adapters"  # pesf, all: the whole teacher trains at adapter_lr (the authors' nlp/ code)

    def __post_init__(self) -> None:
        if self.crd_negatives not in CRD_NEGATIVES:
            raise ValueError(f"crd_negatives must be one of {', '.join(CRD_NEGATIVES)}, got {self.crd_negatives!r}")
        for name, valid in (("teacher_bn", ("eval", "train")), ("student_target", ("adapted", "unadapted")),
                            ("teacher_kl", ("paper", "official")), ("teacher_params", ("adapters", "all"))):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be {' or '.join(valid)}, got {getattr(self, name)!r}")

    @classmethod
    def from_run_config(cls, cfg) -> "DistillConfig":
        """Take the fields of this class from a script's run config; those it lacks keep their defaults
        (train_glue.py has no ``crd_negatives``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


class Distiller(nn.Module):
    """Owns a student, an optional teacher and any extra trainable modules of one method.

    ``forward(x, y, index)`` returns the student logits and a dict of named, already weighted
    losses whose sum is minimised. ``train()`` keeps frozen parts in eval mode. ``param_groups()``
    says which parameters are trained and at which base learning rate.
    """

    needs_teacher = True
    teacher_mode = "frozen"     # "frozen" | "adapters" | "full"

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher if self.needs_teacher else None
        self.cfg = cfg
        if self.teacher is not None:
            if self.teacher_mode == "frozen":
                self.teacher.requires_grad_(False)
            elif self.teacher_mode == "adapters":
                self.teacher.freeze_backbone(batch_stats=cfg.teacher_bn == "train")
                if cfg.teacher_params == "all":
                    # The authors' nlp/run_glue_distillation.py l. 91-92 meant to freeze the backbone, but
                    # ``p.required_grad = False`` only sets a new attribute: every teacher parameter trains in the
                    # adapters' group. The backbone keeps its eval mode (their teacher is never put in train()).
                    self.teacher.requires_grad_(True)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None and self.teacher_mode == "frozen":
            self.teacher.train(mode and self.cfg.teacher_bn == "train")
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        raise NotImplementedError

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each training epoch (also the first one after a resume); RCO switches anchors here."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable student-side modules besides the student (projection heads, embeddings)."""
        return {}

    def param_groups(self) -> list[dict]:
        groups = [{"name": "student", "params": list(self.student.parameters()), "lr": self.cfg.lr}]
        extra = [p for m in self.extra_modules().values() for p in m.parameters() if p.requires_grad]
        if extra:
            groups.append({"name": "extra", "params": extra, "lr": self.cfg.lr})
        if self.teacher is not None and self.teacher_mode == "full":
            groups.append({"name": "teacher", "params": list(self.teacher.parameters()), "lr": self.cfg.teacher_lr})
        if self.teacher is not None and self.teacher_mode == "adapters":
            groups.append({"name": "adapters", "params": [p for p in self.teacher.parameters() if p.requires_grad],
                           "lr": self.cfg.adapter_lr})
        return [g for g in groups if g["params"]]

    def trainable_module_names(self) -> list[str]:
        """Direct children that hold trained parameters (those are what DDP wraps)."""
        names = ["student", *self.extra_modules()]
        if self.teacher is not None and self.teacher_mode != "frozen":
            names.append("teacher")
        return names

    def updated_params(self) -> int:
        """Number of parameters the optimiser updates (the paper's "params" column)."""
        return sum(p.numel() for g in self.param_groups() for p in g["params"] if p.requires_grad)

    def use_label_adjust(self, default: bool) -> bool:
        return default if self.cfg.label_adjust is None else self.cfg.label_adjust

    def ce_weight(self) -> float:
        """The student's CE weight: ``w_ce``, or ``1 - alpha`` (the paper's eq. 4) when unset."""
        return 1 - self.cfg.alpha if self.cfg.w_ce is None else self.cfg.w_ce

    def teacher_kl_weight(self) -> float:
        """The weight of a trained teacher's KL towards the student: ``w_tkl``, or alpha when unset."""
        return self.cfg.alpha if self.cfg.w_tkl is None else self.cfg.w_tkl
