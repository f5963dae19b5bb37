"""CIFAR-100 experiments of the PESF-KD paper (Tables 1, 4, 7, 8, 10, 12, 14).

    python train_cifar.py --quickstart
    python train_cifar.py --config configs/cifar/teachers/resnet56.yaml
    python train_cifar.py --config configs/cifar/resnet56_resnet20/pesf.yaml --teacher-ckpt runs/cifar/teachers/resnet56_s0/last.pt
    torchrun --nproc_per_node=2 train_cifar.py --method kd --teacher-ckpt runs/cifar/teachers/resnet56_s0/last.pt

Reads top to bottom: parse config -> build data -> build models -> build method -> train and
evaluate -> write results. The whole data set lives on the device as uint8; crop, flip and
normalisation run there, so that the data pipeline keeps up with a CUDA-graph training step.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints
import engine
import models
import multirun
import runfolder
import stages
from distillers import (STAGED_METHODS, DistillConfig, build_distiller, draws_random_numbers_in_step, method_names,
                        needs_teacher)
from distillers.feature import run_init_stage
from distillers.nlp import FACTORIES as BERT_ONLY_TERMS
from models.cifar import MODELS as CIFAR_MODELS

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 100


@dataclass
class CifarConfig:
    method: str = "kd"
    teacher: str = "resnet56"
    student: str = "resnet20"
    teacher_ckpt: str | None = None
    assistant: str = "resnet32"             # takd: the teacher assistant (between resnet56 and resnet20 in depth)
    data_dir: str | None = None             # the folder holding cifar-100-python/; None: engine.data_places
    download: bool = False
    out: str | None = None                  # may name config keys: runs/x_s{seed}; default: run_folder()
    epochs: int = 240
    batch_size: int = 64                    # global batch, split across ranks
    lr: float = 0.05
    teacher_lr: float = 1e-3
    adapter_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "step"               # step | cosine
    lr_milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    alpha: float = 0.9
    tau: float = 4.0
    w_tce: float = 0.5
    w_tkl: float | None = None              # student-to-teacher KL weight (pesf, ftkd official); None: alpha
    w_ce: float | None = None               # the student's CE weight; None: 1 - alpha
    label_adjust: bool | None = None        # None: on for ftkd and pesf, off otherwise
    adapter: str = "houlsby"                # houlsby | lora | parallel
    adapter_slot: str = "head"              # head | stages
    bottleneck: int = 32
    feat_weight: float | None = None
    init_epochs: int | None = None          # fitnet/ab/ft/fsp initialisation stage; None: the method's default
    crd_negatives: str = "other_class"      # other_class (RepDistiller's default) | uniform
    anchor_epochs: list[int] = field(default_factory=list)   # keep the model after these epochs (rco's anchors)
    anchors_dir: str | None = None          # rco: the teacher run's anchors/ folder
    sftn_teacher_init: str = "scratch"      # sftn stage 1: scratch (as published) | checkpoint (fine-tune teacher_ckpt)
    # The authors' code as switches, the paper's text by default (README "Fidelity switches").
    teacher_bn: str = "eval"                # eval | train (frozen teacher on batch statistics)
    student_target: str = "adapted"         # adapted | unadapted (pesf: teacher before its head adapter)
    adapter_form: str = "paper"             # paper (adapter/bottleneck) | official (the authors' logit adapter)
    teacher_kl: str = "paper"               # paper | official (pesf: KL_tau(t || adj(s).detach()))
    grad_accum: int = 1                     # batches whose gradients are summed per optimiser step
    grad_accum_reset: str = "run"           # run (count across epochs) | epoch (the authors' per-epoch count)
    drop_last: bool = True                  # false: also train on the last partial batch (one process)
    lr_overwrite: bool = False              # true: after a decay every group runs at the student's lr
    train_subset: int = 0                   # use only the first N training images (0: all)
    seed: int = 0
    deterministic: bool = False             # GPU: deterministic algorithms, fixed cuBLAS workspace (README)
    device: str = "auto"
    amp: str = "auto"                       # bf16 | none | auto (bf16 on CUDA)
    channels_last: bool | None = None       # None: on for CUDA
    cuda_graph: bool | None = None          # None: on for single-process CUDA
    backend: str = "auto"                   # kd_core backend: auto | torch | triton
    eval_batch_size: int = 1000
    eval_every: int = 1                     # epochs between test-set evaluations (the last always runs)
    limit_batches: int = 0                  # train and eval batches per epoch (smoke runs)
    benchmark_steps: int = 0
    save_every: int = 0                     # steps between mid-epoch checkpoints (last.pt); 0: epoch ends only
    log_every: int = 100


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
DataNotFound = engine.DataNotFound


def find_cifar100(data_dir: str | None, download: bool = False) -> Path:
    """The folder holding ``cifar-100-python/``: ``data_dir`` when given, else the first of the places every
    script searches (with ``download``, where to download it when no place holds it)."""
    return engine.find_data(data_dir, engine.data_places(""), ["cifar-100-python/train", "cifar-100-python/test"],
                            "CIFAR-100", "pass --download to fetch it with torchvision (about 170 MB), or point "
                            "--data-dir or PESF_DATA at the folder that holds cifar-100-python/", download)


class DataUnreadable(ValueError):
    pass


def load_cifar100(root: str | Path, download: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read the standard python pickles: ``{"train": (uint8 [N,3,32,32], int64 [N]), "test": ...}``."""
    folder = Path(root) / "cifar-100-python"
    if not (folder / "train").is_file() and download:
        import torchvision  # only needed to fetch the archive
        try:
            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        except OSError as err:   # offline, or a folder we may not write to
            raise DataNotFound(f"could not download CIFAR-100 into {root} ({err}). Without a network, copy the "
                               f"cifar-100-python/ folder there or point --data-dir / PESF_DATA at it.") from None
    if not (folder / "train").is_file() or not (folder / "test").is_file():
        raise DataNotFound(f"CIFAR-100 not found: looked for {folder}/train and {folder}/test. Pass --download "
                           f"to fetch it with torchvision, or point --data-dir / PESF_DATA at the folder that "
                           f"holds cifar-100-python/.")
    splits = {}
    for split in ("train", "test"):
        try:
            with open(folder / split, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images = torch.from_numpy(entry["data"]).reshape(-1, 3, 32, 32)
            labels = torch.tensor(entry["fine_labels"], dtype=torch.int64)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError,
                ValueError, RuntimeError) as err:   # whatever a truncated or foreign pickle raises
            raise DataUnreadable(f"{folder / split} is not a readable CIFAR-100 pickle (truncated or corrupt: "
                                 f"{type(err).__name__}); download it again with --download into an empty "
                                 f"--data-dir") from None
        if len(labels) != len(images):
            raise DataUnreadable(f"{folder / split} holds {len(images)} images but {len(labels)} labels")
        splits[split] = (images, labels)
    return splits


