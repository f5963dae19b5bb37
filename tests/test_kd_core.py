"""kd_core's PyTorch path against independent float64 references written from SPEC §1, §2 and §5.

The references below use numpy and explicit per-row loops; none of them calls kd_core.
"""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from kd_core import (Adapter, ConsistencyMeter, LoRALinear, ParallelAdapter, agreement, distill_terms, kl_div,
                     label_adjust, linear_cka, probability_loyalty, sharpness, sharpness_gap)

IGNORE = -100
FIELDS = ("kl_ts", "kl_st", "ce_s", "ce_t", "lse_s", "lse_t", "gap")


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------
def ref_lse(z: np.ndarray) -> float:
    m = z.max()  # max-subtraction: exp never overflows
    return float(m + np.log(np.exp(z - m).sum()))


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    return z - ref_lse(z)


def ref_argmax(z: np.ndarray) -> int:
    top = 0
    for k in range(len(z)):
        if z[k] > z[top]:  # strict: ties keep the lowest index, like torch.argmax
            top = k
    return top


def ref_adjust_row(z: np.ndarray, y: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §1 label adjustment of one row: returns (adjusted row, perm) with adjusted == z[perm]."""
    perm = np.arange(len(z))
    if y != IGNORE:
        top = ref_argmax(z)
        perm[top], perm[y] = y, top
    return z[perm], perm


def ref_kl_row(target: np.ndarray, learner: np.ndarray, tau: float) -> tuple[float, np.ndarray, np.ndarray]:
    """tau^2 KL(p^tau(target) || p^tau(learner)) (eq. 1) and its SPEC §5 gradients: (value, d/dtarget, d/dlearner)."""
    log_q, log_p = ref_log_softmax(target / tau), ref_log_softmax(learner / tau)
    q, p = np.exp(log_q), np.exp(log_p)
    d = log_q - log_p
    return tau * tau * float((q * d).sum()), tau * q * (d - (q * d).sum()), tau * (p - q)


def ref_distill(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float, adjust: bool, detach: bool):
    """Per-row values of every field and the per-row gradients d field_i / d s_i, d field_i / d t_i."""
    n, k = s.shape
    vals = {f: np.zeros(n) for f in FIELDS}
    grads = {f: (np.zeros((n, k)), np.zeros((n, k))) for f in FIELDS}
    for i in range(n):
        yi = int(y[i])
        if yi == IGNORE:
            continue
        rows = (s[i], t[i])
        # kl_ts: target adj(t), learner s;  kl_st: target adj(s), learner t.
        for name, tgt_side, lrn_side in (("kl_ts", 1, 0), ("kl_st", 0, 1)):
            target, perm = ref_adjust_row(rows[tgt_side], yi) if adjust else (rows[tgt_side], np.arange(k))
            value, d_target, d_learner = ref_kl_row(target, rows[lrn_side], tau)
            vals[name][i] = value
            grads[name][lrn_side][i] += d_learner
            if not detach:
                grads[name][tgt_side][i][perm] += d_target  # the swap's gradient is the permutation back
        for side, (lse_name, ce_name) in enumerate((("lse_s", "ce_s"), ("lse_t", "ce_t"))):
            z = rows[side]
            softmax = np.exp(ref_log_softmax(z))
            vals[lse_name][i] = ref_lse(z)
            vals[ce_name][i] = ref_lse(z) - z[yi]
            grads[lse_name][side][i] = softmax
            grads[ce_name][side][i] = softmax - np.eye(k)[yi]
        vals["gap"][i] = vals["lse_t"][i] - vals["lse_s"][i]
        grads["gap"][0][i], grads["gap"][1][i] = -grads["lse_s"][0][i], grads["lse_t"][1][i]
    return vals, grads


def ref_pl_row(p: np.ndarray, q: np.ndarray) -> float:
    """Probability loyalty of Xu et al. 2021: 1 - sqrt(JSD(p || q)), JSD in bits."""
    m = (p + q) / 2
    kl = lambda a: sum(a[k] * math.log2(a[k] / m[k]) for k in range(len(a)) if a[k] > 0)
    return 1.0 - math.sqrt(0.5 * kl(p) + 0.5 * kl(q))


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) from centred Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    gram_x, gram_y = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2
    return float(hsic(gram_x, gram_y) / math.sqrt(hsic(gram_x, gram_x) * hsic(gram_y, gram_y)))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def close(actual: torch.Tensor | float, expected, rtol: float, atol: float) -> None:
    actual = np64(actual) if isinstance(actual, torch.Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def make_case(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits and labels with: a row whose teacher argmax is the label (no swap), one where it is not
    (swap), a teacher tie and a student tie whose lowest index is not the label, and an ignored row."""
    g = np.random.default_rng(seed)
    s, t = 2.0 * g.normal(size=(n, k)), 3.0 * g.normal(size=(n, k))
    y = g.integers(0, k, size=n)
    y[0] = t[0].argmax()
    y[1] = (t[1].argmax() + 1) % k
    t[2, 0] = t[2, k - 1] = t[2].max() + 1.0
    s[3, 0] = s[3, k - 1] = s[3].max() + 1.0
    y[2] = y[3] = k - 1
    y[-1] = IGNORE
    return s, t, y


def check_distill(s: torch.Tensor, t: torch.Tensor, y: np.ndarray, tau: float, adjust: bool, detach: bool,
                  reduction: str, val_tol: tuple[float, float], grad_tol: tuple[float, float]) -> None:
    """Values and gradients of every field against ref_distill on the float64 values of s and t."""
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    labels = torch.from_numpy(y).long()
    out = distill_terms(s, t, labels, tau, adjust=adjust, reduction=reduction, detach_targets=detach,
                        backend="torch")
    vals, grads = ref_distill(np64(s), np64(t), y, tau, adjust, detach)
    scale = 1 / max(int((y != IGNORE).sum()), 1) if reduction == "mean" else 1.0  # mean: over non-ignored rows
    rtol, atol = grad_tol
    g = torch.Generator().manual_seed(0)
    for name in FIELDS:
        value = getattr(out, name)
        if reduction == "none":
            expected, upstream = vals[name], torch.randn(len(y), generator=g, dtype=torch.float64)
            weights = upstream.numpy()
        else:
            expected = vals[name].sum() * scale
            upstream = torch.randn((), generator=g, dtype=torch.float64)
            weights = np.full(len(y), upstream.item() * scale)
        assert value.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
        close(value, expected, *val_tol)
        ds, dt = torch.autograd.grad(value, (s, t), upstream.to(value.dtype), retain_graph=True,
                                     materialize_grads=True)
        assert ds.dtype == s.dtype and dt.dtype == t.dtype, "gradients come back in the input dtype"
        for actual, ref in ((ds, grads[name][0]), (dt, grads[name][1])):
            ref = weights[:, None] * ref
            close(actual, ref, rtol, atol * max(1.0, np.abs(ref).max()))


# ----------------------------------------------------------------------------------------------
# label_adjust
# ----------------------------------------------------------------------------------------------
def test_label_adjust_hand_made() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0],    # argmax 1 != label 0: swap
                      [5.0, 0.0, 1.0],    # argmax 0 == label 0: unchanged
                      [3.0, 3.0, 1.0],    # tie: argmax is index 0 (lowest), label 2
                      [0.0, 1.0, 4.0]])   # ignored
    y = torch.tensor([0, 0, 2, IGNORE])
    out = label_adjust(z, y)
    expected = torch.tensor([[3.0, 1.0, 2.0], [5.0, 0.0, 1.0], [1.0, 3.0, 3.0], [0.0, 1.0, 4.0]])
    assert torch.equal(out, expected)
    assert torch.equal(z[0], torch.tensor([1.0, 3.0, 2.0])), "out of place"


