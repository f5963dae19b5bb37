"""GLUE experiments of the PESF-KD paper (Tables 3, 5, 11, 13): a BERT-base teacher fine-tuned per task,
a 6-layer student initialised from teacher layers {0, 2, 4, 6, 8, 10}, the same methods as on CIFAR.

    python train_glue.py --config configs/glue/rte/teacher.yaml          # fine-tune the teacher (ce)
    python train_glue.py --config configs/glue/rte/pesf.yaml --seed 1    # a student
    python train_glue.py --task qqp --method pesf+pkd --teacher runs/glue/qqp/ce_bert-base-uncased_s0/student
    python train_glue.py --config configs/glue/rte/tinybert.yaml         # intermediate step, then prediction
    python train_glue.py --config configs/glue/rte/takd.yaml             # both stages; --resume after a crash
    torchrun --nproc_per_node=2 train_glue.py --config configs/glue/sst2/kd.yaml

Reads top to bottom: parse config -> read and tokenise the GLUE TSVs once -> build models -> build method
-> train and evaluate on dev (``engine.fit``) -> save the student (and a trained teacher) as Hugging Face
folders. Teachers and students are Hugging Face BERT folders (``config.json``, ``vocab.txt``,
``model.safetensors`` or ``pytorch_model.bin``); a ``ce`` run's trained model, ``<out>/student/``, is
the teacher of later runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import engine
import stages
from distillers import STAGED_METHODS, DistillConfig, build_distiller, needs_teacher
from distillers.feature import run_init_stage
from models.bert import BertForSequenceClassification, load_tokenizer, student_from_teacher


@dataclass
class GlueConfig:
    task: str = "rte"                       # sst2 rte qqp mnli mnli-mm qnli mrpc cola wnli (or SST-2, ...)
    data_dir: str | None = None             # the folder holding the task folders; None: engine.data_places
    teacher: str | None = None              # Hugging Face folder; its vocab.txt tokenises the data
    student: str | None = None              # Hugging Face folder, or None: teacher layers student_layers
    student_layers: list[int] = field(default_factory=lambda: [0, 2, 4, 6, 8, 10])   # SPEC sec. 3
    student_source: str | None = None       # the folder whose layers student_layers copies; None: the teacher
    # takd: the assistant's layers, 9 of 12 (three of every four, a superset of the student's)
    assistant_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 5, 6, 8, 9, 10])
    method: str = "kd"
    out: str | None = None                  # default: runs/glue/<task>/<method>[_noadj][_<slot>]_<student>_s<seed>
    max_length: int = 128                   # Zhou et al. 2022 (MetaDistil), which appendix A.1 follows
    batch_size: int = 32                    # global batch; A.1 grid {32, 64}
    eval_batch_size: int = 128
    epochs: int = 4                         # students: 4 (Sun et al. 2019; MetaDistil's README); teachers: 3
    lr: float = 2e-5                        # student; A.1 grid {1e-5, 2e-5, 3e-5, 4e-5, 5e-5}
    teacher_lr: float = 1e-5                # ftkd/dml/kdcl teacher; A.1 grid {2e-6, 1e-5, 2e-5}, MetaDistil's default
    adapter_lr: float = 1e-4                # pesf adapters; A.1's "adaptive teacher" lr (stated for CV, none given for NLP)
    weight_decay: float = 0.01              # AdamW, not on biases and LayerNorm weights (BERT, Devlin et al. 2019)
    lr_schedule: str = "linear"             # BERT fine-tuning: linear warm-up, then linear decay to 0, per step
    lr_milestones: list[int] = field(default_factory=list)   # only read by the "step" schedule
    lr_decay: float = 0.1                   # only read by the "step" schedule
    warmup_epochs: float | None = None      # None: 10 % of the epochs (Devlin et al. 2019)
    alpha: float = 0.5                      # KL weight; A.1 grid {0.3, 0.5, 0.8, 0.9}; PKD's alpha (Sun et al.)
    tau: float = 5.0                        # MetaDistil's code default (Zhou et al. 2022); PKD grid {5, 10, 20}
    w_tce: float = 0.5                      # teacher CE weight (A.1)
    w_tkl: float | None = None              # student-to-teacher KL weight (pesf, ftkd official); None: alpha
    w_ce: float | None = None               # the student's CE weight; None: 1 - alpha
    label_adjust: bool | None = None        # None: on for ftkd and pesf, off otherwise
    teacher_params: str = "adapters"        # pesf: adapters | all (the whole teacher at adapter_lr: the authors' nlp/)
    adapter: str = "houlsby"                # houlsby | lora | parallel
    adapter_slot: str = "head"              # head (pooled [CLS] feature) | layers (Houlsby, every layer)
    bottleneck: int = 32
    feat_weight: float | None = None        # beta of a feature term; None: its default (pkd: 100)
    init_epochs: int | None = None          # tinybert's intermediate-layer step; None: 10 epochs
    anchor_epochs: list[int] = field(default_factory=list)   # keep the model after these epochs (rco's anchors)
    anchors_dir: str | None = None          # rco: the teacher run's anchors/ folder
    train_subset: int = 0                   # use only the first N training rows (0: all)
    seed: int = 0
    deterministic: bool = False             # GPU: deterministic algorithms, fixed cuBLAS workspace (README)
    device: str = "auto"
    amp: str = "auto"                       # bf16 | none | auto (bf16 on CUDA)
    cuda_graph: bool = False                # must stay off: batch shapes vary (dynamic padding)
    backend: str = "auto"                   # kd_core backend: auto | torch | triton
    eval_every: int = 1                     # epochs between dev-set evaluations (the last always runs)
    limit_batches: int = 0                  # training batches per epoch (smoke runs); evaluation: eval_subset
    eval_subset: int = 0                    # evaluate on N dev rows drawn at random (seeded; 0: all rows)
    benchmark_steps: int = 0                # time this many steps on the real training data and stop
    save_every: int = 0                     # steps between mid-epoch checkpoints (last.pt); 0: epoch ends only
    log_every: int = 50


# ----------------------------------------------------------------------------------------------
# Data: the GLUE TSV files, read by header column names, tokenised once
# ----------------------------------------------------------------------------------------------
DataNotFound = engine.DataNotFound


@dataclass(frozen=True)
class GlueTask:
    folder: str                             # the standard GLUE folder name
    text: tuple[str | int, ...]             # one or two text columns: names, or indices for header-less files
    label: str | int
    labels: tuple[str, ...]                 # label strings in class-index order
    metric: str = "top1"                    # the summary key the paper reports
    dev: str = "dev.tsv"
    header: bool = True


# String labels follow the order of the original GLUE processors (BERT's run_classifier.py and
# transformers' glue_processors), so that teachers fine-tuned with them keep their class indices.
_NLI = ("entailment", "not_entailment")
_MNLI = ("contradiction", "entailment", "neutral")
TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", _NLI),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), metric="f1"),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", _MNLI, dev="dev_matched.tsv"),
    "mnli-mm": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", _MNLI, dev="dev_mismatched.tsv"),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", _NLI),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), metric="f1"),
    # CoLA has no header: source, label, original annotation, sentence.
    "cola": GlueTask("CoLA", (3,), 1, ("0", "1"), header=False, metric="mcc"),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("0", "1")),
}


def task_name(name: str) -> str:
    """``"SST-2"``, ``"sst2"``, ``"MNLI-MM"`` -> the key of TASKS (case, '-' and '_' ignored)."""
    keys = {_squash(key): key for key in TASKS}
    if _squash(name) not in keys:
        raise engine.ConfigError(f"unknown GLUE task {name!r}; valid: {', '.join(TASKS)} (STS-B, a regression "
                                 f"task, is not supported)")
    return keys[_squash(name)]


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@dataclass
class GlueSplit:
    texts: list[list[str]]                  # one list per text column
    labels: torch.Tensor                    # int64 class indices
    skipped: int                            # malformed rows left out (too few columns, unknown label)


def read_glue_tsv(path: str | Path, task: GlueTask) -> GlueSplit:
    """One GLUE TSV split. No quoting (GLUE sentences contain bare quotes); rows that lack a column or
    have a label outside ``task.labels`` are skipped and counted."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as f:    # -sig: some MRPC copies start with a byte-order mark
            rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    except UnicodeDecodeError:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:   # on the whole file, so that err.start is the byte's offset
            line = raw[:err.start].count(b"\n") + 1
            raise engine.ConfigError(f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x})") from None
        raise
    if task.header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in (*task.text, task.label) if c not in header]
        if missing:
            raise DataNotFound(f"{path}: no column {', '.join(map(repr, missing))} in header {header}")
        columns = [header.index(c) for c in (*task.text, task.label)]
    else:
        columns = [*task.text, task.label]
    label_index = {name: i for i, name in enumerate(task.labels)}
    texts: list[list[str]] = [[] for _ in task.text]
    labels, skipped = [], 0
    for row in rows:
        if len(row) <= max(columns) or row[columns[-1]].strip() not in label_index:
            skipped += 1
            continue
        for column, i in zip(texts, columns):
            column.append(row[i])
        labels.append(label_index[row[columns[-1]].strip()])
    return GlueSplit(texts, torch.tensor(labels, dtype=torch.int64), skipped)


