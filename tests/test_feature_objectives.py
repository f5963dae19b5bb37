"""The objective around each feature term (float64): ``--method NAME`` is CE + beta L as RepDistiller runs
it (``-a 0``), ``kd+NAME`` is 0.9 KL + 0.1 CE + beta L; CRD's class-aware negatives, the same for any
number of ranks and across --resume."""
import copy
import math

import pytest
import torch

import models
import train_cifar
from distillers import ALONE_BASE, DistillConfig, build_distiller, parse_method
from distillers import feature as fm
from train_cifar import CifarConfig

D = torch.float64
# RepDistiller's scripts/run_cifar_distill.sh (-b); pkt, rkd, crd also SPEC sec. 2.
BETA = {"pkt": 30000, "rkd": 1, "crd": 0.8, "fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1,
        "ab": 1, "ft": 200, "fsp": 50}
STAGE_ONLY = {"ab", "fsp"}   # their main stage adds nothing (RepDistiller: loss_kd = 0 after init)


def ce_ref(s: torch.Tensor, y: torch.Tensor) -> float:
    rows = [math.log(sum(math.exp(v) for v in s[i].tolist())) - float(s[i, y[i]]) for i in range(len(y))]
    return sum(rows) / len(rows)


def kl_ref(t: torch.Tensor, s: torch.Tensor, tau: float) -> float:
    total = 0.0
    for t_row, s_row in zip(t.tolist(), s.tolist()):
        z_t = sum(math.exp(v / tau) for v in t_row)
        z_s = sum(math.exp(v / tau) for v in s_row)
        for a, b in zip(t_row, s_row):
            p = math.exp(a / tau) / z_t
            total += p * (math.log(p) - math.log(math.exp(b / tau) / z_s))
    return tau * tau * total / len(t)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    student, teacher = models.build_model("resnet8", 100).double(), models.build_model("resnet8", 100).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=D)
    y, index = torch.tensor([3, 7, 3, 50]), torch.tensor([0, 5, 2, 9])
    labels = torch.tensor([3, 7, 3, 7, 3, 7, 50, 3, 7, 50, 3, 50])   # a bank of 12; labels[index] == y
    return student, teacher, x, y, index, labels


def total_and_reference(method: str, batch) -> tuple[dict, float, float, float, float]:
    """The distiller's losses, and CE, KL (tau 4) and L computed outside it on the same batch."""
    student, teacher, x, y, index, labels = batch
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    torch.manual_seed(11)   # the term's heads and bank: the same for NAME and kd+NAME
    distiller = build_distiller(method, student, teacher, DistillConfig(), train_labels=labels).double()
    term = distiller.feature_term
    if isinstance(term, fm.CRD):
        term.k = 16   # a bank of 12 rows; 16 draws with replacement
    distiller.train()
    term_copy, student_copy = copy.deepcopy(term), copy.deepcopy(student)
    torch.manual_seed(7)   # CRD's draw
    s, losses = distiller(x, y, index)
    with torch.no_grad():
        t, t_feats = teacher(x, features=True)
    s_ref, s_feats = student_copy(x, features=True)
    assert torch.equal(s.detach(), s_ref.detach())
    torch.manual_seed(7)
    feat = 0.0 if parse_method(method)[1] in STAGE_ONLY else float(term_copy(s_feats, t_feats, y, index).detach())
    total = sum(float(v.detach()) for v in losses.values())
    return losses, ce_ref(s.detach(), y), kl_ref(t, s.detach(), 4.0), feat, total


@pytest.mark.parametrize("name", sorted(BETA))
def test_method_alone_is_ce_plus_beta_l_and_kd_plus_adds_kd(name, batch):
    losses, ce, _, feat, total = total_and_reference(name, batch)
    assert set(losses) == ({"ce"} if name in STAGE_ONLY else {"ce", "feat"})   # no KL term
    assert math.isclose(total, ce + BETA[name] * feat, rel_tol=1e-10)
    losses, ce, kl, feat_kd, total = total_and_reference(f"kd+{name}", batch)
    assert set(losses) == ({"kl", "ce"} if name in STAGE_ONLY else {"kl", "ce", "feat"})
    assert math.isclose(total, 0.9 * kl + 0.1 * ce + BETA[name] * feat_kd, rel_tol=1e-10)
    assert math.isclose(feat, feat_kd, rel_tol=1e-12)   # the same term on the same batch