class DeviceBatches:
    """A split held on the device as uint8; batches are augmented and normalised there.

    Training: one permutation per epoch (seeded by seed and epoch, identical on every rank), each
    global batch split into equal per-rank slices, last partial batch dropped (static shapes for
    the CUDA graph) unless ``drop_last`` is false (one process only); random crop with 4 pixels of
    zero padding and horizontal flip. Evaluation: every image once, sharded across ranks, no augmentation.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 train: bool, seed: int = 0, rank: int = 0, world: int = 1, limit: int = 0,
                 channels_last: bool = False, drop_last: bool = True) -> None:
        if train and batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
        if not drop_last and world > 1:
            raise ValueError("drop_last: false keeps a partial batch that cannot be split evenly: one process only")
        self.train, self.seed, self.rank, self.world, self.limit = train, seed, rank, world, limit
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.labels = labels.to(device)
        pad = 4 if train else 0
        self.images = nn.functional.pad(images, (pad, pad, pad, pad)).to(device)
        self.device = device
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.offsets = torch.arange(32, device=device)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            steps = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        else:
            steps = -(-n // (self.batch_size * self.world))
        return min(steps, self.limit) if self.limit else steps

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def epoch(self, epoch: int, start: int = 0):
        """The batches of ``epoch`` from the ``start``-th on (training; the augmentation of the ones before
        is still drawn, so that the rest is augmented as in a whole epoch)."""
        if not self.train:
            index = torch.arange(self.rank, len(self.labels), self.world, device=self.device)
            for i in range(len(self)):
                idx = index[i * self.batch_size:(i + 1) * self.batch_size]
                yield self._normalise(self.images[idx]), self.labels[idx], idx
            return
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.labels), generator=gen).to(self.device)
        aug = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch * 1_009 + self.rank + 1)
        per_rank = self.batch_size // self.world
        for i in range(len(self)):
            idx = order[i * self.batch_size + self.rank * per_rank:i * self.batch_size + (self.rank + 1) * per_rank]
            shift = torch.randint(0, 9, (2, len(idx)), generator=aug, device=self.device)
            flip = torch.rand(len(idx), generator=aug, device=self.device) < 0.5
            rows = (shift[0, :, None] + self.offsets)[:, None, :, None]
            if i < start:
                continue
            cols = shift[1, :, None] + self.offsets
            cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
            channels = torch.arange(3, device=self.device)[None, :, None, None]
            x = self.images[idx[:, None, None, None], channels, rows, cols]
            yield self._normalise(x), self.labels[idx], idx


def synthetic_batches(batch_size: int, device: torch.device, channels_last: bool, seed: int = 0):
    """Random images for --benchmark-steps: step time does not depend on pixel values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randint(0, 256, (batch_size * 16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch_size * 16,), generator=gen)
    return DeviceBatches(images, labels, batch_size, device, train=True, seed=seed, channels_last=channels_last)