def load_glue(data_dir: str | Path | None, task: GlueTask, log=print) -> dict[str, GlueSplit]:
    """The task's train and dev splits from ``data_dir``, or from the first place every script searches."""
    required = [f"{task.folder}/train.tsv", f"{task.folder}/{task.dev}"]
    root = engine.find_data(data_dir, engine.data_places("glue", "PESF_GLUE"), required, f"GLUE {task.folder}",
                            f"download the GLUE data (gluebenchmark.com/tasks) and point --data-dir, PESF_GLUE or "
                            f"PESF_DATA/glue at the folder that holds {task.folder}/")
    files = {"train": root / required[0], "dev": root / required[1]}
    splits = {}
    for split, path in files.items():
        splits[split] = read_glue_tsv(path, task)
        if splits[split].skipped:
            log(f"{path}: skipped {splits[split].skipped} malformed rows (missing columns or unknown label)")
        if not len(splits[split].labels):
            raise DataNotFound(f"{path}: no usable rows")
    return splits


def take_rows(split: GlueSplit, rows: torch.Tensor) -> GlueSplit:
    return GlueSplit([[column[i] for i in rows.tolist()] for column in split.texts], split.labels[rows], split.skipped)


@dataclass
class Encoded:
    """Token ids of every row, concatenated without padding (a row is ``offsets[i]:offsets[i]+lengths[i]``)."""
    ids: torch.Tensor                       # int32 [total tokens]
    types: torch.Tensor                     # int8 [total tokens]
    offsets: torch.Tensor                   # int64 [rows]
    lengths: torch.Tensor                   # int64 [rows]
    labels: torch.Tensor                    # int64 [rows]
    pad_id: int


