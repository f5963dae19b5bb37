"""What the training loop guarantees, tested where it can fail: resume with a model that draws from the global
RNG (dropout) and with CRD's bank and negatives, the augmentation (statistically), distributed evaluation
and logged losses against one process, the consistency metrics where agreement differs from accuracy, and
one optimiser step per batch (no gradient carried over)."""
import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import engine
from conftest import Pair, RowBatches
import models
import train_cifar
from distillers import FEATURE_TERMS, DistillConfig, build_distiller
from distillers.feature import CRD
from train_cifar import CifarConfig

TINY = dict(teacher="resnet8", student="resnet8", epochs=2, batch_size=16, limit_batches=2, eval_batch_size=16,
            log_every=1)


class DropoutNet(nn.Module):
    """A small network without BatchNorm whose training forward draws dropout masks from the global RNG."""

    def __init__(self, num_classes: int, p: float = 0.5, **unused) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(8, num_classes)
        self.feature_dim = 8

    def forward(self, x, features=False):
        pooled = self.drop(F.relu(self.conv(x)).mean((2, 3)))
        logits = self.fc(pooled)
        return (logits, {"pooled": pooled}) if features else logits


class Interrupted(Exception):
    pass


def straight_and_resumed(tmp_path, data, monkeypatch, **keys):
    """The last checkpoints of a 2-epoch run and of the same run interrupted after epoch 1, then resumed."""
    cfg = {**TINY, "data_dir": str(data), **keys}
    train_cifar.run(CifarConfig(**cfg, out=str(tmp_path / "straight")))
    save = checkpoints.save_atomic

    def save_then_stop(obj, path):
        save(obj, path)
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_atomic", save_then_stop)
        with pytest.raises(Interrupted):
            train_cifar.run(CifarConfig(**cfg, out=str(tmp_path / "split")))
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=False)["epoch"] == 1
    train_cifar.run(CifarConfig(**cfg, out=str(tmp_path / "split")), resume=True)
    return [torch.load(tmp_path / name / "last.pt", weights_only=False) for name in ("straight", "split")]


def assert_same_state(a: dict, b: dict) -> None:
    for part, state in a["distiller"].items():
        for key, value in state.items():
            assert torch.equal(value, b["distiller"][part][key]), (part, key)


def test_resume_with_dropout_is_bit_identical(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.setitem(models._REGISTRY, "dropnet", DropoutNet)
    a, b = straight_and_resumed(tmp_path, fake_cifar, monkeypatch, method="ce", student="dropnet", lr_schedule="cosine")
    assert_same_state(a, b)
    # A resumed run that reseeded dropout would differ: the masks of epoch 2 are not those of epoch 1.
    torch.manual_seed(0)
    masks = [nn.functional.dropout(torch.ones(64), 0.5) for _ in range(2)]
    assert not torch.equal(*masks)
    # The lr of the last step of each epoch (2 steps per epoch, cosine per step) from its base lr.
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    expected = [0.05 * 0.5 * (1 + math.cos(math.pi * (e + 0.5) / 2)) for e in range(2)]
    assert [r["lr_student"] for r in rows] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reset, accum, batches", [("run", 3, 2), ("epoch", 2, 3)])
def test_resume_inside_a_gradient_accumulation_is_bit_identical(fake_cifar, tmp_path, monkeypatch, reset, accum,
                                                                batches):
    """Epoch 1 ends with gradients pending: grad_accum 3 over 2 batches per epoch counted over the run, or
    grad_accum 2 over 3 batches counted per epoch (the authors' ``(idx + 1) % 4``: batch 3 joins epoch 2's first
    step); the checkpoint keeps them and the position, so the resumed run takes its optimiser step on the same
    batch, with the same summed gradient, as the straight run."""
    a, b = straight_and_resumed(tmp_path, fake_cifar, monkeypatch, method="ce", student="resnet8", grad_accum=accum,
                                grad_accum_reset=reset, limit_batches=batches)
    assert_same_state(a, b)
    torch.manual_seed(0)
    init = models.build_model("resnet8", 100).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in a["distiller"]["student"].items() if v.is_floating_point())


def test_resume_with_crd_bank_is_bit_identical(fake_cifar, teacher_ckpt, tmp_path, monkeypatch):
    """CRD draws its negatives from the global RNG and keeps a momentum bank: both must continue exactly."""
    def small_crd(student, teacher, cfg, num_train):   # 64 negatives instead of 16384: the same code, faster
        return CRD(student.feature_dim, teacher.feature_dim, num_train, k=64, negatives=cfg.crd_negatives)

    monkeypatch.setitem(FEATURE_TERMS, "crd", small_crd)
    a, b = straight_and_resumed(tmp_path, fake_cifar, monkeypatch, method="kd+crd", teacher_ckpt=str(teacher_ckpt))
    assert_same_state(a, b)
    bank = a["distiller"]["feature_term"]["memory_s"]
    seen = (bank.norm(dim=1) - 1).abs() < 1e-5
    assert 0 < int(seen.sum()) < len(bank)   # rows of the 4 batches seen are on the unit sphere, the others not


# ----------------------------------------------------------------------------------------------
# Augmentation: random crops and flips, statistically
# ----------------------------------------------------------------------------------------------
def test_augmentation_flips_and_crops():
    """Recover each training crop's offset and flip: both vary as a uniform 9 x 9 offset and a fair coin."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    batches = train_cifar.DeviceBatches(images, torch.zeros(128, dtype=torch.long), 64, torch.device("cpu"),
                                        train=True, seed=1)
    mean = torch.tensor(train_cifar.CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(train_cifar.CIFAR_STD).view(3, 1, 1) * 255
    padded = F.pad(images, (4, 4, 4, 4)).float()
    flips, offsets = [], []
    for x, _, idx in batches.epoch(0):
        for j in range(len(idx)):
            pixels = (x[j] * std + mean).round()
            src = padded[idx[j]]
            found = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                     if torch.equal(src[:, dy:dy + 32, dx:dx + 32].flip(2) if flip else src[:, dy:dy + 32, dx:dx + 32],
                                    pixels)]
            assert len(found) == 1, found
            dy, dx, flip = found[0]
            flips.append(flip)
            offsets.append((dy, dx))
    n = len(flips)
    assert n == 128
    # Binomial(128, 1/2): 40..88 flipped has probability > 1 - 1e-5; none or all flipped is then impossible.
    assert 40 <= sum(flips) <= 88
    # Offsets uniform on 0..8 in each axis: the centre crop alone would give 128 x (4, 4).
    assert sum(o == (4, 4) for o in offsets) < 12
    assert len({dy for dy, _ in offsets}) == 9 and len({dx for _, dx in offsets}) == 9
    # A fresh permutation every epoch.
    orders = [torch.cat([idx for _, _, idx in batches.epoch(e)]) for e in (0, 1)]
    assert not torch.equal(*orders)


def test_imagenet_training_transform_flips_and_crops(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    import train_imagenet
    folder = tmp_path / "train" / "n0"
    folder.mkdir(parents=True)
    ramp = torch.arange(48).repeat(48, 1) * 5                 # brightness grows left to right
    PIL.fromarray(ramp.to(torch.uint8)[..., None].repeat(1, 1, 3).numpy()).save(folder / "a.png")
    dataset = train_imagenet.image_folder(tmp_path / "train", train=True, size=16)
    torch.manual_seed(0)
    samples = [dataset[0][0].pixels.float().mean(0) for _ in range(60)]
    rising = [bool(s[:, -1].mean() > s[:, 0].mean()) for s in samples]
    assert 15 <= sum(rising) <= 45                            # flipped about half of the time
    scales = {round(float(s[:, -1].mean() - s[:, 0].mean()), 1) for s in samples}
    assert len(scales) > 20                                   # crops of many sizes and places


# ----------------------------------------------------------------------------------------------
# Two gloo ranks: the logged losses and the evaluation equal one process's
# ----------------------------------------------------------------------------------------------
def _data(n_train=64, n_test=37):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (n_train + n_test,), generator=g)
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def _distiller():
    # A BatchNorm student: each rank updates its running statistics on its own half batches, and they must be
    # averaged before the evaluation and the checkpoint. No dropout: the ranks' losses are computed here.
    torch.manual_seed(0)
    return build_distiller("kd", models.build_model("resnet8", 2), DropoutNet(2, p=0.0), DistillConfig(lr=0.0))


def _fit_cfg(out: str) -> CifarConfig:
    return CifarConfig(out=out, epochs=1, batch_size=32, lr=0.0, cuda_graph=False, log_every=1, eval_batch_size=8)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)   # forked child: keep OpenMP out of it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        (xs, ys), (xt, yt) = _data()
        cpu = torch.device("cpu")
        train = train_cifar.DeviceBatches(xs, ys, 32, cpu, train=True, rank=rank, world=world)
        test = train_cifar.DeviceBatches(xt, yt, 8, cpu, train=False, rank=rank, world=world)
        d = _distiller()
        optimizer = train_cifar.sgd(engine.param_groups(d), 0.0, _fit_cfg(out))
        engine.fit(_fit_cfg(out), engine.Dist(rank, world), d, optimizer, train, test, None,
                   engine.RunLog(out, enabled=rank == 0))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_and_losses_equal_one_process(tmp_path):
    """lr 0: the weights stay, so each logged loss is a mean over the ranks' half batches, computed here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "ddp")
    # fork, not spawn: a spawned child re-imports torch (~15 s here instead of <1 s).
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="fork")
    logged = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])

    (xs, ys), (xt, yt) = _data()
    cpu = torch.device("cpu")
    d = _distiller()
    engine.load_distiller_state(d, torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["distiller"])
    whole = engine.evaluate(d, train_cifar.DeviceBatches(xt, yt, 50, cpu, train=False), None, cpu)
    assert whole["teacher_top1"] != whole["top1"] or whole["agreement"] != whole["top1"]
    for key, value in whole.items():   # 1e-6: float32 logits summed per batch, in other batches
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    fresh = _distiller()
    fresh.train()
    per_step = []
    with torch.no_grad():
        for rank in range(2):
            for x, y, index in train_cifar.DeviceBatches(xs, ys, 32, cpu, train=True, rank=rank, world=2).epoch(0):
                per_step.append({k: float(v) for k, v in fresh(x, y, index)[1].items()})
    for name in ("kl", "ce"):
        assert logged[f"train_{name}"] == pytest.approx(sum(p[name] for p in per_step) / len(per_step), rel=1e-5)


def test_evaluation_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    d = build_distiller("kd", models.build_model("resnet8", 3), models.build_model("resnet8", 3), DistillConfig())
    g = torch.Generator().manual_seed(6)
    images, labels = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 3
    test = train_cifar.DeviceBatches(images, labels, 8, torch.device("cpu"), train=False)
    stats = {k: v.clone() for k, v in d.student.state_dict().items() if "running" in k}
    d.train()
    out = engine.evaluate(d, test, None, torch.device("cpu"))
    assert all(torch.equal(v, d.student.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        x = torch.cat([b[0] for b in test.epoch(0)])
        d.student.eval()
        expected = 100 * float((d.student(x).argmax(1) == labels).double().mean())
    assert out["top1"] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Consistency metrics where agreement, student accuracy and teacher accuracy all differ
# ----------------------------------------------------------------------------------------------
class FixedNet(nn.Module):
    def __init__(self, logits, feats):
        super().__init__()
        self.logits, self.feats = logits, feats

    def forward(self, x, features=False):
        return (self.logits[x], {"pooled": self.feats[x]}) if features else self.logits[x]


def linear_cka(x, y):
    """||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), Kornblith et al. (2019)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_consistency_metrics_where_agreement_is_not_accuracy():
    g = torch.Generator().manual_seed(5)
    n, c = 23, 4
    y = torch.randint(0, c, (n,), generator=g)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    f_s, f_t = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 7, generator=g, dtype=torch.float64)
    out = engine.evaluate(Pair(FixedNet(s, f_s), FixedNet(t, f_t)), RowBatches(y, 5), None, torch.device("cpu"))

    top1 = 100 * sum(int(s[i].argmax()) == int(y[i]) for i in range(n)) / n
    teacher_top1 = 100 * sum(int(t[i].argmax()) == int(y[i]) for i in range(n)) / n
    agreement = 100 * sum(int(s[i].argmax()) == int(t[i].argmax()) for i in range(n)) / n
    assert len({top1, teacher_top1, agreement}) == 3, "the inputs must tell the three apart"
    p_t, p_s = t.softmax(1), s.softmax(1)
    kl = float((p_t * (p_t / p_s).log()).sum(1).mean())
    gap = float((t.exp().sum(1).log() - s.exp().sum(1).log()).mean())
    m = (p_t + p_s) / 2
    jsd = 0.5 * ((p_t * (p_t / m).log2()).sum(1) + (p_s * (p_s / m).log2()).sum(1))
    pl = float((1 - jsd.sqrt()).mean())
    expected = {"top1": top1, "teacher_top1": teacher_top1, "agreement": agreement, "kl": kl, "gap": gap, "pl": pl,
                "cka_logits": linear_cka(s, t), "cka_features": linear_cka(f_s, f_t)}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-6), key
    # KL(t || s), not KL(s || t): the two differ on these inputs.
    assert abs(kl - float((p_s * (p_s / p_t).log()).sum(1).mean())) > 1e-2


# ----------------------------------------------------------------------------------------------
# One optimiser step per batch
# ----------------------------------------------------------------------------------------------
def test_train_step_takes_one_sgd_step_per_batch_from_fresh_gradients():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)

    def loss_fn(xb, yb, index):
        return None, {"sq": ((xb @ w) ** 2).mean()}

    step = engine.TrainStep(loss_fn, torch.optim.SGD([w], lr=0.1), None, torch.device("cpu"))
    expected = w.detach().clone()
    for row in x:
        out = step(row[None], None, None)
        assert float(out[0]) == pytest.approx(float((row @ expected) ** 2))
        expected = expected - 0.1 * 2 * (row @ expected) * row      # d/dw (x.w)^2 = 2 (x.w) x
    assert torch.allclose(w.detach(), expected, rtol=1e-12)
