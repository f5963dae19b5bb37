"""kd_core at language-model scale: [B, S, V] logits, the reverse/JSD divergences and distill_linear
(issue 24), against float64 references written here.

The references take the logits' log-softmax per row with explicit loops over rows, the label swap
by index, and torch autograd in float64 for the gradients; none of them calls kd_core.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kd_core

IGNORE = -100
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked log(0)


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------
def ref_adjust(z: torch.Tensor, y: int) -> torch.Tensor:
    """Label adjustment of one row: the argmax entry and the label's entry trade places."""
    if y == IGNORE:
        return z
    top = int(torch.argmax(z))
    perm = list(range(z.shape[0]))
    perm[top], perm[y] = y, top
    return z[perm]


def ref_divergence(target: torch.Tensor, learner: torch.Tensor, tau: float, kind: str, beta: float) -> torch.Tensor:
    """tau^2 D of one row: forward KL(q || p), reverse KL(p || q), or GKD's beta KL(q || m) + (1 - beta) KL(p || m)."""
    q = torch.softmax(target / tau, dim=0)
    p = torch.softmax(learner / tau, dim=0)
    kl = lambda a, b: (a * (a.log() - b.log())).sum()
    if kind == "forward":
        d = kl(q, p)
    elif kind == "reverse":
        d = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        d = beta * kl(q, m) + (1 - beta) * kl(p, m)
    return tau * tau * d


def ref_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float, weights: dict, adjust: bool,
             kind: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """sum_f w_f * mean over labelled rows of term f, targets detached (student terms move s only)."""
    s, t, y = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    total = {f: 0.0 for f in ("kl_ts", "kl_st", "ce_s", "ce_t")}
    rows = [i for i in range(s.shape[0]) if int(y[i]) != IGNORE]
    for i in rows:
        yi = int(y[i])
        t_target = ref_adjust(t[i], yi) if adjust else t[i]
        s_target = ref_adjust(s[i], yi) if adjust else s[i]
        total["kl_ts"] = total["kl_ts"] + ref_divergence(t_target.detach(), s[i], tau, kind, beta)
        total["kl_st"] = total["kl_st"] + ref_divergence(s_target.detach(), t[i], tau, kind, beta)
        total["ce_s"] = total["ce_s"] + torch.logsumexp(s[i], 0) - s[i, yi]
        total["ce_t"] = total["ce_t"] + torch.logsumexp(t[i], 0) - t[i, yi]
    return sum(w * total[f] for f, w in weights.items()) / max(len(rows), 1)


def lm_batch(b=2, seq=5, hidden=6, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(b, seq, hidden, generator=g, dtype=torch.float64), torch.randn(b, seq, hidden, generator=g,
                                                                                        dtype=torch.float64)
    ws, wt = torch.randn(vocab, hidden, generator=g, dtype=torch.float64), torch.randn(vocab, hidden, generator=g,
                                                                                        dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (b, seq), generator=g)
    y[0, -2:] = IGNORE                      # right padding
    y[1, 0] = IGNORE
    return hs, ws, bias, ht, wt, y


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True, materialize_grads=True)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


