"""What a GPU run does differently, checked on a CPU. ``engine.EagerGraphs`` runs TrainStep's graph bookkeeping
(static inputs, the optimiser reading its lr from tensors, one capture per input shape) without a GPU, so the
per-step schedule of a graphed run is checked against an eager run and a float64 formula; a dispatch mode
counts the host-device synchronisations of the evaluation meter; the refusals of what cannot be graphed."""
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
import kd_core
import models
import train_cifar
from distillers import DistillConfig, build_distiller
from train_cifar import CifarConfig

N_TRAIN, BATCH, EPOCHS, BASE_LR = 20, 4, 3, 0.05
STEPS = N_TRAIN // BATCH


def expected_lr(schedule: str, step: int) -> float:
    """The lr of global step ``step`` by hand (SPEC's schedules; per step except ``step``, set per epoch)."""
    epoch = step / STEPS
    if schedule == "cosine":
        return BASE_LR * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))
    if schedule == "linear":   # warm-up over the first epoch (reaching 1 on its last step), then down to 0
        if epoch < 1:
            return BASE_LR * min(1.0, (epoch + 1 / STEPS) / 1)
        return BASE_LR * (EPOCHS - epoch) / (EPOCHS - 1)
    return BASE_LR * 0.1 ** (step // STEPS >= 2)   # step: milestone at epoch 2


def lrs_applied(schedule: str, graphed: bool, tmp_path, monkeypatch) -> tuple[list[float], list[bool], int]:
    """Train a resnet8 for 3 epochs with SGD without momentum or weight decay, so that each optimiser step
    moves every weight by -lr * grad: the lr each step applied, read back from the classifier's weights;
    whether each step read its lr from a tensor (what a CUDA graph replays; a float is baked in); captures."""
    graphs = engine.EagerGraphs()
    monkeypatch.setattr(engine, "graph_backend", lambda device: graphs)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_TRAIN + 8, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (N_TRAIN + 8,), generator=g)
    cpu = torch.device("cpu")
    train = train_cifar.DeviceBatches(images[:N_TRAIN], labels[:N_TRAIN], BATCH, cpu, train=True)
    test = train_cifar.DeviceBatches(images[N_TRAIN:], labels[N_TRAIN:], 8, cpu, train=False)
    distiller = build_distiller("ce", models.build_model("resnet8", 3), None, DistillConfig(lr=BASE_LR))
    cfg = CifarConfig(out=str(tmp_path / f"{schedule}_{graphed}"), epochs=EPOCHS, batch_size=BATCH, lr=BASE_LR,
                      momentum=0.0, weight_decay=0.0, lr_schedule=schedule, lr_milestones=[2],
                      warmup_epochs=1.0 if schedule == "linear" else 0.0, cuda_graph=graphed, log_every=100)
    optimizer = train_cifar.sgd(engine.param_groups(distiller), BASE_LR, cfg)
    weight = distiller.student.classifier.weight if hasattr(distiller.student, "classifier") \
        else distiller.student.fc.weight
    before = {}

    def remember(opt, args, kwargs):
        before["w"], before["g"] = weight.detach().clone().double(), weight.grad.detach().clone().double()

    applied, from_tensor = [], []

    def measure(opt, args, kwargs):
        moved, grad = before["w"] - weight.detach().double(), before["g"]
        big = grad.abs() > 0.5 * grad.abs().max()
        applied.append(float((moved[big] / grad[big]).median()))
        from_tensor.append(isinstance(opt.param_groups[0]["lr"], torch.Tensor))

    optimizer.register_step_pre_hook(remember)
    optimizer.register_step_post_hook(measure)
    engine.fit(cfg, engine.Dist(), distiller, optimizer, train, test, None, engine.RunLog(cfg.out))
    return applied, from_tensor, graphs.captures


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step"])
def test_graphed_step_follows_the_per_step_schedule_of_an_eager_run(schedule, tmp_path, monkeypatch):
    eager, eager_tensor, eager_captures = lrs_applied(schedule, False, tmp_path, monkeypatch)
    graphed, graphed_tensor, captures = lrs_applied(schedule, True, tmp_path, monkeypatch)
    want = [expected_lr(schedule, i) for i in range(EPOCHS * STEPS)]
    assert eager == pytest.approx(want, rel=1e-3)
    assert graphed == pytest.approx(want, rel=1e-3)
    # 3 warm-up steps eagerly, then 12 replays of one capture, each reading the lr from the device
    assert (eager_captures, captures) == (0, 1)
    assert eager_tensor == [False] * 15 and graphed_tensor == [False] * 3 + [True] * 12


def test_concurrent_graphed_runs_that_draw_random_numbers_are_refused():
    cuda = torch.device("cuda")
    crd = [CifarConfig(method="kd+crd", seed=s) for s in (0, 1)]
    with pytest.raises(engine.ConfigError, match="kd\\+crd draws random numbers inside its CUDA-graphed step"):
        train_cifar.check_concurrent_graphs(crd, 2, cuda)
    train_cifar.check_concurrent_graphs(crd, 1, cuda)                                   # one at a time
    train_cifar.check_concurrent_graphs(crd, 2, torch.device("cpu"))                    # no graph on a CPU
    train_cifar.check_concurrent_graphs([CifarConfig(method="kd+crd", seed=s, cuda_graph=False) for s in (0, 1)],
                                        2, cuda)
    train_cifar.check_concurrent_graphs([CifarConfig(method="pesf+pkt", seed=s) for s in (0, 1)], 2, cuda)
    with pytest.raises(engine.ConfigError):
        train_cifar.check_concurrent_graphs([CifarConfig(method="crd", seed=s) for s in (0, 1)], 4, cuda)


def test_deterministic_turns_on_deterministic_algorithms_and_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        engine.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        engine.seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_command_line_refuses_them_before_any_run_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engine, "check_device", lambda device: "cuda")   # as on a GPU machine
    monkeypatch.setattr(train_cifar, "run_steps", lambda *a, **k: pytest.fail("a run started"))
    rc = train_cifar.main(["--method", "kd+crd", "--teacher", "resnet8", "--student", "resnet8", "--seeds", "0,1",
                           "--concurrent", "2", "--out", str(tmp_path / "r_s{seed}")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "draws random numbers inside its CUDA-graphed step" in err[0]


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (on a GPU, each one waits for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_the_consistency_meter_reads_the_device_once_per_evaluation():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 2) for _ in range(5)]
    meter = kd_core.ConsistencyMeter()
    with SyncCounter() as counter:
        for s, t in batches:
            meter.update(s, t)
    assert counter.syncs == 0
    got = meter.compute()
    s, t = (torch.cat(x).double() for x in zip(*batches))
    p_t = torch.softmax(t, 1)
    kl = (p_t * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum(1).mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-6)
    assert got["agreement"] == pytest.approx(100 * float((s.argmax(1) == t.argmax(1)).double().mean()))
    gap = (torch.logsumexp(t, 1) - torch.logsumexp(s, 1)).mean()
    assert got["gap"] == pytest.approx(float(gap), rel=1e-6)


def test_the_captured_fused_sgd_step_continues_the_eager_momentum_and_weight_decay(monkeypatch):
    """Warm-up steps run SGD eagerly (foreach), the captured step runs SGD's fused kernel on the same momentum
    buffers: with momentum and weight decay and an lr changing every step, the weights follow an eager run."""
    monkeypatch.setattr(engine, "graph_backend", lambda device: engine.EagerGraphs())
    torch.manual_seed(0)
    models_ = [torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))]
    models_.append(copy.deepcopy(models_[0]))
    start = models_[0][0].weight.detach().clone()
    steps = []
    for model, graphed in zip(models_, (False, True)):
        optimizer = torch.optim.SGD([{"params": model.parameters(), "lr": 0.1, "base_lr": 0.1}], momentum=0.9,
                                    weight_decay=5e-4)
        steps.append((optimizer, engine.TrainStep(
            lambda x, y, i, m=model: (None, {"ce": torch.nn.functional.cross_entropy(m(x), y)}), optimizer, None,
            torch.device("cpu"), cuda_graph=graphed, warmup=2)))
    g = torch.Generator().manual_seed(2)
    for i in range(8):
        x, y = torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
        for optimizer, step in steps:
            engine.set_lr(optimizer, 1.0 / (i + 1))   # base lr 0.1 times 1, 1/2, 1/3, ...
            step(x, y, torch.arange(10))
    for eager, graphed in zip(*(m.parameters() for m in models_)):
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models_[0][0].weight, start)   # the weights did move


class FakeCuda:
    """Records what ``engine.CudaGraphs`` asks of torch.cuda (streams, captures, synchronisations)."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[str] = []
        fake = self

        class Stream:
            def __init__(self, device=None, name="side stream"):
                self.name = name

            def wait_stream(self, other):
                fake.events.append(f"{self.name} waits {other.name}")

        class StreamContext:
            def __init__(self, stream):
                self.stream, self.outer = stream, None

            def __enter__(self):
                self.outer, fake.current = fake.current, self.stream
                fake.events.append(f"on {self.stream.name}")

            def __exit__(self, *exc):
                fake.current = self.outer

        class Graph:
            def capture_begin(self, *args, **kwargs):
                fake.events.append(f"capture_begin on {fake.current.name}")

            def capture_end(self):
                fake.events.append("capture_end")

            def replay(self):
                fake.events.append("replay")

        self.current = Stream(name="run stream")
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", StreamContext)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.current)
        for name in ("synchronize", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name, **k: fake.events.append(name))


def test_a_capture_waits_for_the_run_stream_only_and_keeps_the_allocator_cache(monkeypatch):
    fake = FakeCuda(monkeypatch)
    graphs = engine.CudaGraphs(torch.device("cuda"))
    out = torch.zeros(3)
    replay = graphs.capture(lambda: fake.events.append("step") or out)
    assert fake.events == ["side stream waits run stream", "on side stream", "capture_begin on side stream", "step",
                           "capture_end", "run stream waits side stream"]   # no synchronize, no empty_cache
    fake.events.clear()
    assert replay() is out and fake.events == ["replay"]


def test_a_warm_up_output_is_kept_for_the_run_stream(monkeypatch):
    """A warm-up step runs on the side stream; its output is read and freed on the run's stream, so the
    allocator must not hand its memory to the side stream before the run's stream is done with it."""
    FakeCuda(monkeypatch)
    kept = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: kept.append(stream.name))
    monkeypatch.setattr(engine, "graph_backend", lambda device: engine.CudaGraphs(device))
    model = torch.nn.Linear(4, 3)
    step = engine.TrainStep(lambda x, y, i: (None, {"ce": torch.nn.functional.cross_entropy(model(x), y)}),
                            torch.optim.SGD(model.parameters(), lr=0.1), None, torch.device("cpu"), cuda_graph=True,
                            warmup=1)
    step(torch.randn(5, 4), torch.randint(0, 3, (5,)), torch.arange(5))
    assert kept == ["run stream"]
