"""distillers/feature.py: every loss against an independent float64 formula, every method end to end through
train_cifar.run on a fake CIFAR pickle, CRD's memory bank across --resume and its bank and negatives across two
DDP ranks."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import torchrun

import engine
import models
import train_cifar
from distillers import FEATURE_TERMS, DistillConfig, build_distiller, parse_method
from distillers import feature as fm
from train_cifar import CifarConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(teacher="resnet8", student="resnet8", epochs=1, batch_size=16, limit_batches=2, eval_batch_size=16,
            log_every=1, init_epochs=1)
D = torch.float64



def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def feats(pooled=None, stages=None, preact=None) -> dict:
    return {"pooled": pooled if pooled is not None else rand(4, 3), "stages": stages, "preact_stages": preact}


def huber(a, b):
    x = (a - b).abs()
    return torch.where(x < 1, 0.5 * x * x, x - 0.5).mean()


def pool_to(f, size):
    """Independent of adaptive pooling: the sizes here are integer multiples."""
    k = f.shape[2] // size
    return torch.nn.functional.avg_pool2d(f, k) if k > 1 else f


# ----------------------------------------------------------------------------------------------
# Each loss against its formula, written out here in float64
# ----------------------------------------------------------------------------------------------
def test_registry_holds_every_method_and_its_default_weight():
    weights = {"pkt": 30000, "rkd": 1, "crd": 0.8, "fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1,
               "ab": 1, "ft": 200, "fsp": 50}
    assert set(fm.FACTORIES) == set(weights) and set(weights) <= set(FEATURE_TERMS)
    s, t = models.build_model("resnet8", 100), models.build_model("resnet14", 100)
    for name, w in weights.items():
        assert parse_method(name) == ("ce", name) and parse_method(f"pesf+{name}") == ("pesf", name)
        assert FEATURE_TERMS[name](s, t, DistillConfig(), 100).default_weight == w


def test_pkt():
    f_s, f_t = rand(5, 4, seed=1), rand(5, 6, seed=2)

    def cond(f):
        n = len(f)
        k = torch.tensor([[(1 + float(f[i] @ f[j]) / float(f[i].norm() * f[j].norm())) / 2 for j in range(n)]
                          for i in range(n)], dtype=D)
        return k / k.sum(1, keepdim=True)

    p, q = cond(f_s), cond(f_t)
    expected = (q * (q / p).log()).mean()
    got = fm.PKT()(feats(f_s), feats(f_t), None, None)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_rkd():
    s, t = rand(5, 4, seed=3), rand(5, 7, seed=4)

    def dist(e):
        n = len(e)
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(n)] for i in range(n)], dtype=D)
        return d / (d.sum() / (n * (n - 1)))

    def angles(e):
        n, out = len(e), []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a, b = e[j] - e[i], e[k] - e[i]
                    out.append(0.0 if i in (j, k) else float(a @ b / (a.norm() * b.norm())))
        return torch.tensor(out, dtype=D)

    expected = 25 * huber(dist(s), dist(t)) + 50 * huber(angles(s), angles(t))
    assert torch.allclose(fm.RKD()(feats(s), feats(t), None, None), expected, rtol=1e-6)


def test_attention_pools_the_larger_map_and_sums_stages():
    s = [rand(3, 2, 8, 8, seed=5), rand(3, 4, 8, 8, seed=6), rand(3, 5, 4, 4, seed=7)]
    t = [rand(3, 3, 8, 8, seed=8), rand(3, 6, 4, 4, seed=9), rand(3, 2, 4, 4, seed=10)]

    def att(f):
        a = (f ** 2).sum(1).reshape(len(f), -1) / f.shape[1]
        return a / a.norm(dim=1, keepdim=True)

    expected = sum(((att(pool_to(a, 4)) - att(pool_to(b, 4))) ** 2).mean() for a, b in zip(s[1:], t[1:]))
    got = fm.Attention()(feats(stages=s), feats(stages=t), None, None)
    assert torch.allclose(got, expected, rtol=1e-6)


def test_similarity():
    s, t = rand(4, 3, 2, 2, seed=11), rand(4, 5, 2, 2, seed=12)

    def gram(f):
        f = f.reshape(len(f), -1)
        g = f @ f.T
        return g / g.norm(dim=1, keepdim=True)

    expected = ((gram(t) - gram(s)) ** 2).sum() / 16
    assert torch.allclose(fm.Similarity()(feats(stages=[s]), feats(stages=[t]), None, None), expected, rtol=1e-6)


def test_correlation_with_its_embeddings():
    term = fm.Correlation(3, 5, dim=4).double()
    f_s, f_t = rand(6, 3, seed=13), rand(6, 5, seed=14)
    with torch.no_grad():
        e_s = f_s @ term.embed_s.linear.weight.T + term.embed_s.linear.bias
        e_t = f_t @ term.embed_t.linear.weight.T + term.embed_t.linear.bias
    delta = (e_s - e_t).abs()
    expected = sum(float(delta[i] @ delta[i + 1]) for i in range(5)) / 5
    assert math.isclose(float(term(feats(f_s), feats(f_t), None, None).detach()), expected, rel_tol=1e-6)


def test_vid_is_a_gaussian_nll_starting_at_variance_5():
    term = fm.VID([2, 3], [4, 2]).double()
    s = [None, rand(3, 2, 4, 4, seed=15), rand(3, 3, 2, 2, seed=16)]
    t = [None, rand(3, 4, 2, 2, seed=17), rand(3, 2, 2, 2, seed=18)]
    expected = 0
    for head, a, b in zip(term.heads, s[1:], t[1:]):
        var = torch.log(1 + torch.exp(head.log_scale)) + 1e-5
        assert torch.allclose(var, torch.full_like(var, 5.0))
        mu = head.regressor(pool_to(a, b.shape[2]))
        expected = expected + (0.5 * ((mu - b) ** 2 / var.view(1, -1, 1, 1) + var.log().view(1, -1, 1, 1))).mean()
    assert torch.allclose(term(feats(stages=s), feats(stages=t), None, None), expected, rtol=1e-6)


def test_fitnet_regressor_shapes_and_hint_loss():
    for s_shape, t_shape in (((2, 3, 8, 8), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 5, 8, 8)), ((2, 3, 6, 6), (2, 5, 4, 4))):
        reg = fm.conv_regressor(torch.Size(s_shape), torch.Size(t_shape))
        assert reg(torch.zeros(s_shape)).shape == t_shape
    term = fm.FitNet(torch.Size((2, 3, 8, 8)), torch.Size((2, 5, 4, 4))).double()
    s = [None, None, rand(2, 3, 8, 8, seed=19)]
    t = [None, None, rand(2, 5, 4, 4, seed=20)]
    r = term.regressor(s[2])
    expected = ((r - t[2]) ** 2).sum() / r.numel()
    assert torch.allclose(term(feats(stages=s), feats(stages=t), None, None), expected, rtol=1e-6)


def test_activation_boundary_init_loss_and_no_main_stage_loss():
    shapes = [torch.Size((3, 2, 4, 4)), torch.Size((3, 4, 2, 2))]
    term = fm.ActivationBoundaries(shapes, shapes)
    stage = term.init_stage(nn.Linear(1, 1))
    s = [None, rand(3, 2, 4, 4, seed=21), rand(3, 4, 2, 2, seed=22)]
    t = [None, rand(3, 2, 4, 4, seed=23), rand(3, 4, 2, 2, seed=24)]
    expected = 0.0
    for i, (a, b) in enumerate(zip(s[1:], t[1:])):
        per = 0.0
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
            if y <= 0 and x > -1:
                per += (x + 1) ** 2
            elif y > 0 and x <= 1:
                per += (x - 1) ** 2
        expected += 2.0 ** (i - 1) * per
    expected = expected / 3 * 3 / 1000
    got = stage.loss(feats(preact=s), feats(preact=t))
    assert math.isclose(float(got), expected, rel_tol=1e-9)
    assert not term.main_stage   # the main run adds nothing (RepDistiller); e2e: no train_feat logged


def test_factor_transfer_uses_the_frozen_paraphraser():
    term = fm.FactorTransfer(3, 4).double()
    assert not any(p.requires_grad for p in term.paraphraser.parameters())
    term.eval()   # translator BatchNorm with its initial statistics, so that the formula below is exact
    s, t = rand(2, 3, 4, 4, seed=25), rand(2, 4, 2, 2, seed=26)

    def factor(f):
        a = (f ** 2).sum(1).reshape(len(f), -1) / f.shape[1]
        return a / a.norm(dim=1, keepdim=True)

    expected = (factor(pool_to(term.translator(s), 2)) - factor(term.paraphraser.encoder(t))).abs().mean()
    assert torch.allclose(term(feats(stages=[s]), feats(stages=[t]), None, None), expected, rtol=1e-6)
    stage = term.init_stage(nn.Linear(1, 1))
    rec = term.paraphraser.decoder(term.paraphraser.encoder(t))
    assert not stage.uses_student and stage.modules == [term.paraphraser]
    assert torch.allclose(stage.loss(None, feats(stages=[t])), ((rec - t) ** 2).mean(), rtol=1e-6)


def test_fsp_flow_matrices():
    s = [rand(2, 3, 4, 4, seed=27), rand(2, 2, 4, 4, seed=28), rand(2, 4, 2, 2, seed=29)]
    t = [rand(2, 3, 4, 4, seed=30), rand(2, 2, 4, 4, seed=31), rand(2, 4, 2, 2, seed=32)]

    def flows(g):
        out = []
        for a, b in zip(g[:-1], g[1:]):
            size = min(a.shape[2], b.shape[2])
            a, b = pool_to(a, size), pool_to(b, size)
            out.append(torch.tensor([[[float((a[n, i] * b[n, j]).sum()) / size ** 2 for j in range(b.shape[1])]
                                      for i in range(a.shape[1])] for n in range(len(a))], dtype=D))
        return out

    expected = sum(((x - y) ** 2).mean() for x, y in zip(flows(s), flows(t)))
    stage = fm.FSP().init_stage(nn.Linear(1, 1))
    assert torch.allclose(stage.loss(feats(stages=s), feats(stages=t)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="equal channels"):
        fm.FSP.from_models(models.build_model("vgg8", 100), models.build_model("resnet8", 100), DistillConfig(), 1)


def test_crd_nce_memory_update_and_normaliser():
    torch.manual_seed(0)
    n, k, b, temp = 10, 6, 3, 0.07
    term = fm.CRD(4, 5, n, dim=3, k=k).double()
    term.bind_train_labels(torch.arange(n) % 4)
    f_s, f_t, index = rand(b, 4, seed=33), rand(b, 5, seed=34), torch.tensor([7, 0, 3])
    y = index % 4
    mem_s, mem_t = term.memory_s.clone(), term.memory_t.clone()
    torch.manual_seed(5)
    idx = term.sample_indices(index, y)
    torch.manual_seed(5)
    got = term(feats(f_s), feats(f_t), y, index)

    def embed(e, f):
        v = f @ e.linear.weight.T + e.linear.bias
        return v / v.norm(dim=1, keepdim=True)

    v_s, v_t = embed(term.embed_s, f_s), embed(term.embed_t, f_t)

    def nce(v, memory):
        scores = torch.tensor([[math.exp(float(memory[j] @ v[i].detach()) / temp) for j in idx[i].tolist()]
                               for i in range(b)], dtype=D)
        z = float(scores.mean()) * n
        p, noise = scores / z, k / n
        loss = -sum(math.log(p[i, 0] / (p[i, 0] + noise)) + sum(math.log(noise / (p[i, j] + noise))
                                                                 for j in range(1, k + 1)) for i in range(b)) / b
        return loss, z

    (loss_s, z_s), (loss_t, z_t) = nce(v_s, mem_t), nce(v_t, mem_s)
    assert math.isclose(float(got.detach()), loss_s + loss_t, rel_tol=1e-6)
    assert torch.allclose(term.z, torch.tensor([z_s, z_t], dtype=D))
    for memory, before, v in ((term.memory_s, mem_s, v_s), (term.memory_t, mem_t, v_t)):
        for row in range(n):
            if row in index.tolist():
                mixed = 0.5 * before[row] + 0.5 * v[index.tolist().index(row)]
                assert torch.allclose(memory[row], mixed / mixed.norm())
            else:
                assert torch.equal(memory[row], before[row])
    z_before = term.z.clone()
    term(feats(rand(b, 4, seed=35)), feats(rand(b, 5, seed=36)), torch.tensor([1, 2, 1]), torch.tensor([1, 2, 9]))
    assert torch.equal(term.z, z_before)   # Z is estimated once, on the first batch


# ----------------------------------------------------------------------------------------------
# End to end through train_cifar.run
# ----------------------------------------------------------------------------------------------
def run(tmp_path, data, **keys) -> dict:
    cfg = CifarConfig(**{**TINY, "data_dir": str(data), "out": str(tmp_path / "run"), **keys})
    return train_cifar.run(cfg)


@pytest.mark.parametrize("method", [*fm.FACTORIES, "pesf+pkt", "pesf+crd", "pesf+fitnet"])
def test_every_method_runs(method, fake_cifar, teacher_ckpt, tmp_path, capsys):
    summary = run(tmp_path, fake_cifar, method=method, teacher_ckpt=str(teacher_ckpt))
    assert 0 <= summary["top1"] <= 100
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert ('"train_feat"' in rows[-1]) == (parse_method(method)[1] not in ("ab", "fsp"))   # stage-only terms
    # The projection heads are trained and counted; the PESF teacher adds only its adapter.
    distiller = build_distiller(method, models.build_model("resnet8", 100),
                                models.build_model("resnet8", 100, adapter="houlsby" if "pesf" in method else None),
                                DistillConfig(), num_train=160)
    assert summary["updated_params"] == distiller.updated_params()
    term = distiller.feature_term
    heads = sum(p.numel() for p in term.parameters() if p.requires_grad)
    assert (heads > 0) == (parse_method(method)[1] in ("crd", "fitnet", "cc", "vid", "ft"))
    ran_stage = "init stage" in capsys.readouterr().out
    assert ran_stage == (parse_method(method)[1] in ("fitnet", "ab", "ft", "fsp"))


def test_init_stage_trains_the_paraphraser_and_defaults_per_method(fake_cifar, teacher_ckpt, tmp_path):
    assert fm.init_epochs_of(fm.FSP(), None) == 30 and fm.init_epochs_of(fm.PKT(), 5) == 0
    assert fm.init_epochs_of(fm.FitNet(torch.Size((1, 1, 4, 4)), torch.Size((1, 1, 4, 4))), None) == 0
    student, teacher = models.build_model("resnet8", 100), models.build_model("resnet8", 100)
    distiller = build_distiller("ft", student, teacher, DistillConfig(init_epochs=1), num_train=160)
    before = {k: v.clone() for k, v in distiller.feature_term.paraphraser.state_dict().items()}
    images, labels = train_cifar.load_cifar100(fake_cifar)["train"]
    batches = train_cifar.DeviceBatches(images, labels, 16, torch.device("cpu"), train=True, limit=2)
    assert fm.run_init_stage(distiller, batches, lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
                              log=lambda _: None) == 1
    after = distiller.feature_term.paraphraser.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not any(p.requires_grad for p in distiller.feature_term.paraphraser.parameters())


@pytest.mark.parametrize("student_arch, lr", [("resnet8", 0.01), ("vgg8", 0.05)])
def test_ft_init_stage_runs_as_repdistillers_init(fake_cifar, student_arch, lr):
    """RepDistiller helper/pretrain.py l. 12-31 and 68-83 (train_student.py l. 239-248): the teacher in eval
    mode, the paraphraser alone trained by SGD (momentum 0.9, weight decay 5e-4) at a constant lr of 0.01 when
    the student is a CIFAR ResNet or WRN, else the student's lr, one step per batch on the MSE of the
    reconstructed teacher's last stage."""
    cfg = train_cifar.CifarConfig(method="ft", teacher="resnet8", student=student_arch, init_epochs=1)
    torch.manual_seed(0)
    student, teacher = models.build_model(student_arch, 100), models.build_model("resnet8", 100)
    distiller = build_distiller("ft", student, teacher, DistillConfig.from_run_config(cfg), num_train=160)
    images, labels = train_cifar.load_cifar100(fake_cifar)["train"]
    batches = train_cifar.DeviceBatches(images, labels, 16, torch.device("cpu"), train=True, limit=1)
    made, teacher_modes = [], []
    teacher.register_forward_hook(lambda module, *_: teacher_modes.append(module.training))

    def sgd(params, stage_lr):
        made.append(train_cifar.sgd(params, stage_lr, cfg))    # the optimiser train_cifar.run gives the stage
        return made[-1]

    fm.run_init_stage(distiller, batches, sgd, log=lambda _: None)
    [group] = made[0].param_groups
    assert (type(made[0]), group["lr"], group["momentum"], group["weight_decay"]) == (torch.optim.SGD, lr, 0.9, 5e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in distiller.feature_term.paraphraser.parameters()}
    assert teacher_modes == [False]