def encode(split: GlueSplit, tokenizer, max_length: int, chunk: int = 4096) -> Encoded:
    """Tokenise once ([CLS] a [SEP] (b [SEP]), truncated longest-first to ``max_length``); padding is
    stripped so that batches can be padded to their own longest row."""
    ids, types, lengths = [], [], []
    for start in range(0, len(split.labels), chunk):
        a, *b = (column[start:start + chunk] for column in split.texts)
        enc = tokenizer(a, b[0] if b else None, max_length=max_length)
        mask = enc["attention_mask"].bool()
        ids.append(enc["input_ids"][mask].to(torch.int32))
        types.append(enc["token_type_ids"][mask].to(torch.int8))
        lengths.append(mask.sum(1))
    lengths = torch.cat(lengths)
    if int(lengths.max()) > max_length:   # the tokenizer leaves rows whole when max_length is below its specials
        raise engine.ConfigError(f"max_length {max_length} cannot hold a row ({int(lengths.max())} tokens)")
    return Encoded(torch.cat(ids), torch.cat(types), torch.cumsum(lengths, 0) - lengths, lengths, split.labels,
                   tokenizer.pad_id)


class GlueBatches:
    """Batches of a tokenised split, padded to the longest row of each batch, moved to the device.

    Training: one permutation per epoch (seeded by seed and epoch, identical on every rank), each global
    batch split into equal per-rank slices, last partial batch dropped (as train_cifar). Evaluation:
    every row once, sharded across ranks, in order of length (less padding; the metrics are sums).
    Yields ``(x, y, index)``: the tokenizer's dict of tensors, labels and row indices.
    """

    def __init__(self, data: Encoded, batch_size: int, device: torch.device, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, limit: int = 0) -> None:
        if train and batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
        self.data, self.batch_size, self.device, self.train = data, batch_size, device, train
        self.seed, self.rank, self.world, self.limit = seed, rank, world, limit
        self.labels = data.labels

    def __len__(self) -> int:
        n = len(self.labels)
        steps = n // self.batch_size if self.train else -(-n // (self.batch_size * self.world))
        return min(steps, self.limit) if self.limit else steps

    def _batch(self, idx: torch.Tensor):
        d = self.data
        lengths = d.lengths[idx]
        mask = torch.arange(int(lengths.max())) < lengths[:, None]
        flat = torch.where(mask, d.offsets[idx, None] + torch.arange(mask.shape[1]), 0)
        x = {"input_ids": torch.where(mask, d.ids[flat].long(), d.pad_id),
             "token_type_ids": torch.where(mask, d.types[flat].long(), 0),
             "attention_mask": mask.long()}
        x = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
        return x, d.labels[idx].to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, start: int = 0):
        """The batches of ``epoch``, in training from the ``start``-th on."""
        if not self.train:
            index = torch.argsort(self.data.lengths, stable=True)[self.rank::self.world]
            for i in range(len(self)):
                yield self._batch(index[i * self.batch_size:(i + 1) * self.batch_size])
            return
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_rank = self.batch_size // self.world
        for i in range(start, len(self)):
            first = i * self.batch_size + self.rank * per_rank
            yield self._batch(order[first:first + per_rank])


