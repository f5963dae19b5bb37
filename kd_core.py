"""kd_core: the distillation core of pesf-kd, in one self-contained file.

Copy this file alone into another project: it needs only ``torch`` (``triton`` is optional and
only used for CUDA tensors). It implements the soft-label quantities of "Exploring the capacity
mismatch problem in knowledge distillation from the view of soft labels" (PESF-KD / FT-KD):

- ``kl_div``           tau^2 * KL(p^tau(target) || p^tau(learner)), batchmean, fp32 math (eq. 1)
- ``sharpness``        logsumexp of the raw logits per row (eq. 2)
- ``sharpness_gap``    logsumexp(teacher) - logsumexp(student) per row (eq. 3)
- ``label_adjust``     swap the argmax logit with the label's logit where they differ (sec. 3.1)
- ``distill_terms``    every logit-level loss term of a teacher/student pair in one call
- ``ConsistencyMeter`` agreement, KL, probability loyalty, gap and linear CKA over a data set
- ``Adapter``, ``LoRALinear``, ``ParallelAdapter``: the parameter-efficient teacher modules (sec. 3.2)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DistillTerms", "distill_terms", "kl_div", "label_adjust", "sharpness", "sharpness_gap",
    "agreement", "probability_loyalty", "linear_cka", "ConsistencyMeter",
    "Adapter", "LoRALinear", "ParallelAdapter", "triton_available",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Input checks: bad input is a ValueError naming the argument and the shapes, never a device-side
# assert or a silent broadcast.
# ----------------------------------------------------------------------------------------------
def _check_logits(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32/bf16/fp16/fp64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")


def _check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    _check_logits(a_name, a)
    _check_logits(b_name, b)
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def _check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _skip_value_checks() -> bool:
    # Checking label values reads them on the host; that is impossible while a CUDA graph is
    # being captured and would break a torch.compile graph, so those callers get shape checks only.
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_labels(labels: torch.Tensor, n: int, k: int, ignore_index: int, logits_shape) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                    torch.int8, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got "
                         f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] to match logits {tuple(logits_shape)}, "
                         f"got {tuple(labels.shape)}")
    if _skip_value_checks() or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= k)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels must lie in [0, {k}) or equal ignore_index={ignore_index}; "
                         f"found {first} (logits shape {tuple(logits_shape)})")


# ----------------------------------------------------------------------------------------------
# Elementary quantities
# ----------------------------------------------------------------------------------------------
def label_adjust(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Swap ``logits[i, argmax_i]`` and ``logits[i, y_i]`` in every row whose argmax is not its label.

    PESF-KD sec. 3.1 ("label adjustment"): the adjusted distribution always ranks the true class
    first. Out of place; the gradient is the permutation applied back. Rows with
    ``labels == ignore_index`` are returned unchanged. Ties resolve like ``torch.argmax``.
    """
    _check_logits("logits", logits)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index, logits.shape)
    labels = labels.long()
    top = logits.argmax(dim=1)
    # Ignored rows "swap" the argmax with itself, which is the identity.
    target = torch.where(labels == ignore_index, top, labels)[:, None]
    top = top[:, None]
    at_label = logits.gather(1, target)
    at_top = logits.gather(1, top)
    return logits.scatter(1, top, at_label).scatter(1, target, at_top)


def sharpness(logits: torch.Tensor) -> torch.Tensor:
    """Per-row sharpness ``logsumexp(z)`` of raw logits (PESF-KD eq. 2), fp32, numerically stable."""
    _check_logits("logits", logits)
    return torch.logsumexp(logits.float(), dim=1)