# ----------------------------------------------------------------------------------------------
# Models and method
# ----------------------------------------------------------------------------------------------
def build_models(cfg: CifarConfig, log: engine.RunLog) -> tuple[nn.Module, nn.Module | None]:
    student = models.build_model(cfg.student, NUM_CLASSES)
    if not needs_teacher(cfg.method):
        return student, None
    if cfg.method.split("+")[0] == "pesf":
        teacher = models.build_model(cfg.teacher, NUM_CLASSES, adapter=ADAPTER_FORMS[cfg.adapter_form](cfg),
                                     slot=cfg.adapter_slot, bottleneck=cfg.bottleneck)
    else:
        teacher = models.build_model(cfg.teacher, NUM_CLASSES)
    if cfg.teacher_ckpt:
        models.load_checkpoint(teacher, checkpoints.load_file(cfg.teacher_ckpt, "teacher checkpoint"))
    elif teacher_from_scratch(cfg):
        log.print(f"{cfg.method}: the teacher starts from a random initialisation (sftn_teacher_init: scratch)")
    elif cfg.benchmark_steps:
        log.print("note: no --teacher-ckpt; benchmarking with a randomly initialised teacher")
    else:
        raise engine.ConfigError(f"method {cfg.method!r} needs a trained teacher: pass --teacher-ckpt "
                                 f"(train one with --method ce --student {cfg.teacher})")
    return student, teacher


def teacher_from_scratch(cfg: CifarConfig) -> bool:
    """SFTN as published (Park et al., NeurIPS 2021): its first stage trains the teacher from a random
    initialisation with the student branches, not a converged teacher."""
    return cfg.method == "sftn_teacher" and cfg.sftn_teacher_init == "scratch"


# adapter_form -> the model's adapter kind: the paper's configurable adapter, or the authors' logit adapter.
ADAPTER_FORMS = {"paper": lambda cfg: cfg.adapter, "official": lambda cfg: "official"}