def capture_distillers(monkeypatch) -> list:
    built = []
    original = train_cifar.build_distiller

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        built.append(built[-1].feature_term.memory_s.clone())
        return built[-2]

    monkeypatch.setattr(train_cifar, "build_distiller", build)
    return built


def test_crd_bank_survives_resume(fake_cifar, teacher_ckpt, tmp_path, monkeypatch):
    run(tmp_path, fake_cifar, method="crd", teacher_ckpt=str(teacher_ckpt))
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["distiller"]["feature_term"]
    built = capture_distillers(monkeypatch)
    cfg = CifarConfig(**{**TINY, "method": "crd", "teacher_ckpt": str(teacher_ckpt), "data_dir": str(fake_cifar),
                         "out": str(tmp_path / "run")})
    train_cifar.run(cfg, resume=True)   # epochs already done: loads the checkpoint, trains nothing
    distiller, fresh = built
    loaded = engine.unwrap(distiller.feature_term)
    assert not torch.equal(fresh, saved["memory_s"])
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(getattr(loaded, name), saved[name]), name


WORKER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import engine, train_cifar
from distillers import feature

built, draws = [], []
original = train_cifar.build_distiller
def build(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]
train_cifar.build_distiller = build
sample = feature.CRD.sample_indices
def record(self, index, y):
    rng = torch.get_rng_state()
    draws.append(dict(rng=rng, index=index, y=y, drawn=sample(self, index, y)))
    return draws[-1]["drawn"]
