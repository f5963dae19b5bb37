"""kd_core: the distillation core of pesf-kd, in one self-contained file.

Copy this file alone into another project: it needs only ``torch`` (``triton`` is optional and
only used for CUDA tensors). It implements the soft-label quantities of "Exploring the capacity
mismatch problem in knowledge distillation from the view of soft labels" (PESF-KD / FT-KD), at
classifier and at language-model scale. Every function takes the student first, then the teacher.

Part 1, the public API:
- ``label_adjust``     swap the argmax logit with the label's logit where they differ (sec. 3.1)
- ``sharpness``        logsumexp of the raw logits per row (eq. 2)
- ``sharpness_gap``    logsumexp(teacher) - logsumexp(student) per row (eq. 3)
- ``kl_div``           tau^2 * KL(p^tau(teacher) || p^tau(student)), batchmean, fp32 math (eq. 1)
- ``distill_terms``    every logit-level loss term of a teacher/student pair in one call
                       ([N, K] or [B, S, K] logits, forward/reverse KL or generalised JSD)
- ``distill_loss``     a weighted sum of those terms, gradients computed in the forward pass
- ``distill_linear``   the same loss from hidden states and LM heads, chunk by chunk: the
                       [N, V] logits of a language model never exist
- ``ConsistencyMeter`` agreement, KL, probability loyalty, gap and linear CKA over a data set
- ``Adapter``, ``LoRALinear``, ``ParallelAdapter``: the parameter-efficient teacher modules (sec. 3.2)

Part 2, the internals: input checks, the PyTorch math, the fused Triton kernels (defined when
triton imports), their launchers and autograd glue, and distill_linear's chunk loop. For CUDA
tensors ``distill_terms``, ``distill_loss`` and ``distill_linear`` run the fused kernel (one read of
both logit matrices forward, one read and one write of each backward); elsewhere, or with
``backend="torch"``, the PyTorch path computes the same values.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "label_adjust", "sharpness", "sharpness_gap", "kl_div", "DistillTerms", "distill_terms", "distill_loss",
    "distill_linear", "agreement", "probability_loyalty", "linear_cka", "ConsistencyMeter",
    "Adapter", "LoRALinear", "ParallelAdapter", "triton_available",
]

IGNORE_INDEX = -100
_FIELDS = ("kl_ts", "kl_st", "ce_s", "ce_t", "lse_s", "lse_t", "gap")   # DistillTerms' fields


# ==============================================================================================
# Part 1: the public API
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Soft-label quantities (PESF-KD eqs. 1-3, sec. 3.1)
# ----------------------------------------------------------------------------------------------
def label_adjust(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Swap ``logits[i, argmax_i]`` and ``logits[i, y_i]`` in every row whose argmax is not its label.

    PESF-KD sec. 3.1 ("label adjustment"): the adjusted distribution always ranks the true class
    first. Out of place; the gradient is the permutation applied back. Rows with
    ``labels == ignore_index`` are returned unchanged. Ties resolve like ``torch.argmax``.
    """
    _check_logits("logits", logits)
    _check_labels(labels, logits.shape[0], logits.shape[1], ignore_index, logits.shape)
    return _label_adjust(logits, labels, ignore_index)


def sharpness(logits: torch.Tensor) -> torch.Tensor:
    """Per-row sharpness ``logsumexp(z)`` of raw logits (PESF-KD eq. 2), fp32, numerically stable."""
    _check_logits("logits", logits)
    return torch.logsumexp(_math(logits), dim=1)


def sharpness_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-row sharpness gap ``logsumexp(t) - logsumexp(s)`` (PESF-KD eq. 3); take ``.mean()`` for the batch value."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    return sharpness(teacher_logits) - sharpness(student_logits)


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
           reduction: str = "batchmean") -> torch.Tensor:
    """Temperature KL of Hinton et al. (2015), PESF-KD eq. 1: the student (first) learns from the teacher.

    ``tau^2 * sum_k p_k(t) * (log p_k(t) - log p_k(s))`` with ``p = softmax(z / tau)``, computed in
    float32 whatever the input dtype; for KL(s || t) (the teacher learning from the student) swap the
    arguments. Gradients reach both arguments unless the caller detaches one. ``reduction``:
    ``"batchmean"`` (default), ``"sum"`` or ``"none"`` (per row).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_tau(tau)
    per_row = _divergence_rows(_math(teacher_logits), _math(student_logits), tau, "forward", 0.5)
    return _reduce(per_row, reduction, per_row.shape[0], "batchmean")


# ----------------------------------------------------------------------------------------------
# Every logit-level term of a teacher/student pair, and their weighted loss
# ----------------------------------------------------------------------------------------------
class DistillTerms(NamedTuple):
    """The logit-level terms of one teacher/student batch (scalars, or per row with reduction="none").

    kl_ts: tau^2 D(p^tau(adj(t)), p^tau(s)), target = (label-adjusted) teacher, learner = student
    kl_st: tau^2 D(p^tau(adj(s)), p^tau(t)), target = (label-adjusted) student, learner = teacher
    (D = KL(target || learner) for divergence="forward", KL(learner || target) for "reverse", the
    generalised JSD of GKD for "jsd")
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


def distill_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                  tau: float = 4.0, adjust: bool = False, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean", backend: str = "auto", detach_targets: bool = False, *,
                  mask: torch.Tensor | None = None, divergence: str = "forward",
                  beta: float = 0.5) -> DistillTerms:
    """All logit-level terms of SPEC sec. 1 in one call; every method of SPEC sec. 2 is a weighted sum.

    Logits are ``[N, K]`` or ``[B, S, K]`` (labels ``[N]`` / ``[B, S]``, per-row results in that
    shape). Rows with ``labels == ignore_index`` (or ``mask`` False) contribute nothing: their
    per-row values and gradients are zero and ``reduction="mean"`` divides by the number of other
    rows (0 when there are none). Without ``labels`` (pure distillation) ``ce_s``/``ce_t`` are 0.
    ``adjust`` applies label adjustment to each KL term's target. With ``detach_targets`` the KL
    terms send gradients to their learner only (``kl_ts`` to the student, ``kl_st`` to the teacher),
    as DML and PESF-KD need; otherwise both sides receive gradients (FT-KD). ``divergence``:
    ``"forward"`` (KL(target || learner)), ``"reverse"`` or ``"jsd"`` (with ``beta``); the fused
    kernel implements ``"forward"``, the others always take the PyTorch path. ``backend``:
    ``"torch"``, ``"triton"`` (CUDA tensors) or ``"auto"`` (Triton for CUDA tensors when it imports).
    """
    batch = _batch(student_logits, teacher_logits, labels, mask, ignore_index, adjust, tau)
    _check_options(divergence, beta, reduction, backend)
    if divergence == "forward" and (backend == "triton" or (backend == "auto" and _auto_uses_kernel(batch.s))):
        terms = _distill_terms_triton(batch.s, batch.t, batch.labels, float(tau), adjust, ignore_index,
                                      reduction, detach_targets, strict=backend == "triton")
    else:
        terms = _distill_terms_torch(batch.s, batch.t, batch.labels, float(tau), adjust, ignore_index,
                                     reduction, detach_targets, divergence, beta)
    return _shape_terms(terms, batch, reduction)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                 tau: float, weights: dict[str, float], adjust: bool = False, detach_targets: bool = False,
                 ignore_index: int = IGNORE_INDEX, backend: str = "auto", reduction: str = "mean", *,
                 mask: torch.Tensor | None = None, divergence: str = "forward",
                 beta: float = 0.5) -> tuple[torch.Tensor, DistillTerms]:
    """Weighted loss ``sum_f weights[f] * distill_terms(...).f`` and the terms (detached, for logging).

    ``weights``: keys among ``DistillTerms._fields`` (usually kl_ts, kl_st, ce_s, ce_t), missing = 0.
    With the Triton backend this is the gradient-in-forward mode: the forward also writes both
    gradients (four passes over the logits instead of six) into fresh buffers, and the backward only
    scales them by the incoming gradient. With ``backend="torch"`` the same loss is built from the
    reference path, computing only the weighted terms (the others are reported as NaN), so training
    code can call this function on any device. ``reduction``: "mean" over the non-ignored rows
    (default), "sum", or "none" (the weighted loss per row, in the logits' leading shape; the
    two-kernel path on the Triton backend). Logits, ``labels``, ``mask``, ``divergence`` and ``beta``
    as in ``distill_terms``.
    """
    batch = _batch(student_logits, teacher_logits, labels, mask, ignore_index, adjust, tau)
    _check_options(divergence, beta, reduction, backend)
    unknown = set(weights) - set(_FIELDS)
    if unknown:
        raise ValueError(f"weights keys must be among {_FIELDS}, got {sorted(unknown)}")
    if not batch.has_labels and any(weights.get(f, 0.0) for f in ("ce_s", "ce_t")):
        raise ValueError("weights on ce_s / ce_t need labels")
    w = [float(weights.get(f, 0.0)) for f in _FIELDS]
    s, t, y = batch.s, batch.t, batch.labels
    use_kernel = divergence == "forward" and (backend == "triton" or (backend == "auto" and _auto_uses_kernel(s)))
    if not use_kernel or torch.compiler.is_compiling() or reduction == "none":
        # torch.compile and per-row losses: the two-kernel path (its backward kernel takes the
        # incoming gradient as an input).
        terms = _distill_terms_triton(s, t, y, float(tau), adjust, ignore_index, reduction, detach_targets,
                                      strict=backend == "triton") if use_kernel else \
            _distill_terms_torch(s, t, y, float(tau), adjust, ignore_index, reduction, detach_targets, divergence,
                                 beta, needed=frozenset(f for f, wf in zip(_FIELDS, w) if wf != 0.0))
        loss = sum(wf * x for wf, x in zip(w, terms) if wf != 0.0)
        if not isinstance(loss, torch.Tensor):
            loss = torch.zeros_like(terms[0])
        if reduction == "none":
            loss = loss.reshape(batch.lead_shape)
        return loss, _shape_terms(DistillTerms(*(x.detach() for x in terms)), batch, reduction)
    _require_kernel(s)
    need_ds = s.requires_grad and torch.is_grad_enabled()
    need_dt = t.requires_grad and torch.is_grad_enabled()
    loss, rows, _, _ = torch.ops.pesf_kd.distill_loss_fused(
        s, t, y, w, float(tau), adjust, ignore_index, detach_targets, reduction, need_ds, need_dt,
        backend == "triton")
    red = rows.sum(dim=1)
    if reduction == "mean":
        red = red / _count_valid(y, ignore_index)
    return loss, _shape_terms(DistillTerms(*red.detach().unbind(0)), batch, reduction)