def sgd(params, lr: float, cfg: CifarConfig) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
def resolve(cfg: CifarConfig, dist: engine.Dist) -> tuple[CifarConfig, torch.dtype | None]:
    cuda = dist.device.type == "cuda"
    amp, amp_dtype = engine.resolve_amp(cfg.amp, dist.device)
    engine.check_cuda_graph(cfg.cuda_graph, dist)
    if cfg.adapter_form not in ADAPTER_FORMS:
        raise engine.ConfigError(f"adapter_form must be {' or '.join(ADAPTER_FORMS)}, got {cfg.adapter_form!r}")
    if cfg.sftn_teacher_init not in SFTN_TEACHER_INITS:
        raise engine.ConfigError(f"sftn_teacher_init must be {' or '.join(SFTN_TEACHER_INITS)}, "
                                 f"got {cfg.sftn_teacher_init!r}")
    if cfg.method == "sftn" and cfg.sftn_teacher_init == "scratch" and cfg.teacher_ckpt:
        raise engine.ConfigError(f"sftn trains its teacher from scratch (sftn_teacher_init: scratch), so teacher_ckpt "
                                 f"{cfg.teacher_ckpt} would be unused: drop it, or fine-tune it with "
                                 f"--set sftn_teacher_init=checkpoint")
    if cfg.grad_accum < 1 or (cfg.grad_accum > 1 and cfg.cuda_graph):
        raise engine.ConfigError(f"grad_accum must be >= 1, and 1 with cuda_graph: true; got {cfg.grad_accum}")
    out = run_folder(cfg)
    cfg = dataclasses.replace(
        cfg, amp=amp, out=out,
        channels_last=cuda if cfg.channels_last is None else cfg.channels_last,
        cuda_graph=(cuda and dist.world == 1 and cfg.grad_accum == 1) if cfg.cuda_graph is None else cfg.cuda_graph)
    return cfg, amp_dtype


def run_folder(cfg: CifarConfig) -> str:
    """``cfg.out`` with config keys filled in (``runs/x_s{seed}``), or a name made from the method and pair."""
    if cfg.out:
        return cfg.out.format_map(dataclasses.asdict(cfg))
    pair = cfg.student if not needs_teacher(cfg.method) else f"{cfg.teacher}_{cfg.student}"
    return f"runs/cifar/{cfg.method}_{pair}_s{cfg.seed}"


SFTN_TEACHER_INITS = ("scratch", "checkpoint")


def stage_config(cfg: CifarConfig, stage: stages.Stage, out: str,
                 source: tuple[str, stages.Stage] | None) -> CifarConfig:
    """One stage of a multi-stage method: its method and network, taught by ``source``'s product if any.
    SFTN's teacher stage from scratch trains the teacher as its own protocol does: at the run's lr and epochs."""
    changes = dict(method=stage.method, out=out, student=cfg.assistant if stage.student == "assistant" else cfg.student)
    if stage.trains == "teacher" and cfg.sftn_teacher_init == "scratch":
        changes.update(teacher_ckpt=None, teacher_lr=cfg.lr)
    if source is not None:
        folder, made_by = source
        if made_by.trains == "teacher":
            changes.update(teacher=cfg.teacher, teacher_ckpt=str(Path(folder) / "teacher.pt"))
        else:
            changes.update(teacher=cfg.assistant if made_by.student == "assistant" else cfg.student,
                           teacher_ckpt=str(Path(folder) / "last.pt"))
    return dataclasses.replace(cfg, **changes)


def run(cfg: CifarConfig, resume: bool | str = False, overwrite: bool = False) -> dict:
    """One run, start to end: its summary (``summary.json``)."""
    return engine.drain(run_steps(cfg, resume, overwrite))


def run_steps(cfg: CifarConfig, resume: bool | str = False, overwrite: bool = False):
    """One run as a generator that yields after every training step and returns the summary, so that
    several runs can share a process (``multirun``). It holds its run folder throughout."""
    dist = engine.init_distributed(cfg.device)
    cfg, amp_dtype = resolve(cfg, dist)
    with engine.claim_run_folder(cfg, resume, overwrite, dist):
        return (yield from train_steps(cfg, dist, amp_dtype, resume, overwrite))