BACKENDS = ["torch"] + (["triton"] if kd_core._triton_interpreted() or torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------
# distill_terms / distill_loss: [B, S, V], ignore_index, divergences, optional labels
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_distill_terms_3d_logits_and_divergences_match_float64(backend, kind):
    hs, ws, _, ht, wt, y = lm_batch()
    s = (hs @ ws.T).requires_grad_()
    t = (ht @ wt.T).requires_grad_()
    device = "cuda" if backend == "triton" and not kd_core._triton_interpreted() else "cpu"
    dtype = torch.float64 if device == "cpu" and backend == "torch" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    s_in, t_in = s.detach().to(device, dtype).requires_grad_(), t.detach().to(device, dtype).requires_grad_()
    terms = kd_core.distill_terms(s_in, t_in, y.to(device), 3.0, adjust=True, reduction="none", backend=backend,
                                  detach_targets=True, divergence=kind, beta=0.3)
    assert terms.kl_ts.shape == y.shape
    weights = {"kl_ts": 0.9, "kl_st": 0.7, "ce_s": 0.2, "ce_t": 0.4}
    n_valid = int((y != IGNORE).sum())
    loss = sum(w * getattr(terms, f).sum() for f, w in weights.items()) / n_valid
    ref = ref_loss(s, t, y, 3.0, weights, True, kind, 0.3)
    close(loss.cpu(), ref, tol)
    for mine, theirs in zip(grads_of(loss, [s_in, t_in]), grads_of(ref, [s, t])):
        close(mine.cpu(), theirs, tol)
    assert float(terms.kl_ts[0, -1].abs()) == 0.0 and float(terms.ce_s[1, 0].abs()) == 0.0   # padded rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_loss_3d_with_mask_and_no_labels_is_pure_distillation(backend):
    hs, ws, _, ht, wt, y = lm_batch(seed=1)
    s, t = (hs @ ws.T).float(), (ht @ wt.T).float()
    mask = y != IGNORE
    s_in = s.clone().requires_grad_()
    loss, terms = kd_core.distill_loss(s_in, t, None, 2.0, {"kl_ts": 1.0}, mask=mask, backend=backend)
    s64 = s.double().requires_grad_()
    ref = ref_loss(s64, t.double(), torch.where(mask, 0, IGNORE), 2.0, {"kl_ts": 1.0}, False)
    close(loss, ref, 2e-5)
    close(grads_of(loss, [s_in])[0], grads_of(ref, [s64])[0], 2e-5)
    assert float(terms.ce_s) == 0.0
    with pytest.raises(ValueError, match="need labels"):
        kd_core.distill_loss(s, t, None, 2.0, {"ce_s": 1.0}, mask=mask, backend=backend)
    with pytest.raises(ValueError, match="adjust=True needs labels"):
        kd_core.distill_terms(s, t, None, 2.0, adjust=True)


def test_distill_loss_torch_path_builds_only_the_weighted_terms():
    # A KL-only loss must not compute the cross-entropy's logsumexp at tau = 1 (a full [N, V] pass).
    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    s, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.tensor([1, 2, IGNORE, 8])
    with Ops():
        kd_core.distill_loss(s, t, y, 2.0, {"kl_ts": 1.0}, backend="torch")
    assert "logsumexp" not in Ops.seen and "gather" not in Ops.seen, sorted(Ops.seen)
    Ops.seen = set()
    with Ops():
        kd_core.distill_loss(s, t, y, 2.0, {"kl_ts": 1.0, "ce_s": 0.5}, backend="torch")
    assert "logsumexp" in Ops.seen


# ----------------------------------------------------------------------------------------------
# distill_linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_distill_linear_default_is_plain_kd_of_the_materialised_logits(chunk_size):
    hs, ws, bias, ht, wt, y = lm_batch()
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bias)]
    loss = kd_core.distill_linear(leaves[0], leaves[1], ht, wt, y, tau=2.0, student_bias=leaves[2],
                                  chunk_size=chunk_size)
    ref_leaves = [x.clone().requires_grad_() for x in (hs, ws, bias)]
    ref = ref_loss(ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2], ht @ wt.T, y, 2.0, {"kl_ts": 1.0}, False)
    close(loss, ref)
    for mine, theirs in zip(grads_of(loss, leaves), grads_of(ref, ref_leaves)):
        close(mine, theirs)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_distill_linear_two_way_loss_sends_teacher_terms_to_the_teacher(kind):
    hs, ws, bias, ht, wt, y = lm_batch(seed=2)
    weights = {"kl_ts": 0.9, "ce_s": 0.1, "kl_st": 0.6, "ce_t": 0.5}
    leaves = [x.clone().requires_grad_() for x in (hs, ws, ht, wt, bias)]
    loss = kd_core.distill_linear(leaves[0], leaves[1], leaves[2], leaves[3], y, tau=3.0, weights=weights,
                                  adjust=True, divergence=kind, beta=0.25, teacher_bias=leaves[4], chunk_size=4)
    ref_leaves = [x.clone().requires_grad_() for x in (hs, ws, ht, wt, bias)]
    s_ref = ref_leaves[0] @ ref_leaves[1].T
    t_ref = ref_leaves[2] @ ref_leaves[3].T + ref_leaves[4]
    ref = ref_loss(s_ref, t_ref, y, 3.0, weights, True, kind, 0.25)
    close(loss, ref)
    mine = grads_of(loss, leaves)
    for got, theirs in zip(mine, grads_of(ref, ref_leaves)):
        close(got, theirs)
    # the teacher's gradient comes from kl_st and ce_t alone
    teacher_only = ref_loss(s_ref.detach(), t_ref, y, 3.0, {"kl_st": 0.6, "ce_t": 0.5}, True, kind, 0.25)
    close(mine[2], grads_of(teacher_only, ref_leaves[2:3])[0])


@pytest.mark.parametrize("gpu_gemm", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distill_linear_half_precision_accumulates_in_fp32(dtype, gpu_gemm, monkeypatch):
    # gpu_gemm: the weight gradient's GEMM in the input dtype, as on a GPU
    monkeypatch.setattr(kd_core, "_gemm_in_input_dtype", lambda x: gpu_gemm)
    hs, ws, _, ht, wt, y = lm_batch(b=3, seq=7, hidden=16, vocab=64, seed=3)
    leaves = [x.to(dtype).requires_grad_() for x in (hs, ws)]
    loss = kd_core.distill_linear(leaves[0], leaves[1], ht.to(dtype), wt.to(dtype), y, tau=2.0,
                                  weights={"kl_ts": 0.9, "ce_s": 0.1}, chunk_size=5)
    assert loss.dtype == torch.float32
    grads = grads_of(loss, leaves)
    assert [g.dtype for g in grads] == [dtype, dtype]
    # reference: float64 math on the same (rounded) inputs, logits rounded to the input dtype as a GEMM gives them
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    zs = (ref_leaves[0] @ ref_leaves[1].T)
    zt = (ht.to(dtype).double() @ wt.to(dtype).double().T).to(dtype).double()
    ref = ref_loss(zs, zt, y, 2.0, {"kl_ts": 0.9, "ce_s": 0.1}, False)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)
    for mine, theirs in zip(grads, grads_of(ref, ref_leaves)):
        torch.testing.assert_close(mine.double(), theirs, rtol=3e-2, atol=3e-2 * float(theirs.abs().max()))