# ----------------------------------------------------------------------------------------------
# Models and method
# ----------------------------------------------------------------------------------------------
def build_models(cfg: GlueConfig, num_classes: int,
                 log: engine.RunLog) -> tuple[BertForSequenceClassification, BertForSequenceClassification | None]:
    teacher = None
    if cfg.teacher and (needs_teacher(cfg.method) or not cfg.student):
        adapter = dict(adapter=cfg.adapter, slot=cfg.adapter_slot, bottleneck=cfg.bottleneck) \
            if cfg.method.split("+")[0] == "pesf" else {}
        teacher = BertForSequenceClassification.from_pretrained(cfg.teacher, num_classes, **adapter)
    if cfg.student:
        student = BertForSequenceClassification.from_pretrained(cfg.student, num_classes)
    else:
        source = BertForSequenceClassification.from_pretrained(cfg.student_source, num_classes) \
            if cfg.student_source else teacher
        layers = used_student_layers(cfg.student_layers, source.config.num_hidden_layers)
        if layers != cfg.student_layers:
            log.print(f"note: the teacher has {source.config.num_hidden_layers} layers; student from teacher "
                      f"layers {layers}")
        # The student copies the teacher's weights, not its adapters (those are built empty).
        student = student_from_teacher(source, layers)
    return student, teacher if needs_teacher(cfg.method) else None


def adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with each group split in two (same name and lr): no weight decay on biases and LayerNorm
    weights, BERT's recipe. In BERT (and its adapters) those are exactly the 1-D parameters."""
    split = [{**group, "params": params, "weight_decay": wd} for group in groups
             for params, wd in (([p for p in group["params"] if p.ndim > 1], weight_decay),
                                ([p for p in group["params"] if p.ndim <= 1], 0.0)) if params]
    return torch.optim.AdamW(split, lr=lr)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def resolve(cfg: GlueConfig, dist: engine.Dist) -> tuple[GlueConfig, torch.dtype | None]:
    if cfg.cuda_graph:
        raise engine.ConfigError("cuda_graph needs one batch shape; GLUE batches are padded to their longest row")
    if needs_teacher(cfg.method) and not cfg.teacher:
        raise engine.ConfigError(f"method {cfg.method!r} needs a fine-tuned teacher: pass --teacher FOLDER (make one "
                                 f"with --method ce --student <pretrained BERT folder>)")
    if not cfg.teacher and not cfg.student:
        raise engine.ConfigError("pass --student FOLDER (a Hugging Face BERT folder) or --teacher FOLDER to take "
                                 "the student's layers from")
    task = task_name(cfg.task)
    # The model folders are checked before the data is read and tokenised (minutes for the large tasks).
    models = {what: model_folder_config(folder, what, tokenizer=folder == (cfg.teacher or cfg.student))
              for what, folder in (("teacher", cfg.teacher), ("student", cfg.student)) if folder}
    if cfg.teacher and cfg.student and (Path(cfg.student) / "vocab.txt").is_file() \
            and (Path(cfg.student) / "vocab.txt").read_bytes() != (Path(cfg.teacher) / "vocab.txt").read_bytes():
        raise engine.ConfigError(f"{cfg.student} and {cfg.teacher} have different vocabularies; the data is "
                                 f"tokenised once, with the teacher's")
    specials = 1 + len(TASKS[task].text)            # [CLS] a [SEP] (b [SEP])
    positions = min(c.get("max_position_embeddings", 512) for c in models.values())
    if not specials <= cfg.max_length <= positions:
        raise engine.ConfigError(f"max_length must be between {specials} and {positions} (the models' "
                                 f"max_position_embeddings) for {task}, got {cfg.max_length}")
    if not cfg.student:
        source = model_folder_config(cfg.student_source, "student_source", tokenizer=False) \
            if cfg.student_source else models["teacher"]
        layers = used_student_layers(cfg.student_layers, source.get("num_hidden_layers", 12))
        cfg = dataclasses.replace(cfg, student_layers=layers)
    amp, amp_dtype = engine.resolve_amp(cfg.amp, dist.device)
    cfg = dataclasses.replace(cfg, task=task, amp=amp,
                              warmup_epochs=0.1 * cfg.epochs if cfg.warmup_epochs is None else cfg.warmup_epochs)
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
    return cfg, amp_dtype


def model_folder_config(folder: str, what: str, tokenizer: bool) -> dict:
    """The ``config.json`` of a Hugging Face BERT folder, after checking that the folder has its files."""
    path = Path(folder)
    if not path.is_dir():
        raise DataNotFound(f"{what} folder not found: {path} (a Hugging Face BERT folder: config.json, vocab.txt, "
                           f"model.safetensors or pytorch_model.bin)")
    missing = [name for name in ("config.json", *(("vocab.txt",) if tokenizer else ())) if not (path / name).is_file()]
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors or pytorch_model.bin")
    if missing:
        raise DataNotFound(f"{what} folder {path} has no {', '.join(missing)} (not a Hugging Face BERT folder)")
    try:
        return json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise engine.ConfigError(f"{path / 'config.json'} is not valid JSON ({err})") from None


def used_student_layers(requested: list[int], depth: int) -> list[int]:
    """The teacher layers of ``requested`` that exist in a ``depth``-layer teacher (an error if none)."""
    layers = [i for i in requested if 0 <= i < depth]
    if not layers:
        raise engine.ConfigError(f"none of student_layers {requested} exists in the {depth}-layer teacher")
    return layers