def test_nlp_terms_alone_keep_their_kd_term():
    assert parse_method("pkd") == parse_method("kd+pkd") == ("kd", "pkd")
    assert parse_method("tinybert") == parse_method("kd+tinybert") == ("kd", "tinybert")
    assert {n for n, base in ALONE_BASE.items() if base == "ce"} == set(BETA)
    with pytest.raises(ValueError, match="unknown method 'ce\\+pkt'"):
        parse_method("ce+pkt")


# ----------------------------------------------------------------------------------------------
# CRD's negatives
# ----------------------------------------------------------------------------------------------
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 0])   # unequal classes, class 3 a single image


def crd(negatives="other_class", k=3000) -> fm.CRD:
    term = fm.CRD(2, 2, len(LABELS), dim=2, k=k, negatives=negatives)
    term.bind_train_labels(LABELS)
    return term


def test_crd_negatives_come_uniformly_from_the_other_classes():
    torch.manual_seed(0)
    index = torch.tensor([0, 1, 9, 4])
    idx = crd().sample_indices(index, LABELS[index])
    assert torch.equal(idx[:, 0], index)
    for row, anchor in zip(idx[:, 1:], index.tolist()):
        others = [i for i in range(len(LABELS)) if LABELS[i] != LABELS[anchor]]
        counts = torch.bincount(row, minlength=len(LABELS))
        assert set(row.tolist()) == set(others)   # no negative shares the anchor's class; every other one drawn
        expected = row.numel() / len(others)
        assert all(abs(float(counts[i]) - expected) < 0.2 * expected for i in others)


def test_crd_uniform_negatives_exclude_only_the_anchor():
    torch.manual_seed(0)
    index = torch.tensor([0, 4, 11])
    idx = crd("uniform", k=2000).sample_indices(index, LABELS[index])
    for row, anchor in zip(idx[:, 1:], index.tolist()):
        assert set(row.tolist()) == set(range(len(LABELS))) - {anchor}


def test_crd_draw_does_not_depend_on_the_number_of_ranks(monkeypatch):
    term, index = crd(k=50), torch.tensor([0, 1, 9, 4, 5, 11])
    torch.manual_seed(3)
    single = term.sample_indices(index, LABELS[index])
    monkeypatch.setattr(fm, "_is_distributed", lambda: True)
    monkeypatch.setattr(fm.dist, "get_world_size", lambda: 2)
    slices = []
    for rank in (0, 1):   # each rank holds its half of the global batch and the same RNG state
        monkeypatch.setattr(fm.dist, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(3)
        part = index[rank * 3:(rank + 1) * 3]
        slices.append(term.sample_indices(part, LABELS[part]))
    assert torch.equal(torch.cat(slices), single)


def test_crd_refuses_bad_settings():
    with pytest.raises(ValueError, match="crd_negatives must be one of other_class, uniform"):
        DistillConfig(crd_negatives="same_class")
    with pytest.raises(RuntimeError, match="need the training labels"):
        fm.CRD(2, 2, 4, dim=2, k=3).sample_indices(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="at least two classes"):
        fm.CRD(2, 2, 4, dim=2).bind_train_labels(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="3 training labels for a bank of 4"):
        fm.CRD(2, 2, 4, dim=2).bind_train_labels(torch.tensor([0, 1, 0]))


def test_crd_resumed_run_draws_what_an_uninterrupted_one_draws(fake_cifar, teacher_ckpt, tmp_path):
    keys = dict(method="crd", teacher="resnet8", student="resnet8", teacher_ckpt=str(teacher_ckpt), batch_size=8,
                limit_batches=1, eval_batch_size=16, log_every=1, data_dir=str(fake_cifar), epochs=2)
    train_cifar.run(CifarConfig(**keys, out=str(tmp_path / "straight")))
    train_cifar.run(CifarConfig(**{**keys, "epochs": 1}, out=str(tmp_path / "split")))
    train_cifar.run(CifarConfig(**keys, out=str(tmp_path / "split")), resume=True)
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=True)["distiller"] for run in ("straight", "split"))
    for part in ("student", "feature_term"):   # the bank's rows and the heads depend on every draw
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
