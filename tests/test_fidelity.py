"""The authors'-code switches (README "Fidelity switches"): each against an independent float64 reference,
the presets, and what the official semantics imply (pesf_official's student is kd_official's)."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import engine
import models
import train_cifar
from models.bert import BertConfig, BertForSequenceClassification
from distillers import DistillConfig, build_distiller
from train_cifar import CifarConfig
from train_glue import GlueConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(teacher="resnet8", student="resnet8", epochs=1, batch_size=16, limit_batches=8, eval_batch_size=50,
            log_every=1)


def kl64(target: torch.Tensor, learner: torch.Tensor, tau: float) -> torch.Tensor:
    p = F.softmax(target.double() / tau, 1)
    return (p * (p.log() - F.log_softmax(learner.double() / tau, 1))).sum(1).mean() * tau * tau


def adj64(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = z.double().clone()
    for i, (row, label) in enumerate(zip(z, y)):
        top = int(row.argmax())
        row[top], row[label] = row[label].item(), row[top].item()
    return z


def official_head64(net: torch.nn.Module, h: torch.Tensor, sign: float) -> torch.Tensor:
    fc = net.fc
    w1, w2, w3 = (net.adapter.net[i] for i in (0, 1, 3))
    h = h.double()
    delta = F.linear(F.relu(F.linear(F.linear(h, w1.weight.double(), w1.bias.double()), w2.weight.double(),
                                     w2.bias.double())), w3.weight.double(), w3.bias.double())
    return F.linear(h, fc.weight.double(), fc.bias.double()) + sign * delta


def pooled64(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, _, last = net._stages(x)
    return F.adaptive_avg_pool2d(last, 1).flatten(1)


def test_official_adapter_subtracts_in_training_and_adds_in_evaluation():
    torch.manual_seed(0)
    net = models.build_model("resnet8", 100, adapter="official")
    assert models.count_trainable(net.adapter) == 64 * 100 + 100 + 100 * 32 + 32 + 32 * 100 + 100
    assert net.adapter.net[-1].weight.abs().sum() > 0          # random init: the offset starts non-zero
    x = torch.randn(4, 3, 32, 32)
    net.train()
    with torch.no_grad():
        logits, feats = net(x, features=True)
        h = pooled64(net, x)     # BatchNorm in train mode sees the same batch: same statistics
    torch.testing.assert_close(logits.double(), official_head64(net, h, -1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["logits_unadapted"].double(),
                               F.linear(h.double(), net.fc.weight.double(), net.fc.bias.double()), rtol=1e-5, atol=1e-5)
    net.eval()
    with torch.no_grad():
        h = pooled64(net, x)
        torch.testing.assert_close(net(x).double(), official_head64(net, h, 1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only slot='head'"):
        models.build_model("resnet8", 100, adapter="official", slot="stages")


@pytest.mark.parametrize("method", ["kd", "pesf"])
def test_teacher_bn_train_uses_and_updates_batch_statistics(method):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    for mode in ("eval", "train"):
        teacher = models.build_model("resnet8", 100, adapter="houlsby" if method == "pesf" else None)
        reference = copy.deepcopy(teacher).train(mode == "train")    # the teacher the KL should see
        with torch.no_grad():
            t_ref = reference(x)
        d = build_distiller(method, models.build_model("resnet8", 100), teacher,
                            DistillConfig(teacher_bn=mode, label_adjust=False)).train()
        before = teacher.bn1.running_mean.clone()
        s, losses = d(x, y)
        assert torch.equal(teacher.bn1.running_mean, before) == (mode == "eval"), mode
        torch.testing.assert_close(losses["kl"].double(), 0.9 * kl64(t_ref, s.detach(), 4.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="teacher_bn must be eval or train"):
        DistillConfig(teacher_bn="batch")


def test_pesf_official_switches_match_their_equations():
    """student_target=unadapted: KL_tau(adj(fc(h)) || s); teacher_kl=official: KL_tau(t || adj(s).detach())
    with t = fc(h) - d(h), gradients reaching the adapter only."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    teacher = models.build_model("resnet8", 100, adapter="official")
    cfg = DistillConfig(student_target="unadapted", teacher_kl="official", w_tce=1.0, w_tkl=0.7)
    d = build_distiller("pesf", models.build_model("resnet8", 100), teacher, cfg).train()
    s, losses = d(x, y)
    with torch.no_grad():
        h = pooled64(teacher.eval(), x)   # teacher_bn=eval: running statistics, as in the step above
        teacher.train()
        t_raw = F.linear(h.double(), teacher.fc.weight.double(), teacher.fc.bias.double())
        t = official_head64(teacher, h, -1.0)
    s64 = s.detach().double()
    torch.testing.assert_close(losses["kl"].double(), 0.9 * kl64(adj64(t_raw, y), s64, 4.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["teacher_kl"].double(), 0.7 * kl64(t, adj64(s64, y), 4.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["teacher_ce"].double(), F.cross_entropy(t, y), rtol=1e-5, atol=1e-6)
    losses["teacher_kl"].backward()
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.adapter.parameters())


def test_ftkd_official_teacher_learns_only_from_its_own_kl_and_ce():
    """teacher_kl=official for ftkd (the authors' cv/helper/loops.py l. 133-139, 167): the student's target
    adj(t) goes through numpy, so the student's KL reaches no teacher parameter; the teacher's loss is
    w_tkl * KL_tau(t || adj(s).detach()) + w_tce * CE(t, y). The paper's text (default) has no teacher KL
    and lets the student's KL train the teacher."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    for mode in ("official", "paper"):
        teacher = models.build_model("resnet8", 100)
        cfg = DistillConfig(alpha=0.7, tau=3.0, w_tce=0.45, w_tkl=0.2, w_ce=0.35, teacher_kl=mode)
        d = build_distiller("ftkd", models.build_model("resnet8", 100), teacher, cfg).train()
        with torch.no_grad():
            t64 = copy.deepcopy(teacher).train()(x).double()     # the trained teacher runs in train mode
        s, losses = d(x, y)
        s64 = s.detach().double()
        torch.testing.assert_close(losses["kl"].double(), 0.7 * kl64(adj64(t64, y), s64, 3.0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["ce"].double(), 0.35 * F.cross_entropy(s64, y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["teacher_ce"].double(), 0.45 * F.cross_entropy(t64, y), rtol=1e-5,
                                   atol=1e-6)
        losses["kl"].backward(retain_graph=True)
        reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters()]
        assert any(reached) == (mode == "paper"), mode
        if mode == "paper":
            assert "teacher_kl" not in losses
            continue
        torch.testing.assert_close(losses["teacher_kl"].double(), 0.2 * kl64(t64, adj64(s64, y), 3.0), rtol=1e-5,
                                   atol=1e-6)
        d.zero_grad(set_to_none=True)
        losses["teacher_kl"].backward()
        assert all(p.grad is None for p in d.student.parameters())
        assert teacher.fc.weight.grad.abs().sum() > 0


def test_grad_accum_sums_gradients_of_n_batches_per_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3, bias=False)
    w = model.weight.detach().double().clone()
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(4)]

    def loss_fn(x, y, index):
        out = model(x)
        return out, {"ce": F.cross_entropy(out, y)}

    step = engine.TrainStep(loss_fn, torch.optim.SGD(model.parameters(), lr=0.5), None, torch.device("cpu"),
                            grad_accum=2)
    for i, (x, y) in enumerate(batches):
        step(x, y, None)
        if i % 2 == 1:   # reference: one SGD step on the sum (not the mean) of two batches' gradients
            w_ = w.clone().requires_grad_(True)
            sum(F.cross_entropy(F.linear(xb.double(), w_), yb) for xb, yb in batches[i - 1:i + 1]).backward()
            w = w - 0.5 * w_.grad
        torch.testing.assert_close(model.weight.detach().double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reset", ["epoch", "run"])
def test_grad_accum_reset_epoch_counts_as_the_authors_loop_on_a_782_batch_epoch(reset):
    """The authors' cv/helper/loops.py l. 97 and 263-267: ``(idx + 1) % 4`` with idx from each epoch's
    enumerate, zero_grad only after a step. 50,000 images at batch 64 without drop_last are 782 batches: epoch
    1 steps after batches 4, 8, ..., 780; batches 781-782 join epoch 2's first step (6 batches). Counted over
    the run instead, epoch 2's first step comes after 2 of its batches (4 in all)."""
    torch.manual_seed(0)
    epochs, per_epoch, batches = 2, 782, [(torch.randn(2, 5, dtype=torch.float64), torch.randint(0, 3, (2,)))
                                          for _ in range(782)]
    model = torch.nn.Linear(5, 3, bias=False).double()
    reference = copy.deepcopy(model)
    stepped_after = []

    def loss_fn(x, y, index):
        out = model(x)
        return out, {"ce": F.cross_entropy(out, y)}

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = engine.TrainStep(loss_fn, opt, None, torch.device("cpu"), grad_accum=4, grad_accum_reset=reset)
    opt.register_step_post_hook(lambda *_: stepped_after.append(step.calls))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    count = 0
    for _ in range(epochs):
        for idx, (x, y) in enumerate(batches):
            step(x, y, None, batch=idx)
            F.cross_entropy(reference(x), y).backward()      # the reference loop, written as theirs
            count += 1
            if ((idx if reset == "epoch" else count - 1) + 1) % 4 == 0:
                ref_opt.step()
                ref_opt.zero_grad()
    assert len(batches) == per_epoch
    first_in_epoch_2 = next(c for c in stepped_after if c > per_epoch)
    assert first_in_epoch_2 - max(c for c in stepped_after if c <= per_epoch) == (6 if reset == "epoch" else 4)
    assert first_in_epoch_2 == (per_epoch + 4 if reset == "epoch" else per_epoch + 2)
    assert len(stepped_after) == (2 * 195 if reset == "epoch" else 391)
    torch.testing.assert_close(model.weight, reference.weight, rtol=1e-12, atol=1e-12)
    with pytest.raises(engine.ConfigError, match="grad_accum_reset"):
        engine.TrainStep(loss_fn, opt, None, torch.device("cpu"), grad_accum=4, grad_accum_reset="step")


def test_fit_keeps_the_last_partial_batch_and_counts_grad_accum_per_epoch(fake_cifar, teacher_ckpt, tmp_path):
    """88 images at batch 16 without drop_last: 6 batches per epoch (the last of 8). Per-epoch counting with
    grad_accum 4 steps after batch 4 of each epoch, so 2 batches are pending after each epoch; counted over the
    run, 12 batches are 3 full steps and none is pending."""
    pending = {}
    for reset in ("epoch", "run"):
        preset = dict(epochs=2, limit_batches=0, train_subset=88, drop_last=False, grad_accum_reset=reset,
                      out=str(tmp_path / reset))
        student_after(tmp_path, fake_cifar, teacher_ckpt, "kd_official", **preset)
        ckpt = torch.load(tmp_path / reset / "last.pt", weights_only=False)
        pending[reset] = (ckpt["accum"]["calls"], ckpt["accum"]["pending"])
        rows = (tmp_path / reset / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2
    assert pending == {"epoch": (12, 2), "run": (12, 0)}


def test_lr_overwrite_sets_every_group_to_the_students_lr_after_a_decay():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.05, "name": "student"},
                           {"params": [params[1]], "lr": 1e-4, "name": "adapters"}])
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    for overwrite, factor, expected in ((True, 1.0, [0.05, 1e-4]), (True, 0.1, [0.005, 0.005]),
                                        (False, 0.1, [0.005, 1e-5])):
        engine.set_lr(opt, factor, overwrite=overwrite)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)
    assert engine.lr_factor(150, 240, "step", [150, 180, 210], 0.1) == pytest.approx(0.1)


PAIRS = ["resnet56_resnet20", "resnet110_resnet32", "vgg13_vgg8", "resnet56_vgg8"]


@pytest.mark.parametrize("protocol", ["", "short/"])
def test_presets_switch_on_what_the_authors_code_does(protocol):
    for pair in PAIRS:
        folder = ROOT / "configs" / "cifar" / f"{protocol}{pair}"
        load = lambda stem: engine.build_config(CifarConfig, str(folder / f"{stem}.yaml"))  # noqa: E731
        kd, kd_adj, kd_off, pesf_off, ftkd_off = map(load, ("kd", "kd_adj", "kd_official", "pesf_official",
                                                             "ftkd_official"))
        kd_code, pesf_code, ftkd_code = map(load, ("kd_codedefaults", "pesf_codedefaults", "ftkd_codedefaults"))
        assert kd.label_adjust is None and kd_adj.label_adjust is True and kd_adj.teacher_bn == "eval"
        for cfg in (kd_off, pesf_off, ftkd_off, kd_code, pesf_code, ftkd_code):
            assert (cfg.label_adjust, cfg.teacher_bn, cfg.grad_accum, cfg.grad_accum_reset, cfg.drop_last,
                    cfg.lr_overwrite, cfg.tau, cfg.alpha) == (True, "train", 4, "epoch", False, True, 6.0, 0.9)
        for off, code in ((kd_off, kd_code), (pesf_off, pesf_code), (ftkd_off, ftkd_code)):
            # the paper's values where the code's defaults conflict with them; the code's in *_codedefaults
            assert (off.method, off.batch_size, off.w_ce, off.adapter_lr) == (code.method, 64, None, 1e-4)
            assert (code.batch_size, code.w_ce) == (11, 1.0)
        assert pesf_code.adapter_lr == 2e-5
        for cfg in (pesf_off, pesf_code):
            assert (cfg.student_target, cfg.adapter_form, cfg.teacher_kl, cfg.w_tce) == \
                ("unadapted", "official", "official", 1.0)
        for cfg in (ftkd_off, ftkd_code):
            assert (cfg.teacher_lr, cfg.teacher_kl, cfg.w_tce) == (1e-4, "official", 0.5)
        assert kd_off.method == "kd" and ftkd_off.method == "ftkd"
        if protocol:
            assert (kd.epochs, kd.lr_milestones) == (60, [37, 45, 52])
            assert kd.teacher_ckpt == f"runs/cifar/short/teachers/{kd.teacher}_s0/last.pt"
            assert (ROOT / "configs" / "cifar" / "short" / "teachers" / f"{kd.teacher}.yaml").is_file()


def student_after(tmp_path, data, ckpt, preset: str, **keys) -> dict:
    keys.setdefault("out", str(tmp_path / preset))
    cfg = engine.build_config(CifarConfig, str(ROOT / "configs/cifar/resnet56_resnet20" / f"{preset}.yaml"),
                              overrides={**TINY, "teacher_ckpt": str(ckpt), "data_dir": str(data), **keys})
    train_cifar.run(cfg)
    return torch.load(Path(keys["out"]) / "last.pt", weights_only=False)["distiller"]["student"]


def test_pesf_official_student_is_the_kd_official_student(fake_cifar, teacher_ckpt, tmp_path):
    """The authors' PESF-KD student learns from the unadapted, label-adjusted teacher, exactly like their KD
    student: same seed, same weights after every step (here: two accumulated steps of 4 batches)."""
    kd_official = student_after(tmp_path, fake_cifar, teacher_ckpt, "kd_official")
    pesf_official = student_after(tmp_path, fake_cifar, teacher_ckpt, "pesf_official")
    pesf = student_after(tmp_path, fake_cifar, teacher_ckpt, "pesf", grad_accum=4, teacher_bn="train")
    before = models.build_model("resnet8", 100).state_dict()
    for k, v in kd_official.items():
        assert torch.equal(v, pesf_official[k]), k
    moved = [k for k, v in kd_official.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved
    # the paper's PESF-KD student (adapted teacher as target) is a different student
    assert any(not torch.equal(v, pesf[k]) for k, v in kd_official.items())


def test_fit_wires_grad_accum_and_lr_overwrite(fake_cifar, teacher_ckpt, tmp_path):
    # 3 batches with grad_accum 4: no optimiser step has happened yet, the student's weights are still its init
    student = student_after(tmp_path, fake_cifar, teacher_ckpt, "kd_official", limit_batches=3)
    engine.seed_everything(0)
    init = models.build_model("resnet8", 100)
    for name, p in init.named_parameters():
        assert torch.equal(student[name], p.detach()), name
    # FT-KD official: teacher lr 1e-4 until the decay, then the student's lr for every group
    student_after(tmp_path, fake_cifar, teacher_ckpt, "ftkd_official", epochs=2, limit_batches=1, lr_milestones=[1])
    rows = [json.loads(line) for line in (tmp_path / "ftkd_official" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r[key] for r in rows for key in ("lr_student", "lr_teacher")]
    assert lrs == pytest.approx([0.05, 1e-4, 0.005, 0.005])


def test_lr_overwrite_needs_the_step_schedule(fake_cifar, teacher_ckpt, tmp_path):
    with pytest.raises(engine.ConfigError, match="lr_overwrite"):
        student_after(tmp_path, fake_cifar, teacher_ckpt, "kd_official", lr_schedule="cosine")


def tiny_bert(layers: int, adapter: str | None = None) -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16)
    model = BertForSequenceClassification(cfg, 3, adapter=adapter, bottleneck=4)
    with torch.no_grad():
        for p in model.parameters():     # larger than BERT's init, so that the adapter's offset is visible
            p.normal_(0, 0.5)
    return model


def test_glue_pesf_official_trains_the_whole_teacher_at_the_adapter_lr_and_teaches_with_the_adapted_teacher():
    """The authors' nlp/: the student's target is the adapted teacher (nlp/model.py l. 76-77), and the typo
    ``p.required_grad = False`` (nlp/run_glue_distillation.py l. 91-92) leaves every teacher weight in the
    teacher optimiser at its lr; the teacher itself never leaves eval mode (no dropout)."""
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (4, 7))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    y = torch.tensor([0, 2, 1, 2])
    reached = {}
    for params in ("all", "adapters"):
        torch.manual_seed(1)
        teacher = tiny_bert(4, "houlsby")
        cfg = DistillConfig(alpha=0.5, tau=5.0, w_tce=0.5, label_adjust=False, adapter_lr=1e-5, teacher_params=params)
        d = build_distiller("pesf", tiny_bert(2), teacher, cfg).double().train()
        with torch.no_grad():
            reference = copy.deepcopy(teacher).double().eval()
            t_adapted = reference(x)
            plain = BertForSequenceClassification(reference.config, 3).double().eval()   # the same weights, no adapter
            plain.load_state_dict(reference.state_dict(), strict=False)
            t_plain = plain(x)
        s, losses = d(x, y)
        torch.testing.assert_close(losses["kl"], 0.5 * kl64(t_adapted, s.detach(), 5.0), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(t_adapted, t_plain, rtol=1e-3, atol=1e-3)       # the adapter moves the target
        [group] = [g for g in d.param_groups() if g["name"] == "adapters"]
        trained = {id(p) for p in group["params"]}
        assert group["lr"] == 1e-5 and not teacher.bert.training and not teacher.dropout.training
        sum(losses.values()).backward()
        reached[params] = teacher.bert.embeddings.word_embeddings.weight.grad is not None
        if params == "all":
            assert trained == {id(p) for p in teacher.parameters()}
            whole = sum(p.numel() for p in teacher.parameters())
            assert d.updated_params() == models.count_trainable(d.student) + whole
        else:
            assert trained == {id(p) for p in teacher.adapter_parameters()}
    assert reached == {"all": True, "adapters": False}
    with pytest.raises(ValueError, match="teacher_params must be adapters or all"):
        DistillConfig(teacher_params="backbone")


@pytest.mark.parametrize("task", ["rte", "sst2", "qqp"])
def test_glue_official_presets_mirror_the_authors_nlp_code(task):
    folder = ROOT / "configs" / "glue" / task
    pesf = engine.build_config(GlueConfig, str(folder / "pesf_official.yaml"))
    kd = engine.build_config(GlueConfig, str(folder / "kd_official.yaml"))
    assert (pesf.method, pesf.label_adjust, pesf.teacher_params, pesf.adapter_lr) == ("pesf", False, "all", 1e-5)
    assert (pesf.w_tce, kd.w_tce) == (1 - pesf.alpha, 1 - kd.alpha)
    # no --use_adapter: the authors' loop still steps the teacher's optimiser (l. 216-218), the soft loss reaching it
    assert (kd.method, kd.label_adjust, kd.teacher_lr) == ("ftkd", False, 1e-5)