# ----------------------------------------------------------------------------------------------
# distill_linear: token-level KD at language-model scale, the [N, V] logits never materialised
# ----------------------------------------------------------------------------------------------
def distill_linear(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *, tau: float = 1.0,
                   weights: dict[str, float] | None = None, adjust: bool = False, divergence: str = "forward",
                   beta: float = 0.5, student_bias: torch.Tensor | None = None,
                   teacher_bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, reduction: str = "mean", chunk_size: int | None = None,
                   memory_budget: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Token-level distillation through the LM heads without materialising the ``[N, V]`` logits.

    The logits are ``student_hidden @ student_weight.T (+ student_bias)`` and likewise for the
    teacher (hidden ``[N, H]`` or ``[B, S, H]``, weights ``[V, H]`` as in ``nn.Linear``); they are
    computed ``chunk_size`` rows at a time, and each chunk's terms and gradients are formed before
    the next, so memory is O(chunk_size * V + N * H). The loss is
    ``sum_f weights[f] * mean over counted rows of distill_terms(...).f`` with ``weights`` among
    ``kl_ts``, ``ce_s``, ``kl_st``, ``ce_t`` (default ``{"kl_ts": 1.0}``: tau^2 KL(t || s), plain KD).
    Student terms (``kl_ts``, ``ce_s``) send gradients to the student's hidden states, weight and
    bias; teacher terms (``kl_st``, ``ce_t``: PESF-KD's two-way loss) to the teacher's, when they
    require grad. Rows count where ``labels != ignore_index`` (and ``mask``); ``labels`` is optional
    for pure distillation. ``adjust``, ``divergence``, ``beta``: as in ``distill_terms``. bf16/fp16
    inputs: each matmul accumulates in fp32, the loss math and the weight gradients are fp32.
    ``chunk_size`` defaults to the rows whose temporaries fit ``memory_budget`` bytes (default 128 MiB
    on CPU; 1 GiB on a GPU, where a chunk needs enough rows to fill the SMs). ``backend``:
    on CUDA with ``"auto"``/``"triton"`` each chunk runs the fused kernel (forward KL only).
    """
    _check_linear("student", student_hidden, student_weight, student_bias)
    _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1] or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_hidden/teacher_weight must give the student's logits shape "
                         f"{tuple(student_hidden.shape[:-1]) + (student_weight.shape[0],)}, got "
                         f"{tuple(teacher_hidden.shape[:-1]) + (teacher_weight.shape[0],)}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden must be on student_hidden's device, got {teacher_hidden.device} "
                         f"and {student_hidden.device}")
    _check_tau(tau)
    _check_divergence(divergence, beta)
    weights = {"kl_ts": 1.0} if weights is None else weights
    if not isinstance(weights, dict) or set(weights) - set(_LINEAR_TERMS):
        raise ValueError(f"weights keys must be among {_LINEAR_TERMS}, got {weights!r}")
    if labels is None and any(weights.get(f, 0.0) for f in ("ce_s", "ce_t")):
        raise ValueError("weights on ce_s / ce_t need labels")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    lead = tuple(student_hidden.shape[:-1])
    if labels is None:
        if adjust:
            raise ValueError("adjust=True needs labels (label adjustment swaps in the label's logit)")
        y = torch.zeros(lead, dtype=torch.int64, device=student_hidden.device)
    else:
        y = labels
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != lead:
        raise ValueError(f"labels must have shape {list(lead)} to match student_hidden "
                         f"{tuple(student_hidden.shape)}, got {tuple(y.shape) if isinstance(y, torch.Tensor) else y!r}")
    n, vocab = math.prod(lead), student_weight.shape[0]
    _check_labels(y.reshape(-1), n, vocab, ignore_index, lead + (vocab,))
    y = y.reshape(-1).long()
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a bool tensor of shape {list(lead)}")
        y = torch.where(mask.reshape(-1), y, ignore_index)
    kernel = divergence == "forward" and (
        backend == "triton" or (backend == "auto" and _auto_uses_kernel(student_hidden)))
    if kernel:
        _require_kernel(student_hidden)
    path = "kernel" if kernel else "forward" if divergence == "forward" else "autograd"
    if memory_budget is None:
        memory_budget = 2 ** 30 if student_hidden.is_cuda else 128 * 2 ** 20
    chunk = chunk_size or _linear_chunk_rows(n, vocab, student_hidden.element_size(), path, memory_budget)
    plan = _LinearPlan(float(tau), [float(weights.get(f, 0.0)) for f in _FIELDS], adjust, divergence,
                       float(beta), ignore_index, reduction, chunk, kernel, backend == "triton")
    hs = student_hidden.reshape(n, -1)
    ht = teacher_hidden.reshape(n, -1)
    return _DistillLinear.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, y, plan)


# ----------------------------------------------------------------------------------------------
# Consistency metrics (appendix A.3)
# ----------------------------------------------------------------------------------------------
def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Top-1 agreement: percentage of rows where argmax(s) == argmax(t)."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean() * 100.0


def _loyalty_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(teacher_logits.double(), dim=1)
    log_q = F.log_softmax(student_logits.double(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = torch.xlogy(log_p.exp(), log_p.exp()).sum(1) - (log_p.exp() * log_m).sum(1)
    kl_qm = torch.xlogy(log_q.exp(), log_q.exp()).sum(1) - (log_q.exp() * log_m).sum(1)
    jsd_bits = (0.5 * (kl_pm + kl_qm) / math.log(2.0)).clamp(0.0, 1.0)
    return 1.0 - jsd_bits.sqrt()


def probability_loyalty(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Probability loyalty of Xu et al. (2021): mean over rows of ``1 - sqrt(JSD(p_t || p_s))``, JSD in bits."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    return _loyalty_rows(student_logits, teacher_logits).mean()


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
    (%), ``pl`` (probability loyalty), ``cka_logits`` and, when ``update()`` was given features,
    ``cka_features``. Sums are accumulated in
    float64 and all-reduced across ranks when ``torch.distributed`` is initialised.
    """

    def __init__(self) -> None:
        self.rows = 0.0
        self._sums: torch.Tensor | None = None   # kl, gap, agreements, pl: on the device, read once in compute()
        self._cka_logits = _CKAStats()
        self._cka_features = _CKAStats()

    @torch.no_grad()
    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               student_features: torch.Tensor | None = None,
               teacher_features: torch.Tensor | None = None) -> None:
        _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
        s, t = student_logits.detach(), teacher_logits.detach()
        self.rows += s.shape[0]
        sums = torch.stack([kl_div(s, t, 1.0, reduction="sum").double(), sharpness_gap(s, t).double().sum(),
                            (s.argmax(1) == t.argmax(1)).sum().double(), _loyalty_rows(s, t).double().sum()])
        self._sums = sums if self._sums is None else self._sums + sums
        self._cka_logits.update(s, t)
        if student_features is not None and teacher_features is not None:
            self._cka_features.update(student_features, teacher_features)

    def compute(self) -> dict[str, float]:
        scalars = [self.rows, *(self._sums.tolist() if self._sums is not None else [0.0] * 4)]
        stats = [self._cka_logits, self._cka_features]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            scalars, stats = self._all_reduce(scalars, stats)
        rows, kl, gap, agree, pl = scalars
        n = max(rows, 1.0)
        out = {"kl": kl / n, "gap": gap / n, "agreement": 100.0 * agree / n, "pl": pl / n,
               "cka_logits": stats[0].value()}
        if stats[1].sx is not None:   # features were given: no CKA of features otherwise (not a NaN)
            out["cka_features"] = stats[1].value()
        return out

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
                # copy=True: all_reduce is in place and must not change this rank's own sums
                parts = [p.to(device, copy=True) for p in st.tensors()]
                parts.append(torch.tensor([st.n], dtype=torch.float64, device=device))
                for p in parts:
                    dist.all_reduce(p)
                out.sx, out.sy, out.xx, out.yy, out.yx = (p.cpu() for p in parts[:5])
                out.n = float(parts[5].item())
            reduced.append(out)
        return packed.tolist(), reduced


# ----------------------------------------------------------------------------------------------
# Adapters (PESF-KD sec. 3.2, Table 14). Each starts as the identity on the teacher it adapts.
# ----------------------------------------------------------------------------------------------
def _residual_sum(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``h + delta``, in fp32 under autocast: a bf16 sum rounds an adapter offset below ~4e-3 of O(1)
    features away, and a freshly initialised adapter (lr 1e-4) moves by far less than that."""
    if torch.is_autocast_enabled(h.device.type):
        return h.float() + delta.float()
    return h + delta


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
        return _residual_sum(h, self.up(F.relu(self.down(h))))


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
        return _residual_sum(self.sublayer(x), self.scale * self.up(F.relu(self.down(x))))


class LoRALinear(nn.Module):
    """LoRA of Hu et al. (2022): ``base(x) + (alpha / r) * x A^T B^T`` with ``B`` zero-initialised.

    Wraps an existing ``nn.Linear``; only ``A`` and ``B`` are meant to be trained: freeze ``base``
    (``layer.base.requires_grad_(False)``) or the whole backbone before building the optimiser.
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
        return _residual_sum(self.base(x), F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling)


# ==============================================================================================
# Part 2: internals
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Input checks: bad input is a ValueError naming the argument and the shapes, never a device-side
# assert or a silent broadcast.
# ----------------------------------------------------------------------------------------------
def _check_logits(name: str, x: torch.Tensor, token_dims: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (fp32/bf16/fp16/fp64), got {x.dtype}")
    if token_dims and x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, K] or [B, S, K], got shape {tuple(x.shape)}")
    if not token_dims and x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(x.shape)}")


def _check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, token_dims: bool = False) -> None:
    _check_logits(a_name, a, token_dims)
    _check_logits(b_name, b, token_dims)
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def _check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_labels(labels: torch.Tensor, n: int, k: int, ignore_index: int, logits_shape) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                    torch.int8, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got "
                         f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] to match logits {tuple(logits_shape)}, "
                         f"got {tuple(labels.shape)}")
    # torch.compile traces no assert; meta tensors (kernels/aot_check.py) hold no values.
    if torch.compiler.is_compiling() or labels.device.type == "meta" or labels.numel() == 0:
        return
    # The range check never reads the labels on the host (no sync in the hot path, capturable in a
    # CUDA graph): a device-side assert, which on CPU raises at once and is turned into a ValueError.
    bad = ((labels < 0) | (labels >= k)) & (labels != ignore_index)
    message = f"labels must lie in [0, {k}) or equal ignore_index={ignore_index} (logits shape {tuple(logits_shape)})"
    try:
        torch._assert_async(~bad.any(), message)
    except RuntimeError:
        first = labels[bad][0].item()
        raise ValueError(f"labels must lie in [0, {k}) or equal ignore_index={ignore_index}; "
                         f"found {first} (logits shape {tuple(logits_shape)})") from None


def _check_options(divergence: str, beta: float, reduction: str, backend: str) -> None:
    """The options distill_terms and distill_loss share."""
    _check_divergence(divergence, beta)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _check_divergence(divergence: str, beta: float) -> None:
    if divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}")
    if divergence == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must lie in (0, 1) for divergence='jsd', got {beta!r}")


class _Batch(NamedTuple):
    """Checked inputs of distill_terms / distill_loss as rows: [N, K] logits and [N] labels."""
    s: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor      # ignore_index where the row does not count (label or mask)
    lead_shape: tuple         # [N] or [B, S]: the shape of per-row results
    has_labels: bool