@pytest.mark.parametrize("k", [2, 3, 100])
def test_label_adjust_values_and_gradient(k: int) -> None:
    s, t, y = make_case(8, k, seed=k)
    z = torch.from_numpy(t).requires_grad_()
    out = label_adjust(z, torch.from_numpy(y))
    upstream = torch.randn(8, k, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, z, upstream)
    for i in range(8):
        adjusted, perm = ref_adjust_row(t[i], int(y[i]))
        assert np.array_equal(np64(out[i]), adjusted)
        expected = np.empty(k)
        expected[perm] = upstream[i].numpy()  # out = z[perm]  =>  dz[perm] = upstream
        assert np.array_equal(np64(grad[i]), expected)


# ----------------------------------------------------------------------------------------------
# sharpness, sharpness_gap, kl_div
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_sharpness_and_gap_are_stable(dtype: torch.dtype, atol: float) -> None:
    g = np.random.default_rng(1)
    t = torch.from_numpy(1e4 + 3 * g.normal(size=(5, 7))).to(dtype)
    s = torch.from_numpy(-1e4 + 3 * g.normal(size=(5, 7))).to(dtype)
    assert torch.isinf(torch.log(torch.exp(t).sum(1))).all(), "the naive formula overflows here"
    lse_t = np.array([ref_lse(row) for row in np64(t)])
    lse_s = np.array([ref_lse(row) for row in np64(s)])
    close(sharpness(t), lse_t, 1e-12, atol)
    close(sharpness(s), lse_s, 1e-12, atol)
    close(sharpness_gap(s, t), lse_t - lse_s, 1e-12, 2 * atol)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_div(tau: float, reduction: str) -> None:
    g = np.random.default_rng(2)
    tgt = torch.from_numpy(2 * g.normal(size=(6, 10))).requires_grad_()
    lrn = torch.from_numpy(2 * g.normal(size=(6, 10))).requires_grad_()
    rows = [ref_kl_row(a, b, tau) for a, b in zip(np64(tgt), np64(lrn))]
    per_row = np.array([r[0] for r in rows])
    scale = {"batchmean": 1 / 6, "sum": 1.0, "none": 1.0}[reduction]
    out = kl_div(lrn, tgt, tau, reduction=reduction)
    close(out, per_row if reduction == "none" else per_row.sum() * scale, 1e-10, 1e-12)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    d_tgt, d_lrn = torch.autograd.grad(out, (tgt, lrn), upstream)
    w = (upstream.numpy() if reduction == "none" else np.full(6, upstream.item())) * scale
    close(d_tgt, w[:, None] * np.stack([r[1] for r in rows]), 1e-9, 1e-12)
    close(d_lrn, w[:, None] * np.stack([r[2] for r in rows]), 1e-9, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_div_low_precision_is_fp32_math(dtype: torch.dtype) -> None:
    tgt = (3 * torch.randn(4, 50)).to(dtype).requires_grad_()
    lrn = (3 * torch.randn(4, 50)).to(dtype).requires_grad_()
    out = kl_div(lrn, tgt, 2.0)
    assert out.dtype == torch.float32
    close(out, np.mean([ref_kl_row(a, b, 2.0)[0] for a, b in zip(np64(tgt), np64(lrn))]), 1e-5, 1e-6)
    out.backward()
    assert tgt.grad.dtype == dtype and lrn.grad.dtype == dtype


# ----------------------------------------------------------------------------------------------
# distill_terms
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 100, 1000])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("adjust", [True, False])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_terms_float64(k: int, tau: float, adjust: bool, detach: bool, reduction: str) -> None:
    s, t, y = make_case(6, k, seed=k + int(tau))
    check_distill(torch.from_numpy(s), torch.from_numpy(t), y, tau, adjust, detach, reduction,
                  val_tol=(1e-10, 1e-10), grad_tol=(1e-9, 1e-12))