def default_out(cfg: GlueConfig) -> str:
    variant = ("_noadj" if cfg.label_adjust is False else "") + \
              (f"_{cfg.adapter_slot}" if cfg.method.startswith("pesf") and cfg.adapter_slot != "head" else "")
    student = Path(cfg.student).name if cfg.student else f"{len(cfg.student_layers)}L"
    return f"runs/glue/{cfg.task}/{cfg.method}{variant}_{student}_s{cfg.seed}"


def stage_config(cfg: GlueConfig, stage: stages.Stage, out: str,
                 source: tuple[str, stages.Stage] | None) -> GlueConfig:
    """One stage of a multi-stage method. Every student copies the run teacher's layers (as in ``kd``);
    a stage taught by an earlier stage takes that stage's saved model folder as its teacher."""
    changes = dict(method=stage.method, out=out,
                   student_layers=cfg.assistant_layers if stage.student == "assistant" else cfg.student_layers)
    if source is not None:
        folder, made_by = source
        changes.update(teacher=str(Path(folder) / made_by.trains),
                       student_source=cfg.student_source or cfg.teacher)
    return dataclasses.replace(cfg, **changes)


def run(cfg: GlueConfig, resume: bool | str = False, overwrite: bool = False) -> dict:
    """One run, start to end: its summary (``summary.json``)."""
    return engine.drain(run_steps(cfg, resume, overwrite))


def run_steps(cfg: GlueConfig, resume: bool | str = False, overwrite: bool = False):
    """One run as a generator that yields after every training step and returns the summary, so that
    several runs can share a process (``multirun``). It holds its run folder throughout."""
    dist = engine.init_distributed(cfg.device)
    cfg, amp_dtype = resolve(cfg, dist)
    with engine.claim_run_folder(cfg, resume, overwrite, dist):
        return (yield from train_steps(cfg, dist, amp_dtype, resume, overwrite))


