"""Degrade, never crash: backend="auto" falls back to the torch path (one warning) when the Triton kernel
fails; a failed CUDA-graph capture of the training step warns once and runs eagerly. The failures are
injected, so these run on CPU (the kernel side under TRITON_INTERPRET=1, as CI runs)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import engine
import kd_core

TAU = 4.0


def reference_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64: 0.9 tau^2 KL(p(adj(t)) || p(s)) + 0.1 CE(s, y), batch mean; adj swaps argmax and label."""
    s, t = s.double(), t.double()
    top = t.argmax(1)
    rows = torch.arange(len(y))
    adj = t.clone()
    adj[rows, top], adj[rows, y] = t[rows, y], t[rows, top]
    log_q = F.log_softmax(adj / TAU, dim=1)
    kl = (log_q.exp() * (log_q - F.log_softmax(s / TAU, dim=1))).sum(1) * TAU ** 2
    return 0.9 * kl.mean() + 0.1 * F.cross_entropy(s, y)


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """backend="auto" treats CPU tensors as it treats CUDA ones (the kernel runs under the interpreter)."""
    if not kd_core._triton_interpreted():
        pytest.skip("needs triton and TRITON_INTERPRET=1 (the kernel on CPU tensors), as .ci/run sets")
    monkeypatch.setattr(kd_core, "_KERNEL_FAILURE", None)
    monkeypatch.setattr(kd_core, "_auto_uses_kernel", lambda x: kd_core._KERNEL_FAILURE is None)


def inject(monkeypatch, name: str) -> list:
    calls = []

    def broken(*args, **kwargs):
        calls.append(name)
        raise RuntimeError("injected: no kernel image is available for execution on the device\nsecond line")
    monkeypatch.setattr(kd_core, name, broken)
    return calls


def logits(n=6, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, k, generator=g) * 3, torch.randn(n, k, generator=g) * 3
    return s.requires_grad_(), t, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("api", ["distill_loss", "distill_terms"])
def test_auto_backend_falls_back_to_torch_once_when_the_kernel_fails(kernel_on_cpu, monkeypatch, api):
    calls = inject(monkeypatch, "_launch_fwd")
    for seed in range(3):
        s, t, y = logits(seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if api == "distill_loss":
                loss, _ = kd_core.distill_loss(s, t, y, TAU, {"kl_ts": 0.9, "ce_s": 0.1}, adjust=True, backend="auto")
            else:
                terms = kd_core.distill_terms(s, t, y, TAU, adjust=True, backend="auto")
                loss = 0.9 * terms.kl_ts + 0.1 * terms.ce_s
            loss.backward()
        mine = [w for w in caught
                if issubclass(w.category, RuntimeWarning) and "Triton kernel failed" in str(w.message)]
        # One warning, naming the cause (first line only), at the first failure; silence afterwards.
        assert len(mine) == (1 if seed == 0 else 0)
        if seed == 0:
            assert "RuntimeError: injected: no kernel image" in str(mine[0].message)
            assert "second line" not in str(mine[0].message)
        s64 = s.detach().double().requires_grad_()
        ref = reference_loss(s64, t, y)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
        torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert calls == ["_launch_fwd"]   # the rest of the process never tries the kernel again


def test_auto_backend_falls_back_when_the_backward_kernel_fails(kernel_on_cpu, monkeypatch):
    calls = inject(monkeypatch, "_launch_bwd")
    s, t, y = logits(seed=3)
    terms = kd_core.distill_terms(s, t, y, TAU, adjust=True, backend="auto")   # the forward kernel runs
    with pytest.warns(RuntimeWarning, match="Triton kernel failed"):
        (0.9 * terms.kl_ts + 0.1 * terms.ce_s).backward()
    s64 = s.detach().double().requires_grad_()
    reference_loss(s64, t, y).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert calls == ["_launch_bwd"] and kd_core._KERNEL_FAILURE is not None


@pytest.mark.parametrize("api", ["distill_loss", "distill_terms"])
def test_explicit_triton_backend_still_raises(kernel_on_cpu, monkeypatch, api):
    inject(monkeypatch, "_launch_fwd")
    s, t, y = logits()
    with pytest.raises(RuntimeError, match="injected"):
        if api == "distill_loss":
            kd_core.distill_loss(s, t, y, TAU, {"kl_ts": 1.0}, backend="triton")
        else:
            kd_core.distill_terms(s, t, y, TAU, backend="triton")
    assert kd_core._KERNEL_FAILURE is None   # an explicit backend never switches "auto" off


def test_a_triton_that_cannot_define_the_kernels_warns_once(monkeypatch):
    monkeypatch.setattr(kd_core, "_KERNEL_FAILURE", None)
    monkeypatch.setattr(kd_core, "_TRITON", False)
    monkeypatch.setattr(kd_core, "_TRITON_DEFINE_ERROR",
                        AttributeError("module 'triton.language' has no attribute 'x'"))
    with pytest.warns(RuntimeWarning, match="AttributeError: module 'triton.language'"):
        assert not kd_core._kernel_usable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kd_core._kernel_usable()
    monkeypatch.setattr(kd_core, "_KERNEL_FAILURE", None)
    monkeypatch.setattr(kd_core, "_TRITON_DEFINE_ERROR", None)   # no triton installed: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kd_core._kernel_usable()


def test_failed_cuda_graph_capture_warns_once_and_runs_eagerly(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    eager_model = copy.deepcopy(model)

    monkeypatch.setattr(engine, "graph_backend", lambda device: engine.EagerGraphs())   # as on a GPU

    def make_step(m, graph: bool) -> engine.TrainStep:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return engine.TrainStep(lambda x, y, i: (None, {"ce": F.cross_entropy(m(x), y)}), opt, None,
                                torch.device("cpu"), cuda_graph=graph, warmup=0)   # the first call captures

    graphed, eager = make_step(model, True), make_step(eager_model, False)
    captures = []

    def broken_capture(x, y, index):
        captures.append(1)
        raise RuntimeError("injected: operation not permitted when stream is capturing")
    monkeypatch.setattr(graphed, "_capture", broken_capture)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            x, y = torch.randn(12, 8, generator=g), torch.randint(0, 5, (12,), generator=g)
            out = graphed(x, y, torch.arange(12))
            torch.testing.assert_close(out, eager(x, y, torch.arange(12)), rtol=0, atol=0)
    mine = [w for w in caught if "CUDA-graph capture" in str(w.message)]
    assert len(mine) == 1 and "injected" in str(mine[0].message) and len(captures) == 1
    assert not graphed.cuda_graph
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