def sharpness_gap(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row sharpness gap ``logsumexp(t) - logsumexp(s)`` (PESF-KD eq. 3); take ``.mean()`` for the batch value."""
    _check_pair("teacher_logits", teacher_logits, "student_logits", student_logits)
    return sharpness(teacher_logits) - sharpness(student_logits)


def kl_div(target_logits: torch.Tensor, learner_logits: torch.Tensor, tau: float = 1.0,
           reduction: str = "batchmean") -> torch.Tensor:
    """Temperature KL of Hinton et al. (2015), PESF-KD eq. 1.

    ``tau^2 * sum_k p_k(target) * (log p_k(target) - log p_k(learner))`` with ``p = softmax(z / tau)``,
    computed in float32 whatever the input dtype. Gradients reach both arguments unless the caller
    detaches one. ``reduction``: ``"batchmean"`` (default), ``"sum"`` or ``"none"`` (per row).
    """
    _check_pair("target_logits", target_logits, "learner_logits", learner_logits)
    _check_tau(tau)
    log_q = F.log_softmax(target_logits.float() / tau, dim=1)
    log_p = F.log_softmax(learner_logits.float() / tau, dim=1)
    per_row = (log_q.exp() * (log_q - log_p)).sum(dim=1) * (tau * tau)
    return _reduce(per_row, reduction, per_row.shape[0], "batchmean")


def _reduce(per_row: torch.Tensor, reduction: str, count, mean_name: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == mean_name:
        return per_row.sum() / count
    raise ValueError(f"reduction must be '{mean_name}', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# distill_terms: every logit-level term of a teacher/student pair
# ----------------------------------------------------------------------------------------------
class DistillTerms(NamedTuple):
    """The logit-level terms of one teacher/student batch (scalars, or per row with reduction="none").

    kl_ts: tau^2 KL(p^tau(adj(t)) || p^tau(s)), target = label-adjusted teacher, learner = student
    kl_st: tau^2 KL(p^tau(adj(s)) || p^tau(t)), target = label-adjusted student, learner = teacher
    ce_s, ce_t: cross-entropy of the raw (tau = 1) student / teacher logits with the labels
    lse_s, lse_t: sharpness logsumexp(s), logsumexp(t) at tau = 1
    gap: lse_t - lse_s
    """
    kl_ts: torch.Tensor
    kl_st: torch.Tensor
    ce_s: torch.Tensor
    ce_t: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    gap: torch.Tensor


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                  tau: float = 4.0, adjust: bool = True, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", backend: str = "auto",
                  detach_targets: bool = False) -> DistillTerms:
    """All logit-level terms of SPEC sec. 1 in one call; every method of SPEC sec. 2 is a weighted sum.

    Rows with ``labels == ignore_index`` contribute nothing: their per-row values and gradients are
    zero and ``reduction="mean"`` divides by the number of other rows (0 when there are none).
    ``adjust`` applies label adjustment to each KL term's target. With ``detach_targets`` the KL
    terms send gradients to their learner only (``kl_ts`` to the student, ``kl_st`` to the teacher),
    as DML and PESF-KD need; otherwise both sides receive gradients (FT-KD). ``backend``:
    ``"torch"``, ``"triton"`` (CUDA tensors) or ``"auto"`` (Triton for CUDA tensors when it imports).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_labels(labels, student_logits.shape[0], student_logits.shape[1], ignore_index, student_logits.shape)
    _check_tau(tau)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and student_logits.is_cuda and triton_available())
    if use_triton:
        return _distill_terms_triton(student_logits, teacher_logits, labels, float(tau), adjust,
                                     ignore_index, reduction, detach_targets)
    return _distill_terms_torch(student_logits, teacher_logits, labels, float(tau), adjust,
                                ignore_index, reduction, detach_targets)


def _distill_terms_torch(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, tau: float, adjust: bool,
                         ignore_index: int, reduction: str, detach_targets: bool) -> DistillTerms:
    """The PyTorch reference path: same semantics as the kernel, eager ops, fp32 math."""
    s32, t32 = s.float(), t.float()
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]

    t_target = label_adjust(t32, labels, ignore_index) if adjust else t32
    s_target = label_adjust(s32, labels, ignore_index) if adjust else s32
    if detach_targets:
        t_target, s_target = t_target.detach(), s_target.detach()
    kl_ts = kl_div(t_target, s32, tau, reduction="none")
    kl_st = kl_div(s_target, t32, tau, reduction="none")

    lse_s = torch.logsumexp(s32, dim=1)
    lse_t = torch.logsumexp(t32, dim=1)
    ce_s = lse_s - s32.gather(1, safe).squeeze(1)
    ce_t = lse_t - t32.gather(1, safe).squeeze(1)

    zero = torch.zeros((), dtype=torch.float32, device=s.device)
    rows = [torch.where(valid, x, zero) for x in (kl_ts, kl_st, ce_s, ce_t, lse_s, lse_t)]
    rows.append(rows[5] - rows[4])
    if reduction != "none":
        count = valid.sum().clamp(min=1)
        rows = [_reduce(x, reduction, count, "mean") for x in rows]
    return DistillTerms(*rows)