@pytest.mark.parametrize("dtype, val_tol, grad_tol", [
    (torch.float32, (1e-5, 1e-4), (1e-4, 1e-6)),
    (torch.bfloat16, (1e-5, 1e-4), (1e-2, 1e-2)),  # grads rounded to bf16 (8 bits of mantissa)
    (torch.float16, (1e-5, 1e-4), (2e-3, 2e-3)),
])
@pytest.mark.parametrize("k", [3, 100, 1000])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_distill_terms_low_precision(dtype: torch.dtype, val_tol, grad_tol, k: int, tau: float) -> None:
    # fp32 math: compare against the float64 reference of the inputs as stored in `dtype`.
    s, t, y = make_case(6, k, seed=3 * k)
    for reduction in ("mean", "none"):
        check_distill(torch.from_numpy(s).to(dtype), torch.from_numpy(t).to(dtype), y, tau, True, False,
                      reduction, val_tol, grad_tol)


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("adjust", [True, False])
def test_distill_terms_gradcheck(k: int, tau: float, adjust: bool) -> None:
    # The full per-row Jacobian (reduction="none"; the reductions are pinned by the analytic tests).
    # Random float64 logits have no argmax ties, so the swap is locally constant; the last row is ignored.
    g = torch.Generator().manual_seed(k)
    s = torch.randn(4, k, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, k, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([int(t[0].argmax()), (int(t[1].argmax()) + 1) % k, k - 1, IGNORE])
    fn = lambda a, b: tuple(distill_terms(a, b, y, tau, adjust=adjust, reduction="none", backend="torch"))
    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_terms_all_rows_ignored(reduction: str) -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    out = distill_terms(s, t, torch.full((3,), IGNORE), 2.0, reduction=reduction)
    for name in FIELDS:
        value = getattr(out, name)
        assert torch.equal(value, torch.zeros_like(value)), name
        ds, dt = torch.autograd.grad(value.sum(), (s, t), retain_graph=True, materialize_grads=True)
        assert not ds.any() and not dt.any(), name


def test_distill_terms_custom_ignore_index() -> None:
    s, t, y = make_case(5, 4, seed=5)
    y[-1] = 7  # out of [0, K) but equal to ignore_index
    out = distill_terms(torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(y), 2.0, adjust=True, ignore_index=7,
                        reduction="none")
    y[-1] = IGNORE
    vals, _ = ref_distill(s, t, y, 2.0, True, False)
    for name in FIELDS:
        close(getattr(out, name), vals[name], 1e-10, 1e-12)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
S, T, Y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, IGNORE])