def test_distill_linear_never_holds_a_tensor_of_n_times_v():
    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(x, torch.Tensor):
                    Largest.numel = max(Largest.numel, x.numel())
            return out

    n, hidden, vocab = 64, 8, 500
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(n, hidden, generator=g, requires_grad=True)
    ws = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=g)
    budget = 8 * vocab * kd_core._CHUNK_BYTES["forward"]     # room for 8 rows of temporaries
    with Largest():
        ht, wt = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
        loss = kd_core.distill_linear(hs, ws, ht, wt, y, weights={"kl_ts": 1.0, "ce_s": 1.0}, memory_budget=budget)
        loss.backward()
    assert Largest.numel <= max(8 * vocab, vocab * hidden), Largest.numel
    assert kd_core._linear_chunk_rows(n, vocab, 4, "forward", budget) == 8


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
def test_distill_linear_kernel_chunks_match_the_torch_chunks():
    hs, ws, bias, ht, wt, y = lm_batch(seed=5)
    device = "cpu" if kd_core._triton_interpreted() else "cuda"
    weights = {"kl_ts": 0.9, "ce_s": 0.1, "kl_st": 0.6, "ce_t": 0.5}
    results = []
    for backend in ("triton", "torch"):
        leaves = [x.float().to(device).requires_grad_() for x in (hs, ws, bias, ht, wt)]
        loss = kd_core.distill_linear(leaves[0], leaves[1], leaves[3], leaves[4], y.to(device), tau=2.0,
                                      weights=weights, adjust=True, student_bias=leaves[2], chunk_size=3,
                                      backend=backend)
        (2.5 * loss).backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("change, match", [
    (dict(student_hidden=torch.randn(4, 5)), "student_weight must be"),
    (dict(student_weight=torch.randn(9, 6)), "teacher_hidden/teacher_weight must give"),
    (dict(student_weight=torch.randn(10, 6, dtype=torch.float64)), "student_weight must match"),
    (dict(student_hidden=torch.ones(4, 6, dtype=torch.long)), "student_hidden must be a floating-point"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels must have shape"),
    (dict(labels=torch.tensor([0, 1, 10, IGNORE])), "found 10"),
    (dict(student_bias=torch.randn(9)), "student_bias must be"),
    (dict(divergence="kl"), "divergence must be"),
    (dict(divergence="jsd", beta=1.0), "beta must lie"),
    (dict(weights={"kl": 1.0}), "weights keys"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(tau=0.0), "tau"),
])
def test_distill_linear_bad_input_is_a_value_error_naming_the_argument(change, match):
    args = dict(student_hidden=torch.randn(4, 6), student_weight=torch.randn(10, 6), teacher_hidden=torch.randn(4, 6),
                teacher_weight=torch.randn(10, 6), labels=torch.tensor([0, 1, 9, IGNORE]))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        kd_core.distill_linear(**args)


# ----------------------------------------------------------------------------------------------
# the API a copier of kd_core.py meets
# ----------------------------------------------------------------------------------------------
def test_defaults_give_plain_hinton_kd_and_per_row_losses():
    hs, ws, _, ht, wt, y = lm_batch(seed=6)
    s, t = hs @ ws.T, ht @ wt.T
    terms = kd_core.distill_terms(s, t, y, 4.0)
    close(terms.kl_ts, ref_loss(s, t, y, 4.0, {"kl_ts": 1.0}, adjust=False))
    per_row, _ = kd_core.distill_loss(s, t, y, 4.0, {"kl_ts": 0.9, "ce_s": 0.1}, reduction="none")
    assert per_row.shape == y.shape
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            ref = ref_loss(s[b, i:i + 1], t[b, i:i + 1], y[b, i:i + 1], 4.0, {"kl_ts": 0.9, "ce_s": 0.1}, False)
            close(per_row[b, i], torch.as_tensor(ref, dtype=torch.float64))


def test_consistency_meter_without_features_reports_no_feature_cka():
    meter = kd_core.ConsistencyMeter()
    meter.update(torch.randn(6, 5), torch.randn(6, 5))
    result = meter.compute()
    assert "cka_features" not in result and math.isfinite(result["cka_logits"])


def test_an_interpreter_that_cannot_start_names_its_cause(tmp_path):
    pytest.importorskip("triton")
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parents[1] / "kd_core.py", tmp_path / "kd_core.py")
    script = ("import sys; sys.modules['numpy'] = None\n"
              "import torch, kd_core\n"
              "kd_core.distill_terms(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), backend='triton')\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError") and "numpy" in last, last