def triton_available() -> bool:
    """True when the fused Triton kernel can be used (``triton`` imports)."""
    return _triton_kernels() is not None


_TRITON = None


def _triton_kernels():
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            _TRITON = False  # the kernel family is added by the fused-kernel work
        except ImportError:
            _TRITON = False
    return _TRITON or None


def _distill_terms_triton(s, t, labels, tau, adjust, ignore_index, reduction, detach_targets) -> DistillTerms:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package and its fused kernel; "
                           "use backend='torch' or 'auto'")
    raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Consistency metrics (appendix A.3)
# ----------------------------------------------------------------------------------------------
def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement: percentage of rows where argmax(s) == argmax(t)."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean() * 100.0


def _loyalty_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(teacher_logits.double(), dim=1)
    log_q = F.log_softmax(student_logits.double(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = torch.xlogy(log_p.exp(), log_p.exp()).sum(1) - (log_p.exp() * log_m).sum(1)
    kl_qm = torch.xlogy(log_q.exp(), log_q.exp()).sum(1) - (log_q.exp() * log_m).sum(1)
    jsd_bits = (0.5 * (kl_pm + kl_qm) / math.log(2.0)).clamp(0.0, 1.0)
    return 1.0 - jsd_bits.sqrt()


def probability_loyalty(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Probability loyalty of Xu et al. (2021): mean over rows of ``1 - sqrt(JSD(p_t || p_s))``, JSD in bits."""
    _check_pair("teacher_logits", teacher_logits, "student_logits", student_logits)
    return _loyalty_rows(teacher_logits, student_logits).mean()


class _CKAStats:
    """Float64 sums that give the linear CKA of two feature sets without holding them (Kornblith 2019)."""

    def __init__(self) -> None:
        self.n = 0.0
        self.sx = self.sy = self.xx = self.yy = self.yx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().flatten(1).double(), y.detach().flatten(1).double()
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.xx, self.yy, self.yx = x.T @ x, y.T @ y, y.T @ x
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.xx += x.T @ x
            self.yy += y.T @ y
            self.yx += y.T @ x
        self.n += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.sx, self.sy, self.xx, self.yy, self.yx]

    def value(self) -> float:
        if self.sx is None or self.n < 2:
            return float("nan")
        n = self.n
        # Centred Gram matrices: X_c^T X_c = X^T X - n * mean_x mean_x^T.
        cxx = self.xx - torch.outer(self.sx, self.sx) / n
        cyy = self.yy - torch.outer(self.sy, self.sy) / n
        cyx = self.yx - torch.outer(self.sy, self.sx) / n
        denom = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
        if denom == 0:
            return float("nan")
        return float((cyx.pow(2).sum() / denom).item())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices ``[N, d1]`` and ``[N, d2]`` (Kornblith et al. 2019), in float64.

    ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F * ||Y_c^T Y_c||_F)`` with column-centred ``X_c``, ``Y_c``.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {tuple(x.shape)} and {tuple(y.shape)}")
    stats = _CKAStats()
    stats.update(x, y)
    return stats.value()


class ConsistencyMeter:
    """Teacher/student consistency over a whole evaluation set (PESF-KD appendix A.3).

    ``update()`` per batch; ``compute()`` returns ``kl`` (tau = 1, KL(t || s)), ``gap``, ``agreement``
    (%), ``pl`` (probability loyalty), ``cka_logits`` and ``cka_features``. Sums are accumulated in
    float64 and all-reduced across ranks when ``torch.distributed`` is initialised.
    """

    def __init__(self) -> None:
        self.rows = 0.0
        self.kl = self.gap = self.agree = self.pl = 0.0
        self._cka_logits = _CKAStats()
        self._cka_features = _CKAStats()

    @torch.no_grad()
    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               student_features: torch.Tensor | None = None,
               teacher_features: torch.Tensor | None = None) -> None:
        _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
        s, t = student_logits.detach(), teacher_logits.detach()
        self.rows += s.shape[0]
        self.kl += float(kl_div(t, s, 1.0, reduction="sum"))
        self.gap += float(sharpness_gap(t, s).double().sum())
        self.agree += float((s.argmax(1) == t.argmax(1)).sum())
        self.pl += float(_loyalty_rows(t, s).sum())
        self._cka_logits.update(s, t)
        if student_features is not None and teacher_features is not None:
            self._cka_features.update(student_features, teacher_features)

    def compute(self) -> dict[str, float]:
        scalars = [self.rows, self.kl, self.gap, self.agree, self.pl]
        stats = [self._cka_logits, self._cka_features]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            scalars, stats = self._all_reduce(scalars, stats)
        rows, kl, gap, agree, pl = scalars
        n = max(rows, 1.0)
        return {"kl": kl / n, "gap": gap / n, "agreement": 100.0 * agree / n, "pl": pl / n,
                "cka_logits": stats[0].value(), "cka_features": stats[1].value()}

    @staticmethod
    def _all_reduce(scalars: list[float], stats: list[_CKAStats]):
        import torch.distributed as dist
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        device = torch.device(backend_device, torch.cuda.current_device()) if backend_device == "cuda" else "cpu"
        packed = torch.tensor(scalars, dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        reduced = []
        for st in stats:
            has = torch.tensor([0.0 if st.sx is None else 1.0], dtype=torch.float64, device=device)
            dist.all_reduce(has, op=dist.ReduceOp.MIN)
            out = _CKAStats()
            if has.item() == 1.0:
                parts = [p.to(device) for p in st.tensors()] + [torch.tensor([st.n], dtype=torch.float64,
                                                                             device=device)]
                for p in parts:
                    dist.all_reduce(p)
                out.sx, out.sy, out.xx, out.yy, out.yx = (p.cpu() for p in parts[:5])
                out.n = float(parts[5].item())
            reduced.append(out)
        return packed.tolist(), reduced


# ----------------------------------------------------------------------------------------------
# Adapters (PESF-KD sec. 3.2, Table 14). Each starts as the identity on the teacher it adapts.
# ----------------------------------------------------------------------------------------------
def _projection(in_dim: int, out_dim: int, conv: bool) -> nn.Module:
    return nn.Conv2d(in_dim, out_dim, kernel_size=1) if conv else nn.Linear(in_dim, out_dim)


class Adapter(nn.Module):
    """Houlsby et al. (2019) bottleneck adapter: ``h + f(h W_down) W_up`` with ``f = ReLU``.

    ``W_up`` and its bias start at zero, so the adapted teacher starts identical to the pretrained
    one; the same computation runs in training and evaluation. ``conv=True`` applies it to the
    channels of an ``[N, C, H, W]`` map with 1x1 convolutions (the CNN ``stages`` slot).
    """

    def __init__(self, dim: int, bottleneck: int = 32, conv: bool = False) -> None:
        super().__init__()
        self.down = _projection(dim, bottleneck, conv)
        self.up = _projection(bottleneck, dim, conv)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(h)))


class ParallelAdapter(nn.Module):
    """Scaled parallel adapter of He et al. (2022): ``sublayer(x) + s * f(x W_down) W_up``.

    Wraps ``sublayer`` (whose input has ``in_dim`` features and output ``out_dim``); with
    ``sublayer=None`` it runs parallel to the identity (``in_dim == out_dim``). Zero-initialised
    ``W_up``, so it starts as the sublayer.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, bottleneck: int = 32, scale: float = 4.0,
                 sublayer: nn.Module | None = None, conv: bool = False) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        if sublayer is None and out_dim != in_dim:
            raise ValueError(f"without a sublayer in_dim and out_dim must match, got {in_dim} and {out_dim}")
        self.sublayer = sublayer if sublayer is not None else nn.Identity()
        self.scale = scale
        self.down = _projection(in_dim, bottleneck, conv)
        self.up = _projection(bottleneck, out_dim, conv)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sublayer(x) + self.scale * self.up(F.relu(self.down(x)))


class LoRALinear(nn.Module):
    """LoRA of Hu et al. (2022): ``base(x) + (alpha / r) * x A^T B^T`` with ``B`` zero-initialised.

    Wraps an existing ``nn.Linear``; only ``A`` and ``B`` are meant to be trained (the model's
    ``freeze_backbone`` freezes ``base``).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling
