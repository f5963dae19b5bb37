"""A compact BERT encoder (Devlin et al. 2019) in plain torch that reads and writes Hugging Face BERT
folders and reproduces ``transformers``' ``BertModel`` (same parameter names, post-LayerNorm layers,
exact-erf GELU), plus WordPiece tokenisation by the ``tokenizers`` library. Adapter slots (SPEC §2):
``head`` on the pooled [CLS] feature, ``layers`` after the attention output and the feed-forward output
projections of every layer (Houlsby et al. 2019; ``lora``/``parallel`` wrap those two projections)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import Adaptable, check_adapter, load_checkpoint, make_adapter, project

SLOTS = ("head", "layers")
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclasses.dataclass
class BertConfig:
    """The fields of a Hugging Face ``config.json`` that the encoder uses (defaults: BERT-base)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None

    @classmethod
    def from_any(cls, config: "BertConfig | Mapping | str | Path | None") -> "BertConfig":
        """A BertConfig from itself, a dict, a ``config.json`` path or a folder holding one."""
        if config is None or isinstance(config, BertConfig):
            return config or cls()
        if isinstance(config, (str, Path)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; valid: {', '.join(_ACTIVATIONS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.p = c.hidden_dropout_prob

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_type_ids)
        return F.dropout(self.LayerNorm(x), self.p, self.training)


class _Linears(nn.Module):
    """A plain container, only there to give parameters Hugging Face's names."""

    def __init__(self, /, **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            setattr(self, name, module)


class BertLayer(nn.Module):
    """One post-LayerNorm transformer layer with Hugging Face's parameter names."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        h, i = c.hidden_size, c.intermediate_size
        self.heads, self.head_dim = c.num_attention_heads, h // c.num_attention_heads
        self.attention = _Linears(**{"self": _Linears(query=nn.Linear(h, h), key=nn.Linear(h, h),
                                                      value=nn.Linear(h, h)),
                                     "output": _Linears(dense=nn.Linear(h, h),
                                                        LayerNorm=nn.LayerNorm(h, eps=c.layer_norm_eps))})
        self.intermediate = _Linears(dense=nn.Linear(h, i))
        self.output = _Linears(dense=nn.Linear(i, h), LayerNorm=nn.LayerNorm(h, eps=c.layer_norm_eps))
        self.act = _ACTIVATIONS[c.hidden_act]
        self.p_hidden, self.p_attn = c.hidden_dropout_prob, c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor, sites: Mapping[str, nn.Module] | None = None,
                scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mask``: additive [N, 1, 1, T]. Returns the output and, if ``scores``, the attention scores
        QK^T/sqrt(d) before the mask and the softmax."""
        attn_site, out_site = (None, None) if sites is None else (sites["attention"], sites["output"])
        n, t, _ = x.shape
        attn = self.attention.self
        q, k, v = (lin(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
                   for lin in (attn.query, attn.key, attn.value))
        p_attn = self.p_attn if self.training else 0.0
        raw = None
        if scores:
            raw = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
            ctx = F.dropout(torch.softmax(raw + mask, dim=-1), p_attn, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_attn)
        ctx = ctx.transpose(1, 2).reshape(n, t, -1)
        out = self.attention.output
        h = out.LayerNorm(F.dropout(project(out.dense, attn_site, ctx), self.p_hidden, self.training) + x)
        inter = self.act(self.intermediate.dense(h))
        y = self.output.LayerNorm(F.dropout(project(self.output.dense, out_site, inter),
                                            self.p_hidden, self.training) + h)
        return y, raw


class BertModel(nn.Module):
    """Embeddings, encoder and [CLS] pooler, named like ``transformers.BertModel``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Linears(layer=nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers)))
        self.pooler = _Linears(dense=nn.Linear(config.hidden_size, config.hidden_size))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, features: bool = False,
                sites: Sequence[Mapping[str, nn.Module]] | None = None) -> dict:
        """Returns ``pooled`` and ``last``; with ``features`` also ``hidden_states``, ``attentions`` and the
        ``attention_mask`` (1 = token, 0 = padding)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hidden, attentions = [x], []
        for i, layer in enumerate(self.encoder.layer):
            x, raw = layer(x, mask, None if sites is None else sites[i], scores=features)
            hidden.append(x)
            attentions.append(raw)
        out = {"last": x, "pooled": torch.tanh(self.pooler.dense(x[:, 0]))}
        if features:
            out.update(hidden_states=hidden, attentions=attentions, attention_mask=attention_mask)
        return out


def _init_bert(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertForSequenceClassification(Adaptable):
    """``bert`` + dropout + ``classifier``, the key layout of ``transformers.BertForSequenceClassification``."""

    def __init__(self, config: BertConfig | Mapping | str | Path | None = None, num_classes: int = 2,
                 adapter: str | None = None, slot: str = "head", bottleneck: int = 32, scale: float = 4.0,
                 alpha: float | None = None) -> None:
        super().__init__()
        check_adapter(adapter, slot, SLOTS, "BERT")
        self.config = c = BertConfig.from_any(config)
        self.num_classes = num_classes
        self.adapter_config = {"adapter": adapter, "slot": slot, "bottleneck": bottleneck, "scale": scale,
                               "alpha": alpha}
        self.bert = BertModel(c)
        self.dropout = nn.Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout)
        self.classifier = nn.Linear(c.hidden_size, num_classes)
        _init_bert(self)
        self.feature_dim = c.hidden_size
        self.source_folder: Path | None = None
        self.adapters = None
        if adapter is not None and slot == "layers":
            self.adapters = nn.ModuleList(
                nn.ModuleDict({site: make_adapter(adapter, c.hidden_size, bottleneck, scale=scale, alpha=alpha,
                                                  linear=None if adapter == "houlsby" else dense)
                               for site, dense in (("attention", layer.attention.output.dense),
                                                   ("output", layer.output.dense))})
                for layer in self.bert.encoder.layer)
        self._make_head_adapter(adapter if slot == "head" else None, c.hidden_size, self.classifier,
                                bottleneck, scale, alpha)

    def forward(self, input_ids: torch.Tensor | Mapping[str, torch.Tensor], attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, features: bool = False):
        """``input_ids`` may also be the dict that the tokenizer returns."""
        if isinstance(input_ids, Mapping):
            attention_mask = input_ids.get("attention_mask", attention_mask)
            token_type_ids = input_ids.get("token_type_ids", token_type_ids)
            input_ids = input_ids["input_ids"]
        out = self.bert(input_ids, attention_mask, token_type_ids, features=features, sites=self.adapters)
        pooled, logits = self._head(out["pooled"], self.classifier, self.dropout)
        if not features:
            return logits
        return logits, {"pooled": pooled, **{k: out[k] for k in ("hidden_states", "attentions", "attention_mask")}}

    @classmethod
    def from_pretrained(cls, folder: str | Path, num_classes: int | None = None, adapter: str | None = None,
                        slot: str = "head", bottleneck: int = 32, **adapter_opts) -> "BertForSequenceClassification":
        """Load a Hugging Face BERT folder (``model.safetensors`` or ``pytorch_model.bin``; keys with or
        without ``bert.``). A missing pooler or classifier starts fresh, with a warning. Without ``adapter``,
        the adapters that ``config.json`` records (``pesf_adapter``, a saved PESF-KD teacher) are built."""
        folder = Path(folder)
        raw = json.loads((folder / "config.json").read_text())
        saved = raw.get("pesf_adapter") or {}
        if adapter is None and saved.get("adapter"):
            adapter, slot, bottleneck = saved["adapter"], saved["slot"], saved["bottleneck"]
            adapter_opts = {**{k: saved[k] for k in ("scale", "alpha") if saved.get(k) is not None}, **adapter_opts}
        if num_classes is None:
            num_classes = raw.get("num_labels", len(raw.get("id2label", {})) or 2)
        model = cls(raw, num_classes, adapter, slot, bottleneck, **adapter_opts)
        sd = _hf_state_dict(folder)
        fresh = [prefix for prefix in ("bert.pooler.", "classifier.") if not any(k.startswith(prefix) for k in sd)]
        if fresh:
            warnings.warn(f"{folder}: no {' / '.join(p.rstrip('.') for p in fresh)} weights; initialised at random")
            sd.update({k: v for k, v in model.state_dict().items() if k.startswith(tuple(fresh))})
        load_checkpoint(model, sd)
        model.source_folder = folder
        return model

    def save_pretrained(self, folder: str | Path, labels: Sequence[str] | None = None) -> None:
        """Write ``config.json`` (``id2label`` from ``labels``, the task's label names, else ``LABEL_i``),
        ``model.safetensors`` (adapters included, under their own keys) and the tokenizer files of the
        folder the model came from, in the Hugging Face layout."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} label names for {self.num_classes} classes")
        config = {**dataclasses.asdict(self.config), "model_type": "bert",
                  "architectures": ["BertForSequenceClassification"], "num_labels": self.num_classes,
                  "id2label": {str(i): name for i, name in enumerate(names)},
                  "label2id": {name: i for i, name in enumerate(names)},
                  "pesf_adapter": self.adapter_config}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        weights = folder / "model.safetensors"
        # metadata format=pt, as Hugging Face writes it: transformers < 4.45 refuses a file without it
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(weights),
                  metadata={"format": "pt"})
        umask = os.umask(0)   # safetensors writes 0600; give it the mode of the files written beside it
        os.umask(umask)
        weights.chmod(0o666 & ~umask)
        if self.source_folder is not None and self.source_folder.resolve() != folder.resolve():
            for name in TOKENIZER_FILES:
                if (self.source_folder / name).is_file():
                    shutil.copy(self.source_folder / name, folder / name)


def _hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        sd = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    out = {}
    for key, value in sd.items():
        # Pre-training heads, a non-persistent buffer, and TinyBERT's general-distillation projections
        # (fit_dense / fit_denses, not part of BERT; the tinybert method trains its own).
        if key.startswith(("cls.", "fit_dense")) or key.endswith("position_ids"):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not key.startswith(("bert.", "classifier.", "adapter.", "adapters.")):
            key = "bert." + key
        out[key] = value
    return out


def init_from_teacher(student: BertForSequenceClassification, teacher: BertForSequenceClassification,
                      layers: Iterable[int] | None = None) -> BertForSequenceClassification:
    """Copy embeddings, pooler, classifier and teacher layer ``layers[i]`` into student layer ``i``
    (default every other layer, {0, 2, 4, ...}, as in Sun et al. 2019 / SPEC §3)."""
    n = len(student.bert.encoder.layer)
    layers = list(range(0, 2 * n, 2) if layers is None else layers)
    depth = len(teacher.bert.encoder.layer)
    if len(layers) != n or not all(0 <= i < depth for i in layers):
        raise ValueError(f"need {n} teacher layers in [0, {depth}), got {layers}")
    student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    student.bert.pooler.load_state_dict(teacher.bert.pooler.state_dict())
    student.classifier.load_state_dict(teacher.classifier.state_dict())
    for i, j in enumerate(layers):
        student.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[j].state_dict())
    return student


def student_from_teacher(teacher: BertForSequenceClassification, layers: Iterable[int] | None = None,
                         num_layers: int = 6, **options) -> BertForSequenceClassification:
    """A ``len(layers)``-layer student (default ``num_layers``, from teacher layers {0, 2, 4, ...})
    initialised from ``teacher``; ``options`` go to the constructor (adapter, slot, ...)."""
    layers = list(range(0, 2 * num_layers, 2) if layers is None else layers)
    config = dataclasses.replace(teacher.config, num_hidden_layers=len(layers))
    student = init_from_teacher(BertForSequenceClassification(config, teacher.num_classes, **options), teacher, layers)
    student.source_folder = teacher.source_folder
    return student


class WordPieceTokenizer:
    """BERT WordPiece tokenisation with the ``tokenizers`` library, from a folder's ``vocab.txt``."""

    def __init__(self, folder: str | Path, max_length: int = 128, lowercase: bool | None = None) -> None:
        from tokenizers.implementations import BertWordPieceTokenizer
        folder = Path(folder)
        settings = {}
        for name in ("config.json", "tokenizer_config.json"):  # the tokenizer's own settings win
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text()))
        lowercase = settings.get("do_lower_case", True) if lowercase is None else lowercase
        self.max_length = max_length
        self.tokenizer = BertWordPieceTokenizer(
            str(folder / "vocab.txt"), clean_text=True, lowercase=lowercase,
            handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
            strip_accents=settings.get("strip_accents"))
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None,
                 max_length: int | None = None, padding: str = "longest") -> dict[str, torch.Tensor]:
        """Encode sentences (or sentence pairs), truncated longest-first to ``max_length`` and padded to the
        longest row (``padding="longest"``) or to ``max_length`` (``"max_length"``)."""
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} first sentences but {len(pairs)} second sentences")
        max_length = max_length or self.max_length
        tok = self.tokenizer
        tok.enable_truncation(max_length)
        tok.enable_padding(pad_id=self.pad_id, pad_token="[PAD]",
                           length=max_length if padding == "max_length" else None)
        encs = tok.encode_batch(texts if pairs is None else list(zip(texts, pairs)))
        return {name: torch.tensor([getattr(e, attr) for e in encs], dtype=torch.long)
                for name, attr in (("input_ids", "ids"), ("token_type_ids", "type_ids"),
                                   ("attention_mask", "attention_mask"))}


def load_tokenizer(folder: str | Path, max_length: int = 128, lowercase: bool | None = None) -> WordPieceTokenizer:
    """The WordPiece tokenizer of a Hugging Face BERT folder (lower-casing as its tokenizer config says)."""
    return WordPieceTokenizer(folder, max_length, lowercase)