@pytest.mark.parametrize("call, pattern", [
    (lambda: distill_terms(S, T[:, :3], Y), r"student_logits and teacher_logits.*\(4, 5\).*\(4, 3\)"),
    (lambda: distill_terms(S, T, torch.tensor([0, 1, 5, 0])), r"labels.*5.*\(4, 5\)"),
    (lambda: distill_terms(S, T, torch.tensor([0, -1, 2, 0])), r"labels.*-1"),
    (lambda: distill_terms(S, T, Y[:3]), r"labels.*\[4\].*\(3,\)"),
    (lambda: distill_terms(S, T, Y.float()), r"labels"),
    (lambda: distill_terms(S.long(), T, Y), r"student_logits"),
    (lambda: distill_terms(S, T.int(), Y), r"teacher_logits"),
    (lambda: distill_terms(S[0], T[0], Y[:1]), r"student_logits.*\[N, K\] or \[B, S, K\].*\(5,\)"),
    (lambda: distill_terms(S, T, Y, tau=0.0), r"tau"),
    (lambda: distill_terms(S, T, Y, tau=-1.0), r"tau"),
    (lambda: kl_div(T[:3], S), r"student_logits and teacher_logits.*\(3, 5\).*\(4, 5\)"),
    (lambda: kl_div(T, S, tau=0), r"tau"),
    (lambda: kl_div(T, S.long()), r"teacher_logits"),
    (lambda: label_adjust(S, torch.tensor([0, 1, 2, 9])), r"labels.*9"),
    (lambda: label_adjust(S[0], Y[:1]), r"logits"),
    (lambda: sharpness_gap(S[:, :2], T), r"student_logits and teacher_logits"),
    (lambda: sharpness(S.int()), r"logits"),
])
def test_bad_input_raises_value_error(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


# ----------------------------------------------------------------------------------------------
# consistency metrics
# ----------------------------------------------------------------------------------------------
def _features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 6)) + 2.0  # non-zero mean: centring matters
    y = x @ g.normal(size=(6, 4)) + 0.5 * g.normal(size=(n, 4))
    return x, y