def train_steps(cfg: CifarConfig, dist: engine.Dist, amp_dtype: torch.dtype | None, resume: bool | str,
                overwrite: bool):
    log = engine.RunLog(cfg.out, enabled=dist.main)
    if cfg.method in STAGED_METHODS:
        method_stages = STAGED_METHODS[cfg.method]
        return (yield from stages.run_stages(cfg, method_stages, stage_config, run_steps, resume, log, overwrite))
    resume_from = None if cfg.benchmark_steps else engine.open_run(resume, log)
    engine.seed_everything(cfg.seed, cfg.deterministic)

    # Data
    per_rank_eval = max(1, cfg.eval_batch_size // dist.world)
    if cfg.benchmark_steps:
        train = synthetic_batches(cfg.batch_size, dist.device, cfg.channels_last, cfg.seed)
        test = None
    else:
        data = load_cifar100(find_cifar100(cfg.data_dir, cfg.download), cfg.download)
        images, labels = data["train"]
        if cfg.train_subset:
            images, labels = images[:cfg.train_subset], labels[:cfg.train_subset]
        train = DeviceBatches(images, labels, cfg.batch_size, dist.device, train=True, seed=cfg.seed,
                              rank=dist.rank, world=dist.world, limit=cfg.limit_batches,
                              channels_last=cfg.channels_last, drop_last=cfg.drop_last)
        test = DeviceBatches(*data["test"], per_rank_eval, dist.device, train=False, rank=dist.rank,
                             world=dist.world, limit=cfg.limit_batches, channels_last=cfg.channels_last)
    if len(train) == 0:
        raise engine.ConfigError(f"no full training batch: {len(train.labels)} images, batch size {cfg.batch_size}")

    # Models and method
    student, teacher = build_models(cfg, log)
    distiller = build_distiller(cfg.method, student, teacher, DistillConfig.from_run_config(cfg),
                                train_labels=train.labels)
    distiller.to(dist.device)
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)
    if resume_from is None and not cfg.benchmark_steps:   # checkpoints come after the stage: a resumed run is past it
        run_init_stage(distiller, train, lambda params, lr: sgd(params, lr, cfg), amp_dtype, log.print)
    optimizer = sgd(engine.param_groups(distiller), cfg.lr, cfg)
    if cfg.benchmark_steps:
        return (yield from engine.time_steps(cfg, dist, distiller, optimizer, train, amp_dtype, log))
    summary = yield from engine.fit_steps(cfg, dist, distiller, optimizer, train, test, amp_dtype, log,
                                          resume=resume_from)
    if dist.main and teacher is not None and distiller.teacher_mode != "frozen":   # a trained teacher, for later runs
        checkpoints.save_atomic({"model": engine.unwrap(distiller.teacher).state_dict()}, Path(cfg.out) / "teacher.pt")
    summary.update(method=cfg.method, teacher=cfg.teacher if teacher is not None else None, student=cfg.student,
                   epochs=cfg.epochs, seed=cfg.seed)
    log.write_summary(summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Quickstart: a small teacher, then KD and PESF students, and a comparison table
# ----------------------------------------------------------------------------------------------
def quickstart(base: CifarConfig, resume: bool = False, overwrite: bool = False) -> None:
    cuda = torch.cuda.is_available() and base.device in ("auto", "cuda")
    if cuda:
        size = dict(epochs=15, lr_schedule="cosine", lr=0.1, batch_size=128, log_every=200)
        teacher, student = "resnet56", "resnet20"
    else:  # a 2-core CPU: a few minutes in all
        size = dict(epochs=4, lr_schedule="cosine", lr=0.1, batch_size=64, train_subset=12000, eval_batch_size=500,
                    eval_every=1, log_every=50)   # every epoch: one point per epoch in the curves
        teacher, student = "resnet14", "resnet8"
    root = Path(base.out or "runs/quickstart")
    data_dir = str(find_cifar100(base.data_dir, download=True))
    common = dataclasses.replace(base, teacher=teacher, student=student, data_dir=data_dir, download=True, **size)
    print(f"quickstart on {'CUDA' if cuda else 'CPU'}: teacher {teacher}, students {student}, "
          f"{size['epochs']} epochs each, data in {common.data_dir}, outputs in {root}/", flush=True)
    runs = {f"teacher ({teacher}, ce)": dataclasses.replace(common, method="ce", student=teacher,
                                                              out=str(root / "teacher"))}
    for method in ("ce", "kd", "pesf"):
        runs[f"{student} {method}"] = dataclasses.replace(common, method=method, out=str(root / method),
                                                          teacher_ckpt=str(root / "teacher" / "last.pt"))
    rows = {}
    try:
        for i, (name, cfg) in enumerate(runs.items()):
            print(f"\n== quickstart run {i + 1}/{len(runs)}: {name}, into {cfg.out}/", flush=True)
            engine.expect_more_runs(len(runs) - i - 1)
            rows[name] = run(cfg, resume=resume, overwrite=overwrite)
    finally:
        engine.expect_more_runs(0)
    print("\n| run | top-1 | teacher top-1 | gap | KL | agreement |\n|---|---|---|---|---|---|")
    for name, s in rows.items():
        cells = [s.get("top1"), s.get("teacher_top1"), s.get("gap"), s.get("kl"), s.get("agreement")]
        print(f"| {name} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in cells) + " |")
    print("top-1: % of the test set; teacher top-1: the teacher's at the end (pesf's includes its adapter); gap: mean "
          "logsumexp(teacher) - logsumexp(student) (nats); KL: KL(teacher || student) at tau 1 (nats); agreement: % "
          "of test images where both predict the same class. All on the test set after the last epoch.")
    # Step times: each run's own wall time saw its own load, so the ratios come from one side-by-side benchmark.
    students = list(runs.items())[1:]
    compare_steps({name: dataclasses.replace(cfg, benchmark_steps=200 if cuda else 20,
                                             out=str(root / "benchmark" / cfg.method)) for name, cfg in students},
                  root / "benchmark")
    print("\nWhat to expect: " + (
        "this is the GPU size (resnet56 -> resnet20, full data, 15 epochs); its numbers have not been measured "
        "for this README yet." if cuda else
        "at this CPU size (12,000 images, 4 epochs) the teacher reaches about 14 % top-1 and distillation does "
        "not help yet: the students are too short-trained for the teacher's soft labels to matter. The GPU "
        "quickstart (resnet56 -> resnet20, full data, 15 epochs) is the size at which to compare methods."))
    import report   # what `python report.py <root> --out <root>/report` writes
    tables = report.write_report([str(root)], root / "report")
    print(f"\nreport: {tables}, figures and their CSVs beside it", flush=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[CifarConfig, argparse.Namespace]:
    methods = [m for m in method_names() if not any(term in m for term in BERT_ONLY_TERMS)]
    p = engine.arg_parser(__doc__, "configs/cifar/", [
        ("method", str, f"distillation method (default kd): {', '.join(methods)}"),
        ("teacher", str, f"teacher architecture (default resnet56): {', '.join(CIFAR_MODELS)}"),
        ("student", str, "student architecture (default resnet20), one of the teacher's list"),
        ("teacher-ckpt", str, "the teacher's weights: a ce run's last.pt, or a RepDistiller checkpoint"),
        ("data-dir", str, "folder holding cifar-100-python/ (default: the first of $PESF_DATA, ./data, "
                             "../shared/data that holds it)"),
        ("out", str, "run folder (default from the config path, or runs/cifar/<method>_<pair>_s<seed>)"),
        ("epochs", int, "training epochs (default 240)"),
        ("batch-size", int, "global batch size, split across processes (default 64)"),
        ("seed", int, "random seed (default 0)"),
        ("device", str, "auto (CUDA when available), cpu, cuda or cuda:N"),
        ("limit-batches", int, "train and test batches per epoch, for smoke runs (default 0: all)"),
        ("benchmark-steps", int, "time this many steps on synthetic data, write <out>/benchmark.json and stop"),
        ("save-every", int, "also write last.pt every N steps inside an epoch (default 0: epoch ends only)")])
    p.add_argument("--download", action="store_true", default=None, help="fetch CIFAR-100 with torchvision")
    p.add_argument("--quickstart", action="store_true", help="teacher, then ce/kd/pesf students, and a table")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run every combination of these values (repeatable) and print a table")
    p.add_argument("--seeds", metavar="S1,S2,...", help="one run per seed, each in its own folder (<out>_s<seed> "
                   "unless out names {seed}), then a mean +- std table; with --benchmark-steps: the aggregate "
                   "images/s of 1, 2, 4 and 8 concurrent runs")
    p.add_argument("--concurrent", type=int, metavar="N", help="--seeds/--sweep: at most N runs at once in this "
                   f"process (default: {multirun.GPU_CONCURRENCY} on one GPU, 1 on a CPU or under torchrun)")
    cfg, args = engine.parse_config(CifarConfig, p, argv, actions=("quickstart", "sweep", "seeds", "concurrent"))
    if args.concurrent is not None and args.concurrent < 1:
        raise engine.ConfigError(f"--concurrent must be at least 1, got {args.concurrent}")
    if args.concurrent is not None and not (args.seeds or args.sweep):
        raise engine.ConfigError("--concurrent N runs the runs of --seeds or --sweep concurrently; add one of them")
    return cfg, args


def parse_seeds(text: str | None) -> list[int | None]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; no --seeds -> ``[None]`` (the config's own seed)."""
    if text is None:
        return [None]
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise engine.ConfigError(f"--seeds expects integers like 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise engine.ConfigError(f"--seeds repeats a seed: {text!r}")
    return seeds


def seed_folder(out: str, seed: int | None) -> str:
    return out if seed is None or "{seed}" in out else f"{out}_s{seed}"


def print_seed_table(rows: list[tuple[str, dict]]) -> None:
    """Mean +- sample standard deviation over the seeds of each row name."""
    import statistics
    by_name: dict[str, list[dict]] = {}
    for name, summary in rows:
        by_name.setdefault(name, []).append(summary)
    print("\n| run | seeds | top-1 mean +- std | best top-1 mean +- std |\n|---|---|---|---|")
    for name, runs in by_name.items():
        cells = []
        for key in ("top1", "best_top1"):
            values = [r[key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} +- {std:.2f}")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


def run_many(cfgs: list[CifarConfig], args: argparse.Namespace) -> list[dict]:
    """``cfgs`` as one process's runs, at most ``--concurrent`` at a time (default: all on one GPU, up to
    ``multirun.GPU_CONCURRENCY``; one after another on a CPU); their summaries in order."""
    folders = [run_folder(cfg) for cfg in cfgs]
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise engine.ConfigError(f"two runs would write the same folder {twice[0]}: give out a {{seed}} or drop "
                                 f"repeated values")
    for folder in folders:   # before the first run starts, not when the last one's turn comes
        runfolder.check_fresh(folder, args.resume, args.overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    concurrent = args.concurrent or multirun.default_concurrency(cfgs[0].device, world)
    if concurrent > 1 and world > 1:
        raise engine.ConfigError("--concurrent runs several runs in one process; under torchrun every rank "
                                 "already shares each run: drop --concurrent or torchrun")
    if concurrent > 1 and len({cfg.deterministic for cfg in cfgs}) > 1:   # torch's setting is the process's
        raise engine.ConfigError("deterministic is one setting of the whole process: runs of one --concurrent "
                                 "process must share it (add --concurrent 1)")
    device = torch.device(engine.check_device(cfgs[0].device))
    check_concurrent_graphs(cfgs, concurrent, device)
    jobs = [multirun.Job(Path(folder).name, functools.partial(run_steps, cfg, bool(args.resume), args.overwrite))
            for folder, cfg in zip(folders, cfgs)]
    return multirun.run_all(jobs, concurrent, device)


def check_concurrent_graphs(cfgs: list[CifarConfig], concurrent: int, device: torch.device) -> None:
    """Concurrent CUDA-graphed runs replay from one CUDA generator: a graph that draws random numbers
    (CRD's negatives) gets offsets that depend on how the other runs' replays interleave, so such a run
    would not repeat itself. Refused in one line."""
    if concurrent < 2 or device.type != "cuda" or len(cfgs) < 2:
        return
    for cfg in cfgs:
        graphed = cfg.cuda_graph if cfg.cuda_graph is not None else cfg.grad_accum == 1
        if graphed and draws_random_numbers_in_step(cfg.method):
            raise engine.ConfigError(f"{cfg.method} draws random numbers inside its CUDA-graphed step, which "
                                     "concurrent runs would not repeat: add --concurrent 1 or --set cuda_graph=false")


def benchmark_concurrency(args: argparse.Namespace, base: CifarConfig, cfgs: list[CifarConfig]) -> None:
    """--benchmark-steps with --seeds: the aggregate images/s of 1, 2, 4 and 8 concurrent runs (up to
    --concurrent), run i with the i-th seed's config (in turn), each in <out>/concurrent/n<N>_<i>."""
    counts = [n for n in multirun.BENCHMARK_COUNTS if not args.concurrent or n <= args.concurrent]
    root = Path(run_folder(base)) / "concurrent"

    def jobs(n: int) -> list[multirun.Job]:
        copies = [dataclasses.replace(cfgs[i % len(cfgs)], out=str(root / f"n{n}_{i}")) for i in range(n)]
        return [multirun.Job(f"n{n}_{i}", functools.partial(run_steps, cfg)) for i, cfg in enumerate(copies)]

    multirun.benchmark(jobs, counts, torch.device(engine.check_device(base.device)), root)


def compare_steps(cfgs: dict[str, CifarConfig], out: Path) -> list[dict]:
    """--benchmark-steps of each named config, interleaved step by step in this process (``multirun.compare``):
    the step-time ratios between them are measured under one load; ratios to ``kd`` when it is one of them."""
    jobs = [multirun.Job(name, functools.partial(run_steps, cfg)) for name, cfg in cfgs.items()]
    reference = next((name for name, cfg in cfgs.items() if cfg.method == "kd"), None)
    device = torch.device(engine.check_device(next(iter(cfgs.values())).device))
    extra = {name: {"task": "cifar100", "setting": f"{cfg.teacher}_{cfg.student}" if needs_teacher(cfg.method)
                    else cfg.student} for name, cfg in cfgs.items()}
    return multirun.compare(jobs, device, out, reference, extra)


def seeds(args: argparse.Namespace, base: CifarConfig) -> None:
    """--seeds without --sweep: the same config once per seed, each run exactly as if started alone."""
    if isinstance(args.resume, str):
        raise engine.ConfigError("--resume PATH continues one run; --seeds continues with --resume alone")
    cfgs = []
    for seed in parse_seeds(args.seeds):
        overrides = {**args.overrides, "seed": seed}
        if base.out and "{seed}" not in base.out:   # else the seed's own run_folder(), as when started alone
            overrides["out"] = seed_folder(base.out, seed)
        cfgs.append(engine.build_config(CifarConfig, args.config, args.set, overrides))
    if base.benchmark_steps:
        return benchmark_concurrency(args, base, cfgs)
    print_seed_table([(base.method, summary) for summary in run_many(cfgs, args)])


def sweep(args: argparse.Namespace, base: CifarConfig) -> None:
    """One run per combination of the --sweep values, each in <out>/<key>=<value>..., then a table."""
    if isinstance(args.resume, str):
        raise engine.ConfigError("--resume PATH continues one run; a sweep continues with --resume alone")
    if base.benchmark_steps and args.seeds:
        raise engine.ConfigError("--benchmark-steps with --sweep compares the sweep's configs side by side, once "
                                 "each: drop --seeds (or drop --sweep for the concurrent throughput of seeds)")
    axes = []
    for item in args.sweep:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise engine.ConfigError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",")])
    root = Path(run_folder(base)) / "sweep"
    combos, cfgs, seed_list = [], [], parse_seeds(args.seeds)
    for combo in itertools.product(*axes):
        for seed in seed_list:
            overrides = {**args.overrides, "out": seed_folder(str(root / "_".join(combo)), seed),
                         **({} if seed is None else {"seed": seed})}
            cfgs.append(engine.build_config(CifarConfig, args.config, [*args.set, *combo], overrides))
            combos.append(combo)
    if base.benchmark_steps:
        return compare_steps({" ".join(combo): cfg for combo, cfg in zip(combos, cfgs)}, root)
    rows = list(zip(combos, run_many(cfgs, args)))
    print("\n| run | seed | top-1 | best top-1 | teacher top-1 | gap | KL | agreement |\n|---|---|---|---|---|---|---|---|")
    for combo, s in rows:
        cells = [s.get(k) for k in ("top1", "best_top1", "teacher_top1", "gap", "kl", "agreement")]
        print(f"| {' '.join(combo)} | {s['seed']} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in cells)
              + " |")
    if args.seeds:
        print_seed_table([(" ".join(combo), s) for combo, s in rows])


def main(argv=None) -> int:
    def body() -> None:
        cfg, args = parse_args(argv)
        if args.quickstart:
            quickstart(cfg, resume=bool(args.resume), overwrite=args.overwrite)
        elif args.sweep:
            sweep(args, cfg)
        elif args.seeds:
            seeds(args, cfg)
        else:
            run(cfg, resume=args.resume, overwrite=args.overwrite)
    return engine.cli(body)


if __name__ == "__main__":
    sys.exit(main())