feature.CRD.sample_indices = record
code = train_cifar.main(sys.argv[1:])
term = engine.unwrap(built[0].feature_term)
torch.save({{k: v for k, v in term.state_dict().items() if not k.startswith("embed")}},
           os.path.join({out!r}, "bank_rank" + os.environ["RANK"] + ".pt"))
torch.save(draws[0], os.path.join({out!r}, "draw_rank" + os.environ["RANK"] + ".pt"))
sys.exit(code)
"""


def test_crd_bank_identical_on_two_ddp_ranks(fake_cifar, teacher_ckpt, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    args = ["--method", "crd", "--teacher", "resnet8", "--student", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
            "--data-dir", str(fake_cifar), "--epochs", "1", "--batch-size", "32", "--limit-batches", "2",
            "--device", "cpu", "--out", str(tmp_path / "two")]
    torchrun([str(worker), *args])
    rank0, rank1 = (torch.load(tmp_path / f"bank_rank{r}.pt", weights_only=True) for r in (0, 1))
    ckpt = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["distiller"]["feature_term"]
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(rank0[name], rank1[name]) and torch.equal(rank0[name], ckpt[name]), name
    # Both ranks' samples reached the bank: the changed rows are exactly the two global batches.
    torch.manual_seed(0)   # the script seeds with --seed 0; student and teacher are built before the bank
    models.build_model("resnet8", 100)
    models.build_model("resnet8", 100)
    initial = fm.CRD(64, 64, 160).memory_s
    images, labels = train_cifar.load_cifar100(fake_cifar)["train"]
    seen = torch.cat([idx for _, _, idx in train_cifar.DeviceBatches(images, labels, 32, torch.device("cpu"),
                                                                     train=True, limit=2).epoch(0)])
    changed = (rank0["memory_s"] != initial).any(1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(seen.tolist())
    # Both ranks drew from the same RNG state, and together drew what one process draws for the global batch.
    draw0, draw1 = (torch.load(tmp_path / f"draw_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(draw0["rng"], draw1["rng"])
    term = fm.CRD(64, 64, 160, k=16384)
    term.bind_train_labels(labels)
    torch.set_rng_state(draw0["rng"])
    single = term.sample_indices(torch.cat([draw0["index"], draw1["index"]]), torch.cat([draw0["y"], draw1["y"]]))
    assert torch.equal(torch.cat([draw0["drawn"], draw1["drawn"]]), single)
    assert not (labels[single[:, 1:]] == labels[single[:, :1]]).any()   # no negative of the anchor's class