def test_linear_cka_definition_and_invariances() -> None:
    x, y = _features(40, seed=3)
    expected = ref_cka(x, y)
    assert 0.1 < expected < 0.99
    close(linear_cka(torch.from_numpy(x), torch.from_numpy(y)), expected, 1e-10, 0)
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    for xx, yy in ((x @ q, y), (3.7 * x, 0.2 * y), (x + 5.0, y - 1.0)):
        close(linear_cka(torch.from_numpy(xx), torch.from_numpy(yy)), expected, 1e-9, 0)
    close(linear_cka(torch.from_numpy(x), torch.from_numpy(x)), 1.0, 1e-12, 0)


def test_probability_loyalty_hand_made() -> None:
    z = torch.randn(5, 7, dtype=torch.float64)
    close(probability_loyalty(z, z.clone()), 1.0, 0, 1e-7)  # identical distributions
    one_hot = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)  # p ~ (1, 1e-26, 1e-26)
    close(probability_loyalty(one_hot[:, [1, 0, 2]], one_hot), 0.0, 0, 1e-9)  # disjoint
    # p = (1/4, 3/4), q = (1/2, 1/2), m = (3/8, 5/8): JSD ~ 0.048795 bits, PL ~ 0.779104
    jsd = 0.5 * (0.25 * math.log2(2 / 3) + 0.75 * math.log2(6 / 5)) + 0.5 * (0.5 * math.log2(4 / 3)
                                                                            + 0.5 * math.log2(4 / 5))
    t = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    close(probability_loyalty(s, t), 1.0 - math.sqrt(jsd), 1e-10, 0)
    close(probability_loyalty(t, s), 1.0 - math.sqrt(jsd), 1e-10, 0)


def test_agreement_hand_made() -> None:
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 4.0, 0.0]])  # argmax 0 1 2 0
    t = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # argmax 0 2 2 1
    assert agreement(s, t).item() == 50.0


# kl and gap are fp32 per batch (SPEC §1), summed in float64; the rest is float64 throughout.
META_RTOL = {"kl": 1e-6, "gap": 1e-6, "agreement": 0, "pl": 1e-12, "cka_logits": 1e-10, "cka_features": 1e-10}