def train_steps(cfg: GlueConfig, dist: engine.Dist, amp_dtype: torch.dtype | None, resume: bool | str,
                overwrite: bool):
    log = engine.RunLog(cfg.out, enabled=dist.main)
    if cfg.method in STAGED_METHODS:
        method_stages = STAGED_METHODS[cfg.method]
        return (yield from stages.run_stages(cfg, method_stages, stage_config, run_steps, resume, log, overwrite))
    resume_from = None if cfg.benchmark_steps else engine.open_run(resume, log)
    engine.seed_everything(cfg.seed, cfg.deterministic)
    task = TASKS[cfg.task]

    # Data
    splits = load_glue(cfg.data_dir, task, log.print)
    if cfg.train_subset:
        splits["train"] = take_rows(splits["train"], torch.arange(min(cfg.train_subset, len(splits["train"].labels))))
    dev_rows = len(splits["dev"].labels)
    if 0 < cfg.eval_subset < dev_rows:
        # A random subset, not the first rows: evaluation runs in order of length, so any prefix of
        # its batches would favour the short rows.
        rows = torch.randperm(dev_rows, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.eval_subset]
        splits["dev"] = take_rows(splits["dev"], rows.sort().values)
        log.print(f"partial evaluation: {cfg.eval_subset} of {dev_rows} dev rows drawn at random (eval_subset); "
                  f"the scores are estimates")
    tokenizer = load_tokenizer(cfg.teacher or cfg.student, cfg.max_length)
    data = {split: encode(s, tokenizer, cfg.max_length) for split, s in splits.items()}
    train = GlueBatches(data["train"], cfg.batch_size, dist.device, train=True, seed=cfg.seed, rank=dist.rank,
                        world=dist.world, limit=cfg.limit_batches)
    dev = GlueBatches(data["dev"], max(1, cfg.eval_batch_size // dist.world), dist.device, train=False,
                      rank=dist.rank, world=dist.world)
    if len(train) == 0:
        raise engine.ConfigError(f"no full training batch: {len(train.labels)} rows, batch size {cfg.batch_size}")
    log.print(f"{task.folder}: {len(train.labels)} train / {len(dev.labels)} dev rows, {len(task.labels)} classes")

    # Models and method
    student, teacher = build_models(cfg, len(task.labels), log)
    distiller = build_distiller(cfg.method, student, teacher, DistillConfig.from_run_config(cfg),
                                train_labels=train.labels)
    distiller.to(dist.device)
    if resume_from is None and not cfg.benchmark_steps:   # tinybert's intermediate-layer step; checkpoints come after it
        run_init_stage(distiller, train, lambda params, lr: adamw([{"params": params}], lr, cfg.weight_decay),
                       amp_dtype, log.print)
    optimizer = adamw(engine.param_groups(distiller), cfg.lr, cfg.weight_decay)
    if cfg.benchmark_steps:
        return (yield from engine.time_steps(cfg, dist, distiller, optimizer, train, amp_dtype, log))
    summary = yield from engine.fit_steps(cfg, dist, distiller, optimizer, train, dev, amp_dtype, log,
                                          resume=resume_from)

    # The last epoch's models as Hugging Face folders: a ce run's student is the teacher of later runs.
    if dist.main:
        engine.unwrap(distiller.student).save_pretrained(Path(cfg.out) / "student", task.labels)
        if teacher is not None and distiller.teacher_mode != "frozen":
            engine.unwrap(distiller.teacher).save_pretrained(Path(cfg.out) / "teacher", task.labels)
    summary.update(task=cfg.task, metric=task.metric, score=summary.get(task.metric), method=cfg.method,
                   teacher=cfg.teacher if teacher is not None else None,
                   student=cfg.student or f"teacher layers {cfg.student_layers}", epochs=cfg.epochs, seed=cfg.seed)
    log.write_summary(summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[GlueConfig, argparse.Namespace]:
    methods = ("ce", "kd", "ftkd", "pesf", "dml", "kdcl", "pkd", "pesf+pkd", "tinybert", "pesf+tinybert")
    p = engine.arg_parser(__doc__, "configs/glue/", [
        ("task", str, f"GLUE task (default rte): {', '.join(TASKS)}"),
        ("method", str, f"distillation method (default kd): {', '.join(methods)}"),
        ("teacher", str, "fine-tuned teacher, a Hugging Face BERT folder (a ce run's <out>/student)"),
        ("student", str, "student BERT folder (default: teacher layers student_layers)"),
        ("data-dir", str, "folder holding the GLUE task folders (default: the first of $PESF_GLUE, $PESF_DATA/glue, "
                             "./data/glue, ../shared/data/glue that holds the task)"),
        ("out", str, "run folder (default runs/glue/<task>/<method>_<student>_s<seed>)"),
        ("epochs", int, "training epochs (default 4)"),
        ("batch-size", int, "global batch size, split across processes (default 32)"),
        ("max-length", int, "tokens per row, longest-first truncation (default 128; at most the model's "
                            "max_position_embeddings)"),
        ("seed", int, "random seed (default 0)"),
        ("device", str, "auto (CUDA when available), cpu, cuda or cuda:N"),
        ("limit-batches", int, "training batches per epoch, for smoke runs (default 0: all)"),
        ("eval-subset", int, "evaluate on N dev rows drawn at random, said in the output (default 0: all)"),
        ("benchmark-steps", int, "time this many steps on the training data, write <out>/benchmark.json and stop"),
        ("save-every", int, "also write last.pt every N steps inside an epoch (default 0: epoch ends only)")])
    return engine.parse_config(GlueConfig, p, argv)


def main(argv=None) -> int:
    def body() -> None:
        cfg, args = parse_args(argv)
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    return engine.cli(body)


if __name__ == "__main__":
    sys.exit(main())