def _batch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
           mask: torch.Tensor | None, ignore_index: int, adjust: bool, tau: float) -> _Batch:
    """Checks the inputs and flattens [B, S, V] logits (and [B, S] labels / mask) into rows."""
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, token_dims=True)
    _check_tau(tau)
    lead = tuple(student_logits.shape[:-1])
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    n, k = s.shape
    has_labels = labels is not None
    if labels is None:
        if adjust:
            raise ValueError("adjust=True needs labels (label adjustment swaps in the label's logit)")
        labels = torch.zeros(lead, dtype=torch.int64, device=s.device)
    elif not isinstance(labels, torch.Tensor) or tuple(labels.shape) != lead:
        raise ValueError(f"labels must have shape {list(lead)} to match logits {tuple(student_logits.shape)}, "
                         f"got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    flat = labels.reshape(-1)
    _check_labels(flat, n, k, ignore_index, tuple(student_logits.shape))
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != lead:
            raise ValueError(f"mask must be a bool tensor of shape {list(lead)}, got "
                             f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else mask!r}")
        flat = torch.where(mask.reshape(-1), flat.long(), ignore_index)
    return _Batch(s, t, flat, lead, has_labels)


def _shape_terms(terms: DistillTerms, batch: _Batch, reduction: str) -> DistillTerms:
    """Per-row results back in the logits' leading shape; no cross-entropy without labels."""
    rows = list(terms)
    if not batch.has_labels:
        rows[2], rows[3] = torch.zeros_like(rows[2]), torch.zeros_like(rows[3])
    if reduction == "none":
        rows = [x.reshape(batch.lead_shape) for x in rows]
    return DistillTerms(*rows)


def _check_linear(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() not in (2, 3):
        raise ValueError(f"{name}_hidden must be a floating-point [N, H] or [B, S, H] tensor, got "
                         f"{(hidden.dtype, tuple(hidden.shape)) if isinstance(hidden, torch.Tensor) else hidden!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}_weight must be [V, {hidden.shape[-1]}] (the LM head, hidden last), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{name}_weight must match {name}_hidden's dtype and device, got {weight.dtype} on "
                         f"{weight.device} and {hidden.dtype} on {hidden.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != weight.dtype or bias.device != weight.device):
        raise ValueError(f"{name}_bias must be a [{weight.shape[0]}] tensor of {name}_weight's dtype and device, got "
                         f"{(bias.dtype, tuple(bias.shape)) if isinstance(bias, torch.Tensor) else bias!r}")


# ----------------------------------------------------------------------------------------------
# The PyTorch math: the reference path, and the torch fallback of every kernel
# ----------------------------------------------------------------------------------------------
def _math(x: torch.Tensor) -> torch.Tensor:
    """Upcast to the math dtype: float32 for fp32/bf16/fp16, float64 stays float64 (exact gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _label_adjust(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    labels = labels.long()
    top = logits.argmax(dim=1)
    # Ignored rows "swap" the argmax with itself, which is the identity.
    target = torch.where(labels == ignore_index, top, labels)[:, None]
    top = top[:, None]
    at_label = logits.gather(1, target)
    at_top = logits.gather(1, top)
    return logits.scatter(1, top, at_label).scatter(1, target, at_top)


def _forward_kl(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def _reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _generalised_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    # GKD (Agarwal et al. 2024): beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p.
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    return beta * _forward_kl(log_q, log_m, beta) + (1.0 - beta) * _forward_kl(log_p, log_m, beta)


# divergence(q = target, p = learner): "forward" KL(q || p) (Hinton), "reverse" KL(p || q), "jsd".
_DIVERGENCES = {"forward": _forward_kl, "reverse": _reverse_kl, "jsd": _generalised_jsd}


def _divergence_rows(target: torch.Tensor, learner: torch.Tensor, tau: float, divergence: str,
                     beta: float) -> torch.Tensor:
    """``tau^2 D(p^tau(target), p^tau(learner))`` per row (last dimension = classes)."""
    log_q = F.log_softmax(target / tau, dim=-1)
    log_p = F.log_softmax(learner / tau, dim=-1)
    return _DIVERGENCES[divergence](log_q, log_p, beta) * (tau * tau)


def _reduce(per_row: torch.Tensor, reduction: str, count, mean_name: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if reduction == mean_name:
        return per_row.sum() / count
    raise ValueError(f"reduction must be '{mean_name}', 'sum' or 'none', got {reduction!r}")


def _distill_terms_torch(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, tau: float, adjust: bool,
                         ignore_index: int, reduction: str, detach_targets: bool, divergence: str = "forward",
                         beta: float = 0.5, needed: frozenset = frozenset(_FIELDS)) -> DistillTerms:
    """The PyTorch reference path: same semantics as the kernel, eager ops, fp32 math.

    Only the ``needed`` fields are computed (the others are NaN): a KL-only loss then holds no
    cross-entropy temporaries of the size of the logits."""
    s32, t32 = _math(s), _math(t)
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    nan = torch.full((s.shape[0],), float("nan"), dtype=s32.dtype, device=s.device)
    kl_ts = kl_st = ce_s = ce_t = lse_s = lse_t = nan
    if "kl_ts" in needed:
        t_target = _label_adjust(t32, labels, ignore_index) if adjust else t32
        kl_ts = _divergence_rows(t_target.detach() if detach_targets else t_target, s32, tau, divergence, beta)
    if "kl_st" in needed:
        s_target = _label_adjust(s32, labels, ignore_index) if adjust else s32
        kl_st = _divergence_rows(s_target.detach() if detach_targets else s_target, t32, tau, divergence, beta)
    if needed & {"ce_s", "lse_s", "gap"}:
        lse_s = torch.logsumexp(s32, dim=1)
        ce_s = lse_s - s32.gather(1, safe).squeeze(1)
    if needed & {"ce_t", "lse_t", "gap"}:
        lse_t = torch.logsumexp(t32, dim=1)
        ce_t = lse_t - t32.gather(1, safe).squeeze(1)

    zero = torch.zeros((), dtype=s32.dtype, device=s.device)
    rows = [torch.where(valid, x, zero) for x in (kl_ts, kl_st, ce_s, ce_t, lse_s, lse_t)]
    rows.append(rows[5] - rows[4])
    if reduction != "none":
        count = valid.sum().clamp(min=1)
        rows = [_reduce(x, reduction, count, "mean") for x in rows]
    return DistillTerms(*rows)


# ----------------------------------------------------------------------------------------------
# The fused Triton kernel family (SPEC sec. 5), Liger-Kernel style. The kernels are defined at
# module level when triton imports; without it this file imports and runs with torch alone.
#
# The math, once. Per row, with a = s/tau, b = t/tau, LS = lse(a), LT = lse(b), p_s = e^(a-LS),
# p_t = e^(b-LT), P1 = softmax at tau = 1, y the label, jt = argmax t, js = argmax s, and the
# swaps pi = (jt y) (target adj(t) of kl_ts) and sigma = (js y) (target adj(s) of kl_st):
#
#   forward, one pass over s and t: online max m, Z1 = sum e^(x-m), Zt = sum e^((x-m)/tau) and
#   W_t = sum e^((t-m_t)/tau) (t-s)/tau (W_s symmetric), merged across blocks (and across split-K
#   partials) by rescaling with e^(m_old-m_new). Then
#     D_ts = W_t/Zt_t - LT + LS                    = KL(p_t || p_s) without tau^2 (unadjusted)
#     D_ts += (a_jt - a_y)(p_t,jt - p_t,y)         label adjustment: only two entries of the target
#                                                  move, max and lse do not change (closed form)
#     kl_ts = tau^2 D_ts, symmetric kl_st; lse at tau=1 -> ce = lse - x_y, gap = lse_t - lse_s.
#   Saved per row (fp32, 32 bytes): LS, LT, lse_s, lse_t, D_ts, D_st, jt, js.
#
#   backward, 2-D grid (row blocks x K blocks), upstream per-row grads g_*:
#     ds = g_kts tau (p_s - p_t o pi) + g_kst tau p_s ((a-LS) - (b o sigma - LT) - D_st)
#          + (g_ces + g_lses - g_gap) P1_s - g_ces [k=y]
#     dt = g_kst tau (p_t - p_s o sigma) + g_kts tau p_t ((b-LT) - (a o pi - LS) - D_ts)
#          + (g_cet + g_lset + g_gap) P1_t - g_cet [k=y]
#   (the "target" halves vanish with detach_targets; "x o pi" is x read at the swapped index, an
#   index remap using the six per-row scalars s_y, t_y, s_jt, t_jt, s_js, t_js.)
#   Ignored rows are masked out of every load, so they give exact zeros even when they hold NaN.
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_triton():
    """``(triton, triton.language, None)``, or ``(None, None, None)`` without triton (the silent
    torch-only setup), or ``(None, None, error)`` when triton is there but cannot serve (the
    interpreter without numpy, a triton too old): backend="auto" then warns once naming the error
    and backend="triton" raises with it."""
    try:
        import triton
        import triton.language as tl
    except ModuleNotFoundError as exc:
        return None, None, (None if (exc.name or "").split(".")[0] == "triton" else exc)
    except Exception as exc:
        return None, None, exc
    return triton, tl, None


triton, tl, _TRITON_DEFINE_ERROR = _import_triton()

if tl is not None:
    # Module-level kernels: Triton resolves the helpers a kernel calls through these globals.
    @triton.jit
    def _kd_row_offsets(rows, stride, OFF64: tl.constexpr):
        # Element offset of each row. int32 unless some offset of the launch reaches 2^31.
        if OFF64:
            return rows.to(tl.int64) * stride
        else:
            return rows * stride

    @triton.jit
    def _kd_rows(y_ptr, rows, N, stride_s, stride_t, ignore_index, OFF64: tl.constexpr):
        # A program's rows: in range, labelled (y != ignore_index), the label (0 where not), row offsets.
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        y = tl.where(valid, y, 0).to(tl.int32)
        return row_ok, valid, y, _kd_row_offsets(rows, stride_s, OFF64), _kd_row_offsets(rows, stride_t, OFF64)

    @triton.jit
    def _kd_empty_state(ROWS: tl.constexpr):
        # One direction's online-softmax state: max, sum at 1, sum at 1/tau, weighted sum, argmax.
        zero = tl.zeros([ROWS], tl.float32)
        return tl.full([ROWS], float("-inf"), tl.float32), zero, zero, zero, tl.zeros([ROWS], tl.int32)

    @triton.jit
    def _kd_merge(m, z1, zt, w, arg, bm, bz1, bzt, bw, barg, inv_tau):
        # Merge two online-softmax states; each z is relative to its own max (0 when the max is -inf).
        nm = tl.maximum(m, bm)
        ns = tl.where(nm == float("-inf"), 0.0, nm)
        a_old = tl.exp(m - ns)
        a_new = tl.exp(bm - ns)
        at_old = tl.exp((m - ns) * inv_tau)
        at_new = tl.exp((bm - ns) * inv_tau)
        z1 = z1 * a_old + bz1 * a_new
        zt = zt * at_old + bzt * at_new
        w = w * at_old + bw * at_new
        arg = tl.where(bm > m, barg, arg)  # strict: the earlier (lower) index wins ties
        return nm, z1, zt, w, arg

    @triton.jit
    def _kd_block_stats(x, other, mask, k0, inv_tau, POW4: tl.constexpr):
        xm = tl.where(mask, x, float("-inf"))
        bm = tl.max(xm, axis=1)
        barg = tl.argmax(xm, axis=1).to(tl.int32) + k0
        bs = tl.where(bm == float("-inf"), 0.0, bm)
        if POW4:   # tau = 4, same max: exp(x - m) = exp((x - m) / 4) ** 4, one exponential fewer per element
            et = tl.where(mask, tl.exp((x - bs[:, None]) * inv_tau), 0.0)
            e1 = et * et
            e1 = e1 * e1
        else:      # (this order: the compile of the default launch stays as it was)
            e1 = tl.where(mask, tl.exp(x - bs[:, None]), 0.0)
            et = tl.where(mask, tl.exp((x - bs[:, None]) * inv_tau), 0.0)
        bw = tl.sum(tl.where(mask, et * (x - other), 0.0), axis=1) * inv_tau
        return bm, tl.sum(e1, axis=1), tl.sum(et, axis=1), bw, barg

    @triton.jit
    def _kd_finalize(s_ptr, t_ptr, off_s, off_t, y, valid, ms, z1s, zts, ws, js, mt, z1t, ztt, wt, jt,
                 tau, inv_tau, ADJUST: tl.constexpr):
        mss = tl.where(ms == float("-inf"), 0.0, ms)
        mts = tl.where(mt == float("-inf"), 0.0, mt)
        lse_s = mss + tl.log(z1s)
        lse_t = mts + tl.log(z1t)
        LS = mss * inv_tau + tl.log(zts)
        LT = mts * inv_tau + tl.log(ztt)
        d_ts = wt / ztt - LT + LS
        d_st = ws / zts - LS + LT
        sy = tl.load(s_ptr + off_s + y, mask=valid, other=0.0).to(tl.float32)
        ty = tl.load(t_ptr + off_t + y, mask=valid, other=0.0).to(tl.float32)
        if ADJUST:
            s_jt = tl.load(s_ptr + off_s + jt, mask=valid, other=0.0).to(tl.float32)
            t_jt = tl.load(t_ptr + off_t + jt, mask=valid, other=0.0).to(tl.float32)
            s_js = tl.load(s_ptr + off_s + js, mask=valid, other=0.0).to(tl.float32)
            t_js = tl.load(t_ptr + off_t + js, mask=valid, other=0.0).to(tl.float32)
            c_ts = (s_jt - sy) * inv_tau * (tl.exp(t_jt * inv_tau - LT) - tl.exp(ty * inv_tau - LT))
            c_st = (t_js - ty) * inv_tau * (tl.exp(s_js * inv_tau - LS) - tl.exp(sy * inv_tau - LS))
            d_ts += tl.where(jt != y, c_ts, 0.0)
            d_st += tl.where(js != y, c_st, 0.0)
        return LS, LT, lse_s, lse_t, d_ts, d_st, sy, ty

    @triton.jit
    def _kd_store_rows(rows_ptr, stats_ptr, rows, N, row_ok, valid, LS, LT, lse_s, lse_t, d_ts, d_st,
                   sy, ty, jt, js, tau):
        zero = tl.zeros_like(LS)
        tau2 = tau * tau
        tl.store(rows_ptr + 0 * N + rows, tl.where(valid, tau2 * d_ts, zero), mask=row_ok)
        tl.store(rows_ptr + 1 * N + rows, tl.where(valid, tau2 * d_st, zero), mask=row_ok)
        tl.store(rows_ptr + 2 * N + rows, tl.where(valid, lse_s - sy, zero), mask=row_ok)
        tl.store(rows_ptr + 3 * N + rows, tl.where(valid, lse_t - ty, zero), mask=row_ok)
        tl.store(rows_ptr + 4 * N + rows, tl.where(valid, lse_s, zero), mask=row_ok)
        tl.store(rows_ptr + 5 * N + rows, tl.where(valid, lse_t, zero), mask=row_ok)
        tl.store(rows_ptr + 6 * N + rows, tl.where(valid, lse_t - lse_s, zero), mask=row_ok)
        tl.store(stats_ptr + 0 * N + rows, LS, mask=row_ok)
        tl.store(stats_ptr + 1 * N + rows, LT, mask=row_ok)
        tl.store(stats_ptr + 2 * N + rows, lse_s, mask=row_ok)
        tl.store(stats_ptr + 3 * N + rows, lse_t, mask=row_ok)
        tl.store(stats_ptr + 4 * N + rows, d_ts, mask=row_ok)
        tl.store(stats_ptr + 5 * N + rows, d_st, mask=row_ok)
        tl.store(stats_ptr + 6 * N + rows, jt.to(tl.float32), mask=row_ok)
        tl.store(stats_ptr + 7 * N + rows, js.to(tl.float32), mask=row_ok)

    @triton.jit
    def _kd_softmax1(x, lse, p, L, POW4: tl.constexpr):
        # The tau = 1 softmax exp(x - lse) of a tile whose tau softmax is p = exp(x / tau - L). POW4 (tau = 4):
        # p**4 * exp(4 L - lse), a per-row factor (>= 1, as Z_tau**4 >= Z_1): one exponential fewer per element.
        if POW4:
            q = p * p
            return q * q * tl.exp(4.0 * L - lse)[:, None]
        else:
            return tl.exp(x - lse[:, None])

    @triton.jit
    def _kd_grad_tile(s, t, cols, y, valid, jt, js, sy, ty, s_jt, t_jt, s_js, t_js, LS, LT, lse_s, lse_t,
                  d_ts, d_st, g_kts, g_kst, g_ces, g_cet, g_lses, g_lset, g_gap, tau, inv_tau,
                  ADJUST: tl.constexpr, DETACH: tl.constexpr, POW4: tl.constexpr):
        # One [ROWS, BLOCK_K] tile of ds and dt (fp32); see the formulas at the top of this section.
        a = s * inv_tau
        b = t * inv_tau
        lps = a - LS[:, None]
        lpt = b - LT[:, None]
        ps = tl.exp(lps)
        pt = tl.exp(lpt)
        c = cols[None, :]
        is_y = c == y[:, None]
        if ADJUST:
            at_jt = c == jt[:, None]
            at_js = c == js[:, None]
            a_pi = tl.where(at_jt, (sy * inv_tau)[:, None], tl.where(is_y, (s_jt * inv_tau)[:, None], a))
            b_pi = tl.where(at_jt, (ty * inv_tau)[:, None], tl.where(is_y, (t_jt * inv_tau)[:, None], b))
            a_sg = tl.where(at_js, (sy * inv_tau)[:, None], tl.where(is_y, (s_js * inv_tau)[:, None], a))
            b_sg = tl.where(at_js, (ty * inv_tau)[:, None], tl.where(is_y, (t_js * inv_tau)[:, None], b))
        else:
            a_pi = a
            b_pi = b
            a_sg = a
            b_sg = b
        c1s = (g_ces + g_lses - g_gap)[:, None]
        c1t = (g_cet + g_lset + g_gap)[:, None]
        ds = (g_kts * tau)[:, None] * (ps - tl.exp(b_pi - LT[:, None])) \
            + c1s * _kd_softmax1(s, lse_s, ps, LS, POW4) - tl.where(is_y, g_ces[:, None], 0.0)
        dt = (g_kst * tau)[:, None] * (pt - tl.exp(a_sg - LS[:, None])) \
            + c1t * _kd_softmax1(t, lse_t, pt, LT, POW4) - tl.where(is_y, g_cet[:, None], 0.0)
        if not DETACH:
            ds += (g_kst * tau)[:, None] * ps * (lps - (b_sg - LT[:, None]) - d_st[:, None])
            dt += (g_kts * tau)[:, None] * pt * (lpt - (a_pi - LS[:, None]) - d_ts[:, None])
        ds = tl.where(valid[:, None], ds, 0.0)
        dt = tl.where(valid[:, None], dt, 0.0)
        return ds, dt

    @triton.jit
    def _kd_grad_loop(s_ptr, t_ptr, ds_ptr, dt_ptr, g_ptr, rows, row_ok, valid, y, jt, js, off_s, off_t,
                  N, K, stride_ds, stride_dt, g_sf, g_sn, k_start, k_stop, LS, LT, lse_s, lse_t, d_ts, d_st,
                  sy, ty, tau, inv_tau, BLOCK_K: tl.constexpr, ADJUST: tl.constexpr, DETACH: tl.constexpr,
                  WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, OFF64: tl.constexpr,
                  NUM_STAGES: tl.constexpr, POW4: tl.constexpr):
        # Per-row scalars of the index remap and the upstream gradients, then the K blocks.
        s_jt = tl.load(s_ptr + off_s + jt, mask=valid, other=0.0).to(tl.float32)
        t_jt = tl.load(t_ptr + off_t + jt, mask=valid, other=0.0).to(tl.float32)
        s_js = tl.load(s_ptr + off_s + js, mask=valid, other=0.0).to(tl.float32)
        t_js = tl.load(t_ptr + off_t + js, mask=valid, other=0.0).to(tl.float32)
        g_kts = tl.load(g_ptr + 0 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_kst = tl.load(g_ptr + 1 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_ces = tl.load(g_ptr + 2 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_cet = tl.load(g_ptr + 3 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_lses = tl.load(g_ptr + 4 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_lset = tl.load(g_ptr + 5 * g_sf + rows * g_sn, mask=valid, other=0.0)
        g_gap = tl.load(g_ptr + 6 * g_sf + rows * g_sn, mask=valid, other=0.0)
        off_ds = _kd_row_offsets(rows, stride_ds, OFF64)
        off_dt = _kd_row_offsets(rows, stride_dt, OFF64)
        for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            m2 = row_ok[:, None] & (cols[None, :] < K)
            lm = valid[:, None] & (cols[None, :] < K)
            s = tl.load(s_ptr + off_s[:, None] + cols[None, :], mask=lm, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + off_t[:, None] + cols[None, :], mask=lm, other=0.0).to(tl.float32)
            ds, dt = _kd_grad_tile(s, t, cols, y, valid, jt, js, sy, ty, s_jt, t_jt, s_js, t_js, LS, LT,
                               lse_s, lse_t, d_ts, d_st, g_kts, g_kst, g_ces, g_cet, g_lses, g_lset, g_gap,
                               tau, inv_tau, ADJUST, DETACH, POW4)
            if WRITE_DS:
                tl.store(ds_ptr + off_ds[:, None] + cols[None, :], ds.to(ds_ptr.dtype.element_ty), mask=m2)
            if WRITE_DT:
                tl.store(dt_ptr + off_dt[:, None] + cols[None, :], dt.to(dt_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _kd_fwd_kernel(s_ptr, t_ptr, y_ptr, rows_ptr, stats_ptr, part_ptr, ds_ptr, dt_ptr, g_ptr,
                      N, K, stride_s, stride_t, stride_ds, stride_dt, g_sf, g_sn, k_per_split,
                      tau, inv_tau, ignore_index,
                      ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, ADJUST: tl.constexpr,
                      GRAD: tl.constexpr, DETACH: tl.constexpr, WRITE_DS: tl.constexpr,
                      WRITE_DT: tl.constexpr, OFF64: tl.constexpr, NUM_STAGES: tl.constexpr,
                      POW4: tl.constexpr):
        # Grid (row blocks, K splits). One read of s and t per program's K range. SPLIT: store the
        # partial online-softmax states for kd_merge_kernel; else finalize here and, with GRAD
        # (gradient-in-forward mode), sweep the row again writing ds and dt (L2-resident re-read).
        # NUM_STAGES: software pipelining of both K loops (None: the compiler's default); POW4: tau = 4.
        pid_r = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_r * ROWS + tl.arange(0, ROWS)
        row_ok, valid, y, off_s, off_t = _kd_rows(y_ptr, rows, N, stride_s, stride_t, ignore_index, OFF64)
        ms, z1s, zts, ws, js = _kd_empty_state(ROWS)
        mt, z1t, ztt, wt, jt = _kd_empty_state(ROWS)
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, K)
        for k0 in tl.range(k_start, k_stop, BLOCK_K, num_stages=NUM_STAGES):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = valid[:, None] & (cols[None, :] < k_stop)
            s = tl.load(s_ptr + off_s[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + off_t[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            bm, bz1, bzt, bw, barg = _kd_block_stats(s, t, mask, k0, inv_tau, POW4)
            ms, z1s, zts, ws, js = _kd_merge(ms, z1s, zts, ws, js, bm, bz1, bzt, bw, barg, inv_tau)
            bm, bz1, bzt, bw, barg = _kd_block_stats(t, s, mask, k0, inv_tau, POW4)
            mt, z1t, ztt, wt, jt = _kd_merge(mt, z1t, ztt, wt, jt, bm, bz1, bzt, bw, barg, inv_tau)
        if SPLIT:
            nsp = tl.num_programs(1)
            base = part_ptr + (rows * nsp + pid_k) * 10
            tl.store(base + 0, ms, mask=row_ok)
            tl.store(base + 1, z1s, mask=row_ok)
            tl.store(base + 2, zts, mask=row_ok)
            tl.store(base + 3, ws, mask=row_ok)
            tl.store(base + 4, js.to(tl.float32), mask=row_ok)
            tl.store(base + 5, mt, mask=row_ok)
            tl.store(base + 6, z1t, mask=row_ok)
            tl.store(base + 7, ztt, mask=row_ok)
            tl.store(base + 8, wt, mask=row_ok)
            tl.store(base + 9, jt.to(tl.float32), mask=row_ok)
        else:
            LS, LT, lse_s, lse_t, d_ts, d_st, sy, ty = _kd_finalize(
                s_ptr, t_ptr, off_s, off_t, y, valid, ms, z1s, zts, ws, js, mt, z1t, ztt, wt, jt,
                tau, inv_tau, ADJUST)
            _kd_store_rows(rows_ptr, stats_ptr, rows, N, row_ok, valid, LS, LT, lse_s, lse_t, d_ts, d_st,
                       sy, ty, jt, js, tau)
            if GRAD:
                _kd_grad_loop(s_ptr, t_ptr, ds_ptr, dt_ptr, g_ptr, rows, row_ok, valid, y, jt, js, off_s, off_t,
                          N, K, stride_ds, stride_dt, g_sf, g_sn, 0, K, LS, LT, lse_s, lse_t, d_ts, d_st,
                          sy, ty, tau, inv_tau, BLOCK_K, ADJUST, DETACH, WRITE_DS, WRITE_DT, OFF64,
                          NUM_STAGES, POW4)

    @triton.jit
    def _kd_merge_kernel(s_ptr, t_ptr, y_ptr, rows_ptr, stats_ptr, part_ptr, N, stride_s, stride_t, n_splits,
                        tau, inv_tau, ignore_index, ROWS: tl.constexpr, ADJUST: tl.constexpr,
                        OFF64: tl.constexpr):
        # Split-K epilogue: merge the partial states of each row (O(N * splits) fp32) and finalize.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok, valid, y, off_s, off_t = _kd_rows(y_ptr, rows, N, stride_s, stride_t, ignore_index, OFF64)
        ms, z1s, zts, ws, js = _kd_empty_state(ROWS)
        mt, z1t, ztt, wt, jt = _kd_empty_state(ROWS)
        for sp in range(0, n_splits):
            base = part_ptr + (rows * n_splits + sp) * 10
            ms, z1s, zts, ws, js = _kd_merge(
                ms, z1s, zts, ws, js, tl.load(base + 0, mask=row_ok, other=float("-inf")),
                tl.load(base + 1, mask=row_ok, other=0.0), tl.load(base + 2, mask=row_ok, other=0.0),
                tl.load(base + 3, mask=row_ok, other=0.0),
                tl.load(base + 4, mask=row_ok, other=0.0).to(tl.int32), inv_tau)
            mt, z1t, ztt, wt, jt = _kd_merge(
                mt, z1t, ztt, wt, jt, tl.load(base + 5, mask=row_ok, other=float("-inf")),
                tl.load(base + 6, mask=row_ok, other=0.0), tl.load(base + 7, mask=row_ok, other=0.0),
                tl.load(base + 8, mask=row_ok, other=0.0),
                tl.load(base + 9, mask=row_ok, other=0.0).to(tl.int32), inv_tau)
        LS, LT, lse_s, lse_t, d_ts, d_st, sy, ty = _kd_finalize(
            s_ptr, t_ptr, off_s, off_t, y, valid, ms, z1s, zts, ws, js, mt, z1t, ztt, wt, jt,
            tau, inv_tau, ADJUST)
        _kd_store_rows(rows_ptr, stats_ptr, rows, N, row_ok, valid, LS, LT, lse_s, lse_t, d_ts, d_st,
                   sy, ty, jt, js, tau)

    @triton.jit
    def _kd_bwd_kernel(s_ptr, t_ptr, y_ptr, stats_ptr, g_ptr, ds_ptr, dt_ptr, N, K, stride_s, stride_t,
                      stride_ds, stride_dt, g_sf, g_sn, tau, inv_tau, ignore_index,
                      ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ADJUST: tl.constexpr, DETACH: tl.constexpr,
                      WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, OFF64: tl.constexpr, POW4: tl.constexpr):
        # Grid (row blocks, K blocks): each program reads its tile of s and t once and writes its
        # tile of ds and dt once (one K block: nothing to pipeline); the rest comes from the per-row statistics.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok, valid, y, off_s, off_t = _kd_rows(y_ptr, rows, N, stride_s, stride_t, ignore_index, OFF64)
        LS = tl.load(stats_ptr + 0 * N + rows, mask=row_ok, other=0.0)
        LT = tl.load(stats_ptr + 1 * N + rows, mask=row_ok, other=0.0)
        lse_s = tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        lse_t = tl.load(stats_ptr + 3 * N + rows, mask=row_ok, other=0.0)
        d_ts = tl.load(stats_ptr + 4 * N + rows, mask=row_ok, other=0.0)
        d_st = tl.load(stats_ptr + 5 * N + rows, mask=row_ok, other=0.0)
        jt = tl.load(stats_ptr + 6 * N + rows, mask=row_ok, other=0.0).to(tl.int32)
        js = tl.load(stats_ptr + 7 * N + rows, mask=row_ok, other=0.0).to(tl.int32)
        sy = tl.load(s_ptr + off_s + y, mask=valid, other=0.0).to(tl.float32)
        ty = tl.load(t_ptr + off_t + y, mask=valid, other=0.0).to(tl.float32)
        k0 = tl.program_id(1) * BLOCK_K
        _kd_grad_loop(s_ptr, t_ptr, ds_ptr, dt_ptr, g_ptr, rows, row_ok, valid, y, jt, js, off_s, off_t,
                  N, K, stride_ds, stride_dt, g_sf, g_sn, k0, tl.minimum(k0 + BLOCK_K, K),
                  LS, LT, lse_s, lse_t, d_ts, d_st, sy, ty, tau, inv_tau, BLOCK_K, ADJUST, DETACH,
                  WRITE_DS, WRITE_DT, OFF64, None, POW4)

    @triton.jit
    def _kd_rescale_kernel(x_ptr, numel, g_ptr, applied_ptr, BLOCK: tl.constexpr):
        # x *= g / applied, in place, read on the device: when the incoming gradient equals the scale
        # already applied (1 for a plain loss.backward()), every program returns after two loads.
        g = tl.load(g_ptr).to(tl.float32)
        applied = tl.load(applied_ptr)
        if g != applied:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * (g / applied)).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _kd_offsets_probe_kernel(out_ptr, rows_ptr, stride, OFF64: tl.constexpr):
        # Test hook: exposes the row-offset arithmetic of the kernels (int32 vs int64 path).
        r = tl.load(rows_ptr + tl.arange(0, 4))
        tl.store(out_ptr + tl.arange(0, 4), _kd_row_offsets(r, stride, OFF64).to(tl.int64))

    # The launch table (kernels/aot_check.py swaps in recorders to derive a GPU's launches).
    _TRITON = {"fwd": _kd_fwd_kernel, "merge": _kd_merge_kernel, "bwd": _kd_bwd_kernel, "rescale": _kd_rescale_kernel,
               "offsets_probe": _kd_offsets_probe_kernel, "triton": triton, "interpret": _interpreting()}
else:
    _TRITON = None


@torch.compiler.assume_constant_result  # torch.compile: evaluated once at trace time, not traced
def triton_available() -> bool:
    """True when the fused Triton kernel can be used (``triton`` imports and the kernels are defined)."""
    return bool(_TRITON)


@torch.compiler.assume_constant_result
def _triton_interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return triton_available() and bool(_TRITON["interpret"])


def _triton_kernels():
    return _TRITON


# ----------------------------------------------------------------------------------------------
# Launch configuration and launchers
# ----------------------------------------------------------------------------------------------
_N_STATS = 8                              # LS, LT, lse_s, lse_t, D_ts, D_st, jt, js
_N_PART = 10                              # split-K partials: (m, Z1, Zt, W, arg) for s and for t

# Launch configuration overrides (tests force several K blocks, several rows per program, split-K;
# a GPU session can sweep them). Keys: block_k, rows, splits, bwd_block_k, bwd_rows, num_warps,
# num_stages (software pipelining of the forward's K loops; unset: the compiler's default) and
# pow4_exp (tau = 4 only: exp(x - m) as exp((x - m) / 4) ** 4, one exponential fewer per element).
_KD_TUNE: dict = {}
_GPU_BWD_MAX_ROWS = 4   # rows per backward program on a GPU (kernels/aot_check.py: more spill at K = 100)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _needs_int64(n: int, k: int, *row_strides: int) -> bool:
    """True when an element offset of an [n, k] launch can reach 2^31 (then the kernels use int64)."""
    last = max([(n - 1) * st for st in row_strides] + [0]) + k
    return n * k >= 2 ** 31 or last >= 2 ** 31


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the launch heuristics plan for; 0 = the interpreter / CPU tiles.

    The AOT compile check (kernels/aot_check.py) replaces it to derive a GPU's launches on meta tensors."""
    if _interpreting() or device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


# device index -> (the winners file's entries measured on that card, [] when none; the choice per shape)
_WINNERS: dict = {}


def _launch_winner(n: int, k: int, elem_size: int, device: torch.device) -> dict:
    """The ``_KD_TUNE`` overrides ``kernels/bench_kd.py --tune`` measured fastest for this shape on this card:
    read once per device from ``$PESF_KD_WINNERS`` or ``kernels/kd_launch_winners.json`` when present and
    written on a card of the same name; the entry with the same dtype width and power-of-two K bucket and the
    nearest N (in log scale). ``{}`` (the heuristics) otherwise, on a CPU and under the interpreter. Chosen
    once per shape: every launch asks."""
    if device.type != "cuda" or _interpreting():
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WINNERS:
        import json
        from pathlib import Path
        path = Path(os.environ.get("PESF_KD_WINNERS") or Path(__file__).resolve().parent / "kernels" /
                    "kd_launch_winners.json")
        data = json.loads(path.read_text()) if path.is_file() else {}
        same_card = data.get("device") == torch.cuda.get_device_name(index)
        _WINNERS[index] = (data.get("winners", []) if same_card else [], {})
    entries, chosen = _WINNERS[index]
    if (n, k, elem_size) not in chosen:
        width = {"fp32": 4, "bf16": 2, "fp16": 2}
        fits = [w for w in entries if width[w["dtype"]] == elem_size and _next_pow2(w["K"]) == _next_pow2(k)]
        best = min(fits, key=lambda w: abs(math.log2(max(w["N"], 1)) - math.log2(max(n, 1))), default=None)
        chosen[(n, k, elem_size)] = {} if best is None else dict(best["tune"])
    return chosen[(n, k, elem_size)]


def _kd_config(n: int, k: int, elem_size: int, device: torch.device) -> dict:
    """Launch configuration by heuristics on K, N and the dtype (no autotune; see kernels/README.md).

    GPU: a program handles a [ROWS, BLOCK_K] tile of TILE elements per tensor (16-byte vector
    loads: 4 fp32 or 8 bf16/fp16 per thread), several rows per program when K is small, and split-K
    in the forward when there are too few row programs to fill the SMs (small N, huge K).
    Interpreter: the cost is per program and per loop iteration, so the tiles are made large.
    """
    n_sm = _sm_count(device)
    gpu = n_sm > 0   # else (interpreter): all rows in as few programs as the tile allows
    tune = {**_launch_winner(n, k, elem_size, device), **_KD_TUNE}   # explicit overrides beat measured winners
    tile = (4096 if elem_size >= 4 else 8192) if gpu else 1 << 14
    block_k = tune.get("block_k") or min(_next_pow2(k), tile)
    # Rows per program: fill the tile, but keep >= 2 programs per SM when N allows it.
    rows = tune.get("rows") or max(1, min(tile // block_k, 64, _next_pow2(max(1, n // max(1, 2 * n_sm)))))
    row_progs = -(-n // rows)
    splits = tune.get("splits")
    if splits is None:
        splits = 1
        if gpu and row_progs < 2 * n_sm and k >= 4 * block_k:
            splits = min(-(-k // block_k), -(-2 * n_sm // row_progs))
    k_per_split = -(-(-(-k // max(1, splits))) // block_k) * block_k
    splits = -(-k // k_per_split)
    # The backward tile holds ~10 live fp32 temporaries per element (the swap remap, both KL halves):
    # half the forward tile on a GPU keeps it in registers (first thing to sweep on a GPU).
    bwd_tile = tile // 2 if gpu else tile
    bwd_block_k = tune.get("bwd_block_k") or min(_next_pow2(k), bwd_tile)
    # Each thread keeps ~25 per-row scalars (upstream grads, statistics, swap values) once per row it
    # touches: with more than 4 rows a program spills when K gives no vector loads (ptxas, K = 100).
    bwd_rows = tune.get("bwd_rows") or max(1, min(bwd_tile // bwd_block_k, 64, _next_pow2(max(1, n)),
                                                      _GPU_BWD_MAX_ROWS if gpu else 64))
    num_warps = tune.get("num_warps") or (4 if rows * block_k <= 2048 else 8)
    # Gradient-in-forward: the forward program also runs the backward's tile loop, so its tile keeps
    # to the backward's limits (the full 16-bit forward tile spills, or sits at 255 registers).
    gif_rows = min(rows, bwd_rows)
    gif_block_k = min(block_k, bwd_block_k)
    return {"block_k": block_k, "rows": rows, "splits": splits, "k_per_split": k_per_split,
            "bwd_block_k": bwd_block_k, "bwd_rows": bwd_rows, "num_warps": num_warps,
            "gif_rows": gif_rows, "gif_block_k": gif_block_k,
            # 8 warps from 1024 elements (aot_check: at 4, 2048 fp32 take 253 registers and 1024 fp16
            # with detached targets spill 4 bytes on sm_90).
            "gif_num_warps": tune.get("num_warps") or (4 if gif_rows * gif_block_k < 1024 else 8),
            "num_stages": tune.get("num_stages"), "pow4_exp": bool(tune.get("pow4_exp"))}


def _pow4_exp(cfg: dict, tau: float) -> bool:
    """Whether the kernels take exp(x - m) as exp((x - m) / tau) ** 4: only at tau = 4. Forced through
    ``_KD_TUNE`` at another tau it is refused (ValueError); a measured winner (``bench_kd.py --tune`` times
    it at tau = 4) is ignored there."""
    if not cfg["pow4_exp"] or tau == 4.0:
        return cfg["pow4_exp"]
    if _KD_TUNE.get("pow4_exp"):
        raise ValueError(f"kd_core._KD_TUNE['pow4_exp'] needs tau == 4 (exp(x) = exp(x / 4) ** 4); got tau={tau}")
    return False


def _prep(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    # Rows may have any stride; columns must be unit-stride (copied otherwise).
    if s.stride(1) != 1 and s.shape[1] > 1:
        s = s.contiguous()
    if t.stride(1) != 1 and t.shape[1] > 1:
        t = t.contiguous()
    return s, t, labels.to(torch.int64).contiguous()


def _launch_fwd(s, t, labels, tau, adjust, ignore_index, grad=None, out=None):
    """Forward launcher: per-row values [7, N] and saved statistics [8, N], both fp32.

    ``grad = (g [7] fp32 weights, detach, write_ds, write_dt)`` selects gradient-in-forward mode and
    also returns (ds, dt) (freshly allocated, in the input dtypes). ``out = (rows, stats, ds, dt)``
    gives the output buffers instead (tests pass views into guard-banded buffers; ds/dt may have
    any row stride)."""
    kern = _triton_kernels()
    s, t, labels = _prep(s, t, labels)
    n, k = s.shape
    cfg = _kd_config(n, k, s.element_size(), s.device)
    pow4 = _pow4_exp(cfg, tau)
    if out is not None:
        rows, stats, ds, dt = out
    else:
        rows = torch.empty((7, n), dtype=torch.float32, device=s.device)
        stats = torch.empty((_N_STATS, n), dtype=torch.float32, device=s.device)
        ds = dt = None
    g = rows
    write_ds = write_dt = detach = False
    if grad is not None:
        g, detach, write_ds, write_dt = grad
        if out is None:
            ds = torch.empty((n, k), dtype=s.dtype, device=s.device) if write_ds else s.new_empty(0)
            dt = torch.empty((n, k), dtype=t.dtype, device=t.device) if write_dt else t.new_empty(0)
    sds = ds.stride(0) if write_ds else k
    sdt = dt.stride(0) if write_dt else k
    if n == 0:
        rows.zero_()
        stats.zero_()
        return rows, stats, ds, dt
    off64 = _needs_int64(n, k, s.stride(0), t.stride(0), sds, sdt)
    split = cfg["splits"] > 1
    part = torch.empty((n, cfg["splits"], _N_PART), dtype=torch.float32, device=s.device) if split else rows
    fused = grad is not None and not split
    prog_rows, block_k, warps = (cfg["gif_rows"], cfg["gif_block_k"], cfg["gif_num_warps"]) if fused else \
        (cfg["rows"], cfg["block_k"], cfg["num_warps"])
    row_progs = -(-n // prog_rows)
    kern["fwd"][(row_progs, cfg["splits"])](
        s, t, labels, rows, stats, part, ds if fused and write_ds else s, dt if fused and write_dt else t, g,
        n, k, s.stride(0), t.stride(0), sds, sdt, 1, 0, cfg["k_per_split"],
        tau, 1.0 / tau, ignore_index,
        ROWS=prog_rows, BLOCK_K=block_k, SPLIT=split, ADJUST=adjust, GRAD=fused, DETACH=detach,
        WRITE_DS=fused and write_ds, WRITE_DT=fused and write_dt, OFF64=off64, NUM_STAGES=cfg["num_stages"],
        POW4=pow4, num_warps=warps)
    if split:
        kern["merge"][(row_progs,)](s, t, labels, rows, stats, part, n, s.stride(0), t.stride(0), cfg["splits"],
                                    tau, 1.0 / tau, ignore_index, ROWS=cfg["rows"], ADJUST=adjust, OFF64=off64)
        if grad is not None and (write_ds or write_dt):
            _launch_bwd_into(s, t, labels, stats, g, 1, 0, tau, adjust, ignore_index, detach, ds, dt,
                             write_ds, write_dt, cfg)
    return rows, stats, ds, dt


def _launch_bwd_into(s, t, labels, stats, g, g_sf, g_sn, tau, adjust, ignore_index, detach, ds, dt,
                     write_ds, write_dt, cfg):
    kern = _triton_kernels()
    n, k = s.shape
    sds = ds.stride(0) if write_ds else k
    sdt = dt.stride(0) if write_dt else k
    off64 = _needs_int64(n, k, s.stride(0), t.stride(0), sds, sdt)
    grid = (-(-n // cfg["bwd_rows"]), -(-k // cfg["bwd_block_k"]))
    kern["bwd"][grid](
        s, t, labels, stats, g, ds if write_ds else s, dt if write_dt else t, n, k, s.stride(0), t.stride(0),
        sds, sdt, g_sf, g_sn, tau, 1.0 / tau, ignore_index,
        ROWS=cfg["bwd_rows"], BLOCK_K=cfg["bwd_block_k"], ADJUST=adjust, DETACH=detach,
        WRITE_DS=write_ds, WRITE_DT=write_dt, OFF64=off64, POW4=_pow4_exp(cfg, tau),
        num_warps=4 if cfg["bwd_rows"] * cfg["bwd_block_k"] <= 2048 else 8)


def _launch_bwd(grad_rows, s, t, labels, stats, tau, adjust, ignore_index, detach, need_ds, need_dt):
    s, t, labels = _prep(s, t, labels)
    n, k = s.shape
    cfg = _kd_config(n, k, s.element_size(), s.device)
    grad_rows = grad_rows.float()
    ds = torch.empty((n, k), dtype=s.dtype, device=s.device) if need_ds else s.new_empty(0)
    dt = torch.empty((n, k), dtype=t.dtype, device=t.device) if need_dt else t.new_empty(0)
    if (need_ds or need_dt) and n > 0:
        _launch_bwd_into(s, t, labels, stats, grad_rows, grad_rows.stride(0), grad_rows.stride(1), tau, adjust,
                         ignore_index, detach, ds, dt, need_ds, need_dt, cfg)
    return ds, dt


# ----------------------------------------------------------------------------------------------
# backend="auto": one warning and the torch path after a kernel failure; the custom ops
# ----------------------------------------------------------------------------------------------
# backend="auto" degrades instead of crashing on a GPU nobody tried: the first compile or launch
# failure of the kernel (an old GPU, a mismatched triton, a driver problem) is reported once and the
# PyTorch path serves the rest of the process. backend="triton" ("strict") always raises.
_KERNEL_FAILURE: str | None = None


def _auto_uses_kernel(x: torch.Tensor) -> bool:
    """backend="auto": the kernel for CUDA tensors, unless it failed earlier in this process."""
    return x.is_cuda and _kernel_usable()


def _kernel_usable() -> bool:
    # A triton that imports but cannot define the kernels counts as a kernel failure (warned once);
    # no triton at all is the documented torch-only setup and stays silent.
    if not triton_available() and _TRITON_DEFINE_ERROR is not None:
        _report_kernel_failure(_TRITON_DEFINE_ERROR)
    return triton_available() and _KERNEL_FAILURE is None


def _report_kernel_failure(exc: Exception) -> None:
    global _KERNEL_FAILURE
    if _KERNEL_FAILURE is None:
        lines = str(exc).strip().splitlines()
        _KERNEL_FAILURE = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        warnings.warn(f"kd_core: the Triton kernel failed ({_KERNEL_FAILURE}); backend='auto' uses the "
                      "PyTorch path for the rest of this process", RuntimeWarning, stacklevel=3)


def _kernel_runs_on(x: torch.Tensor, strict: bool = True) -> bool:
    # The kernel runs on CUDA tensors, and on CPU tensors under the Triton interpreter.
    return triton_available() and (x.is_cuda or _triton_interpreted()) and (strict or _KERNEL_FAILURE is None)


def _try_kernel(strict: bool, launch):
    """``launch()``; when not strict, a failure warns once, disables the kernel and returns None."""
    try:
        return launch()
    except torch.cuda.OutOfMemoryError:  # not a kernel problem: the torch path would need the memory too
        raise
    except Exception as exc:
        if strict:
            raise
        _report_kernel_failure(exc)
        return None


def _rows_torch(s, t, labels, tau, adjust, ignore_index, detach):
    return torch.stack(list(_distill_terms_torch(s, t, labels, tau, adjust, ignore_index, "none", detach)))


# torch.library custom ops: opaque to torch.compile (fake impls give the shapes), differentiable
# through register_autograd. On CPU tensors without the interpreter they run the torch math, so
# graphs that contain them stay portable (and testable) on any machine.
@torch.library.custom_op("pesf_kd::distill_fwd", mutates_args=())
def _op_distill_fwd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, tau: float, adjust: bool,
                    ignore_index: int, detach_targets: bool, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_runs_on(s, strict):
        out = _try_kernel(strict, lambda: _launch_fwd(s, t, labels, tau, adjust, ignore_index))
        if out is not None:
            return out[0], out[1]
    with torch.no_grad():
        rows = _rows_torch(s, t, labels, tau, adjust, ignore_index, detach_targets)
    return rows, torch.zeros((_N_STATS, s.shape[0]), dtype=torch.float32, device=s.device)


@_op_distill_fwd.register_fake
def _(s, t, labels, tau, adjust, ignore_index, detach_targets, strict=True):
    n = s.shape[0]
    return s.new_empty((7, n), dtype=torch.float32), s.new_empty((_N_STATS, n), dtype=torch.float32)


@torch.library.custom_op("pesf_kd::distill_bwd", mutates_args=())
def _op_distill_bwd(grad_rows: torch.Tensor, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                    stats: torch.Tensor, tau: float, adjust: bool, ignore_index: int, detach_targets: bool,
                    need_ds: bool, need_dt: bool, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_runs_on(s, strict):
        out = _try_kernel(strict, lambda: _launch_bwd(grad_rows, s, t, labels, stats, tau, adjust, ignore_index,
                                                      detach_targets, need_ds, need_dt))
        if out is not None:
            return out
    # Custom-op impls run below the autograd dispatch key: torch.func.vjp still differentiates there.
    _, vjp = torch.func.vjp(lambda a, b: _rows_torch(a, b, labels, tau, adjust, ignore_index, detach_targets), s, t)
    ds, dt = vjp(grad_rows.to(torch.float32))
    return (ds.contiguous() if need_ds else s.new_empty(0)), (dt.contiguous() if need_dt else t.new_empty(0))


@_op_distill_bwd.register_fake
def _(grad_rows, s, t, labels, stats, tau, adjust, ignore_index, detach_targets, need_ds, need_dt, strict=True):
    return (s.new_empty(s.shape) if need_ds else s.new_empty(0)), (t.new_empty(t.shape) if need_dt else t.new_empty(0))


def _distill_fwd_setup(ctx, inputs, output):
    s, t, labels, tau, adjust, ignore_index, detach_targets, strict = inputs
    ctx.save_for_backward(s, t, labels, output[1])
    ctx.args = (tau, adjust, ignore_index, detach_targets, strict)
    ctx.mark_non_differentiable(output[1])


def _distill_fwd_backward(ctx, grad_rows, grad_stats):
    s, t, labels, stats = ctx.saved_tensors
    tau, adjust, ignore_index, detach_targets, strict = ctx.args
    need_ds, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ds, dt = torch.ops.pesf_kd.distill_bwd(grad_rows, s, t, labels, stats, tau, adjust, ignore_index,
                                           detach_targets, need_ds, need_dt, strict)
    return (ds if need_ds else None), (dt if need_dt else None), None, None, None, None, None, None


_op_distill_fwd.register_autograd(_distill_fwd_backward, setup_context=_distill_fwd_setup)


def _count_valid(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).sum().clamp(min=1)


def _require_kernel(x: torch.Tensor) -> None:
    """backend='triton': a RuntimeError naming why the kernel cannot run on ``x``."""
    if not triton_available():
        cause = f" (defining the kernels failed: {type(_TRITON_DEFINE_ERROR).__name__}: {_TRITON_DEFINE_ERROR})" \
            if _TRITON_DEFINE_ERROR is not None else ""
        raise RuntimeError(f"backend='triton' needs the triton package and its fused kernel{cause}; "
                           "use backend='torch' or 'auto'")
    if not (x.is_cuda or _triton_interpreted()):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                           "imported, to run the kernel on CPU tensors); use backend='torch' or 'auto'")


def _distill_terms_triton(s, t, labels, tau, adjust, ignore_index, reduction, detach_targets,
                          strict: bool = True) -> DistillTerms:
    _require_kernel(s)
    rows, _ = torch.ops.pesf_kd.distill_fwd(s, t, labels, tau, adjust, ignore_index, detach_targets, strict)
    if reduction == "sum":
        rows = rows.sum(dim=1)
    elif reduction == "mean":
        rows = rows.sum(dim=1) / _count_valid(labels, ignore_index)
    return DistillTerms(*rows.unbind(0))


# ---- gradient-in-forward mode -------------------------------------------------------------------
# The loss weights are known before the forward, so the forward kernel writes ds and dt (into new
# buffers, never into s, t or anything autograd saved) and the backward only scales them by the
# incoming gradient, without reading it on the host: the rescale kernel compares it with the scale
# already applied on the device and touches the buffers only when they differ (a plain
# loss.backward() passes 1: no pass over the gradients). Under torch.compile, distill_loss uses the
# two-kernel path instead, whose backward kernel takes the incoming gradient as an input.
_WEIGHT_TENSORS: dict = {}


def _weight_tensor(weights: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [7] weight vector on ``device``, made once per distinct weights (no host-to-device copy
    per call: each entry is a device fill, so it can also be made while a CUDA graph is captured)."""
    key = (tuple(weights), str(device), dtype)
    if key not in _WEIGHT_TENSORS:
        if len(_WEIGHT_TENSORS) >= 64:   # a schedule that changes weights every step: keep it bounded
            _WEIGHT_TENSORS.clear()
        w = torch.empty(len(weights), dtype=dtype, device=device)
        for i, value in enumerate(weights):
            w[i].fill_(value)
        _WEIGHT_TENSORS[key] = w
    return _WEIGHT_TENSORS[key]


@torch.library.custom_op("pesf_kd::distill_loss_fused", mutates_args=())
def _op_distill_loss(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, weights: list[float], tau: float,
                     adjust: bool, ignore_index: int, detach_targets: bool, reduction: str, need_ds: bool,
                     need_dt: bool, strict: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w = _weight_tensor(weights, s.device)
    g = w / _count_valid(labels, ignore_index).float() if reduction == "mean" else w
    fused = _try_kernel(strict, lambda: _launch_fwd(s, t, labels, tau, adjust, ignore_index,
                                                    grad=(g, detach_targets, need_ds, need_dt))) \
        if _kernel_runs_on(s, strict) else None
    if fused is not None:
        rows, _, ds, dt = fused
    else:
        rows, vjp = torch.func.vjp(
            lambda a, b: _rows_torch(a, b, labels, tau, adjust, ignore_index, detach_targets), s, t)
        ds, dt = vjp(g[:, None].expand_as(rows).contiguous())
        ds = ds.contiguous() if need_ds else s.new_empty(0)
        dt = dt.contiguous() if need_dt else t.new_empty(0)
    loss = (rows * g[:, None]).sum()
    return loss, rows, ds, dt


@_op_distill_loss.register_fake
def _(s, t, labels, weights, tau, adjust, ignore_index, detach_targets, reduction, need_ds, need_dt, strict=True):
    n = s.shape[0]
    return (s.new_empty((), dtype=torch.float32), s.new_empty((7, n), dtype=torch.float32),
            s.new_empty(s.shape) if need_ds else s.new_empty(0), t.new_empty(t.shape) if need_dt else t.new_empty(0))


def _distill_loss_setup(ctx, inputs, output):
    _, rows, ds, dt = output
    ctx.mark_non_differentiable(rows, ds, dt)
    # Held as attributes (not save_for_backward) so that autograd never "steals" the buffer into a
    # .grad that a later in-place op (zero_grad) could modify while the graph is retained.
    ctx.ds, ctx.dt = ds, dt
    # The scale the buffers hold now (a retained graph's second backward rescales from it).
    ctx.applied = torch.ones((), dtype=torch.float32, device=ds.device)


def _launch_rescale(x: torch.Tensor, g_loss: torch.Tensor, applied: torch.Tensor) -> None:
    block = 4096
    _triton_kernels()["rescale"][(-(-x.numel() // block),)](x, x.numel(), g_loss, applied, BLOCK=block)


def _rescale_(x: torch.Tensor, g_loss: torch.Tensor, applied: torch.Tensor) -> None:
    if _kernel_runs_on(x):
        _launch_rescale(x, g_loss, applied)
    else:  # the torch fallback of a failed kernel: no kernel to scale in
        x.mul_((g_loss.float() / applied).to(x.dtype))


def _distill_loss_backward(ctx, g_loss, g_rows, g_ds, g_dt):
    need_ds = ctx.needs_input_grad[0] and ctx.ds.numel() > 0
    need_dt = ctx.needs_input_grad[1] and ctx.dt.numel() > 0
    g_loss = g_loss.float().contiguous()
    for x, needed in ((ctx.ds, need_ds), (ctx.dt, need_dt)):
        if needed:
            _rescale_(x, g_loss, ctx.applied)
    ctx.applied.copy_(g_loss)
    return ((ctx.ds if need_ds else None), (ctx.dt if need_dt else None),
            None, None, None, None, None, None, None, None, None, None)


_op_distill_loss.register_autograd(_distill_loss_backward, setup_context=_distill_loss_setup)


# ----------------------------------------------------------------------------------------------
# distill_linear's chunk loop
# ----------------------------------------------------------------------------------------------
_LINEAR_TERMS = ("kl_ts", "ce_s", "kl_st", "ce_t")
_STUDENT_TERMS = ("kl_ts", "ce_s")
_TEACHER_TERMS = ("kl_st", "ce_t")
# Bytes per logit element of one chunk's [rows, V] temporaries, measured (peak RSS, V = 32,000):
# the autograd path (reverse KL, JSD) holds ~17 fp32 buffers, the analytic forward-KL path ~6; the
# kernel path the two logit chunks and the two gradient chunks in the input dtype and one fp32 copy.
_CHUNK_BYTES = {"autograd": 68, "forward": 24}


def _linear_chunk_rows(n: int, vocab: int, elem_size: int, path: str, memory_budget: int) -> int:
    per_row = vocab * (4 * elem_size + 4 if path == "kernel" else _CHUNK_BYTES[path])
    return max(1, min(n, memory_budget // per_row))


class _LinearPlan(NamedTuple):
    tau: float
    weights: list          # per _FIELDS, 0 where absent
    adjust: bool
    divergence: str
    beta: float
    ignore_index: int
    reduction: str
    chunk: int
    kernel: bool
    strict: bool


def _chunk_grads_torch(zs, zt, labels, g, plan: _LinearPlan, need_s: bool, need_t: bool):
    """One chunk's per-row terms [7, C] and the gradients of sum(g * rows) w.r.t. its logits (fp32)."""
    zs32 = _math(zs).detach().requires_grad_(need_s)
    zt32 = _math(zt).detach().requires_grad_(need_t)
    needed = frozenset(f for f, wf in zip(_FIELDS, plan.weights) if wf != 0.0)
    with torch.enable_grad():
        rows = torch.stack(list(_distill_terms_torch(
            zs32, zt32, labels, plan.tau, plan.adjust, plan.ignore_index, "none", True, plan.divergence,
            plan.beta, needed)))
        rows = torch.where(g[:, None] != 0, rows, 0.0)   # unweighted terms are NaN (not computed)
        inputs = [x for x in (zs32, zt32) if x.requires_grad]
        grads = iter(torch.autograd.grad((rows * g[:, None]).sum(), inputs)) if inputs else iter(())
    return rows.detach(), (next(grads) if need_s else None), (next(grads) if need_t else None)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot product without a [rows, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax_(x: torch.Tensor, tau: float) -> torch.Tensor:
    """``x <- log_softmax(x / tau)`` in place; returns the per-row logsumexp of ``x / tau``."""
    x.div_(tau)
    lse = torch.logsumexp(x, dim=-1)
    x.sub_(lse[:, None])
    return lse


def _swap_(x: torch.Tensor, top: torch.Tensor, labels: torch.Tensor) -> None:
    """Label adjustment in place: entries ``top`` and ``labels`` of each row trade places."""
    top, labels = top[:, None], labels[:, None]
    at_top, at_label = x.gather(1, top), x.gather(1, labels)
    x.scatter_(1, top, at_label).scatter_(1, labels, at_top)


def _chunk_grads_forward_kl(zs, zt, labels, g, plan: _LinearPlan, need_s: bool, need_t: bool):
    """Forward KL with detached targets, the kernel's closed-form gradients in torch:
    d kl_ts / d s = tau (p_s - adj(p_t)), d ce_s / d s = softmax(s) - onehot(y) (teacher alike).
    The logit chunks become their log-probabilities in place, so a chunk holds ~6 [rows, V] buffers
    instead of the autograd path's ~17 (3x larger chunks, 3x fewer passes over the LM heads)."""
    tau, (w_kts, w_kst, w_ces, w_cet) = plan.tau, plan.weights[:4]
    labels = labels.long()
    valid = labels != plan.ignore_index
    y = torch.where(valid, labels, 0)
    s, t = zs.to(g.dtype), zt.to(g.dtype)    # the caller's fresh GEMM outputs: ours to overwrite
    del zs, zt
    rows = torch.zeros((len(_FIELDS), s.shape[0]), dtype=g.dtype, device=s.device)
    top_s, top_t = s.argmax(dim=1), t.argmax(dim=1)
    lse1_s = torch.logsumexp(s, dim=1) if w_ces else None
    lse1_t = torch.logsumexp(t, dim=1) if w_cet else None
    if w_ces:
        rows[2] = lse1_s - s.gather(1, y[:, None]).squeeze(1)
    if w_cet:
        rows[3] = lse1_t - t.gather(1, y[:, None]).squeeze(1)
    ls, lt = _log_softmax_(s, tau), _log_softmax_(t, tau)     # s, t now hold log p_s, log p_t
    grads = []
    # (learner log-probs, its lse at 1/tau, its tau = 1 lse, target log-probs, target argmax, weights, needed)
    for k, (log_l, l_lse, lse1, log_tg, top_tg, w_kl, g_kl, g_ce, need) in enumerate((
            (s, ls, lse1_s, t, top_t, w_kts, g[0], g[2], need_s),
            (t, lt, lse1_t, s, top_s, w_kst, g[1], g[3], need_t))):
        grad = None
        if w_kl:
            q = log_tg.exp()
            neg_entropy = _row_dot(q, log_tg)          # the same for adj(q): a permutation
            if plan.adjust:
                _swap_(q, top_tg, y)
            rows[k] = tau * tau * (neg_entropy - _row_dot(q, log_l))
            if need:
                grad = log_l.exp().sub_(q).mul_(tau * g_kl)
            del q
        if need and (w_ces if k == 0 else w_cet):
            # softmax at tau = 1 from the log-probs at 1/tau: z = tau (log p + lse)
            p1 = (log_l * tau).add_((tau * l_lse - lse1)[:, None]).exp_().mul_(g_ce)
            grad = p1 if grad is None else grad.add_(p1)
            grad.scatter_add_(1, y[:, None], (-g_ce).expand(y.shape[0], 1).to(grad.dtype))
            del p1
        if grad is not None:
            grad.mul_(valid[:, None])
        grads.append(grad)
    rows = rows * valid
    return rows, grads[0], grads[1]


def _chunk_grads_kernel(zs, zt, labels, g, plan: _LinearPlan, need_s: bool, need_t: bool):
    """The fused kernel in gradient-in-forward mode: the chunk's logits read once, gradients written once."""
    out = _try_kernel(plan.strict, lambda: _launch_fwd(zs, zt, labels, plan.tau, plan.adjust, plan.ignore_index,
                                                       grad=(g, True, need_s, need_t)))
    if out is None:   # backend="auto" and the kernel failed: warned once, the torch math from now on
        return _chunk_grads_torch(zs, zt, labels, g, plan, need_s, need_t)
    rows, _, ds, dt = out
    return rows, (ds if need_s else None), (dt if need_t else None)


def _gemm_in_input_dtype(x: torch.Tensor) -> bool:
    """Weight gradients of 16-bit inputs: on a GPU a bf16/fp16 GEMM (fp32 accumulation inside cuBLAS) is
    ~10x faster than an fp32 one, so each chunk's product is formed in the input dtype and added to the
    fp32 accumulator; on a CPU the GEMM runs in fp32 into the accumulator, with no [V, H] temporary.
    (A seam: CPU tests force the GPU choice.)"""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` accumulated in ``acc``'s (fp32/fp64) precision."""
    if _gemm_in_input_dtype(b):
        acc.add_(a.to(b.dtype) @ b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _DistillLinear(torch.autograd.Function):
    """Chunk by chunk: logits = h W^T (+ b), the terms and their logit gradients, then the hidden and
    weight gradients; everything is computed in the forward (the weights of the loss are known) and
    the backward only scales the saved [N, H] / [V, H] gradients by the incoming gradient."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, plan: _LinearPlan):
        need = [ctx.needs_input_grad[i] for i in range(6)]
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        w = _weight_tensor(plan.weights, hs.device, acc)
        g = w / _count_valid(labels, plan.ignore_index).to(acc) if plan.reduction == "mean" else w
        need_s = any(need[:3]) and any(plan.weights[_FIELDS.index(f)] for f in _STUDENT_TERMS)
        need_t = any(need[3:]) and any(plan.weights[_FIELDS.index(f)] for f in _TEACHER_TERMS)
        grad_hs = torch.zeros_like(hs) if need[0] and need_s else None
        grad_ht = torch.zeros_like(ht) if need[3] and need_t else None
        grad_ws = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need[1] and need_s else None
        grad_wt = torch.zeros(wt.shape, dtype=acc, device=wt.device) if need[4] and need_t else None
        grad_bs = torch.zeros(ws.shape[0], dtype=acc, device=ws.device) if need[2] and need_s else None
        grad_bt = torch.zeros(wt.shape[0], dtype=acc, device=wt.device) if need[5] and need_t else None
        loss = torch.zeros((), dtype=acc, device=hs.device)
        chunk_grads = _chunk_grads_kernel if plan.kernel else \
            _chunk_grads_forward_kl if plan.divergence == "forward" else _chunk_grads_torch
        for start in range(0, hs.shape[0], plan.chunk):
            rows_slice = slice(start, start + plan.chunk)
            hs_c, ht_c, y_c = hs[rows_slice], ht[rows_slice], labels[rows_slice]
            # The logit chunks are handed over (no reference kept here): the torch path overwrites them.
            rows, dzs, dzt = chunk_grads(F.linear(hs_c, ws, bs), F.linear(ht_c, wt, bt), y_c, g, plan,
                                         need_s, need_t)
            loss = loss + (rows * g[:, None].to(rows.dtype)).sum()
            for dz, h_c, wgt, grad_h, grad_w, grad_b in ((dzs, hs_c, ws, grad_hs, grad_ws, grad_bs),
                                                         (dzt, ht_c, wt, grad_ht, grad_wt, grad_bt)):
                if dz is None:
                    continue
                if grad_w is not None:
                    _add_matmul_(grad_w, dz.t(), h_c)
                dz = dz.to(h_c.dtype)
                if grad_h is not None:
                    grad_h[rows_slice] = dz @ wgt
                if grad_b is not None:
                    grad_b += dz.sum(dim=0, dtype=acc)
        ctx.grads = [grad_hs, grad_ws, grad_bs, grad_ht, grad_wt, grad_bt]
        ctx.dtypes = [hs.dtype, ws.dtype, None if bs is None else bs.dtype,
                      ht.dtype, wt.dtype, None if bt is None else bt.dtype]
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        # Scaled in place and handed over (autograd then keeps the tensor as .grad, no copy): the
        # gradients exist once, so this backward runs once.
        if ctx.grads is None:
            raise RuntimeError("distill_linear's backward runs once (its gradients are made in the forward); "
                               "call distill_linear again instead of retain_graph=True")
        grads, ctx.grads = ctx.grads, None
        out = [None if grad is None else grad.mul_(g_loss).to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
        return (*out, None, None)