def _meter_data(n: int = 30, k: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    t = 2 * torch.randn(n, k, generator=g)
    s = t + torch.randn(n, k, generator=g)
    fs, ft = (torch.from_numpy(a).float() for a in _features(n, seed=7))
    return {"s": s, "t": t, "fs": fs, "ft": ft}


def _feed(meter: ConsistencyMeter, data: dict[str, torch.Tensor], rows: slice, sizes: list[int]) -> None:
    start = rows.start
    for size in sizes:
        part = slice(start, start + size)
        meter.update(data["s"][part], data["t"][part], data["fs"][part], data["ft"][part])
        start += size
    assert start == rows.stop


def _meter_reference(data: dict[str, torch.Tensor]) -> dict[str, float]:
    s, t, fs, ft = (np64(data[key]) for key in ("s", "t", "fs", "ft"))
    softmax = lambda z: np.exp(ref_log_softmax(z))
    return {"kl": np.mean([ref_kl_row(a, b, 1.0)[0] for a, b in zip(t, s)]),
            "gap": np.mean([ref_lse(a) - ref_lse(b) for a, b in zip(t, s)]),
            "agreement": 100.0 * np.mean([ref_argmax(a) == ref_argmax(b) for a, b in zip(s, t)]),
            "pl": np.mean([ref_pl_row(softmax(a), softmax(b)) for a, b in zip(t, s)]),
            "cka_logits": ref_cka(s, t), "cka_features": ref_cka(fs, ft)}


def test_consistency_meter_streaming_equals_one_shot() -> None:
    data = _meter_data()
    streamed, one_shot = ConsistencyMeter(), ConsistencyMeter()
    _feed(streamed, data, slice(0, 30), [7, 13, 10])
    _feed(one_shot, data, slice(0, 30), [30])
    got = streamed.compute()
    for key, value in one_shot.compute().items():
        close(got[key], value, META_RTOL[key], 1e-12)
    for key, value in _meter_reference(data).items():
        close(got[key], value, 1e-5, 1e-6)
    close(got["cka_features"], linear_cka(data["fs"], data["ft"]), 1e-10, 0)


def _gloo_worker(rank: int, world: int, port: int, data: dict[str, torch.Tensor], out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: keep OpenMP out of it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        meter = ConsistencyMeter()
        # Uneven shares: rank 0 gets rows 0..11 in two batches, rank 1 rows 12..29 in three.
        if rank == 0:
            _feed(meter, data, slice(0, 12), [5, 7])
        else:
            _feed(meter, data, slice(12, 30), [6, 6, 6])
        first, second = meter.compute(), meter.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([first, second]))
        dist.barrier()  # no rank closes its connections while the other may still use them
    finally:
        dist.destroy_process_group()


def test_consistency_meter_all_reduce_gloo(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = _meter_data()
    # fork, not spawn: a spawned child re-imports torch (~15 s here instead of <1 s).
    torch.multiprocessing.start_processes(_gloo_worker, args=(2, port, data, str(tmp_path)), nprocs=2,
                                          start_method="fork")
    single = ConsistencyMeter()
    _feed(single, data, slice(0, 30), [30])
    expected = single.compute()
    for rank in range(2):
        for result in json.loads((tmp_path / f"rank{rank}.json").read_text()):  # compute() twice: idempotent
            for key, value in expected.items():
                close(result[key], value, META_RTOL[key], 1e-12)


# ----------------------------------------------------------------------------------------------
# adapters (SPEC §2): identity at initialisation, trainable, the same computation in train and eval
# ----------------------------------------------------------------------------------------------
def _channels_last(fn):
    return lambda x: fn(x.movedim(1, -1)).movedim(-1, 1)


def _bottleneck(down: nn.Module, up: nn.Module):
    """f(x W_down) W_up written with plain matmuls from the module's weights (1x1 convs as matrices)."""
    wd, wu = down.weight.flatten(1), up.weight.flatten(1)
    return lambda x: torch.relu(x @ wd.T + down.bias) @ wu.T + up.bias


def _adapter_case(name: str):
    """(module, input, function of the module giving the output at initialisation, reference forward)."""
    torch.manual_seed(0)
    if name == "adapter":
        m = Adapter(8, bottleneck=4)
        return m, torch.randn(5, 8), lambda x: x, lambda x: x + _bottleneck(m.down, m.up)(x)
    if name == "adapter_conv":
        m = Adapter(8, bottleneck=4, conv=True)
        return m, torch.randn(2, 8, 3, 3), lambda x: x, lambda x: x + _channels_last(_bottleneck(m.down, m.up))(x)
    if name == "parallel":
        m = ParallelAdapter(8, 6, bottleneck=4, scale=2.0, sublayer=nn.Linear(8, 6))
        sub = lambda x: x @ m.sublayer.weight.T + m.sublayer.bias
        return m, torch.randn(5, 8), sub, lambda x: sub(x) + 2.0 * _bottleneck(m.down, m.up)(x)
    if name == "parallel_identity":
        m = ParallelAdapter(8, bottleneck=4)
        return m, torch.randn(5, 8), lambda x: x, lambda x: x + 4.0 * _bottleneck(m.down, m.up)(x)
    m = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0)
    base = lambda x: x @ m.base.weight.T + m.base.bias
    return m, torch.randn(5, 8), base, lambda x: base(x) + 2.0 * (x @ m.lora_a.T) @ m.lora_b.T  # alpha / r = 2


@pytest.mark.parametrize("name", ["adapter", "adapter_conv", "parallel", "parallel_identity", "lora"])
def test_adapter(name: str) -> None:
    module, x, at_init, reference = _adapter_case(name)
    before = module(x)
    assert torch.equal(before, at_init(x)), "starts as the identity on what it adapts"
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    (module(x) - torch.randn_like(before)).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        trained = module.train()(x)
        assert (trained - before).abs().max() > 1e-3, "one optimiser step changes the output"
        evaluated = module.eval()(x)
        # The same module in both modes (the reference code adds it in one and subtracts it in the other).
        assert torch.equal(trained, evaluated)
        torch.testing.assert_close(evaluated, reference(x), rtol=1e-5, atol=1e-6)
