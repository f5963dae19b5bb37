"""ImageNet experiments of the PESF-KD paper (Tables 2 and 9): resnet50 -> resnet18 by default.

    torchrun --nproc_per_node=8 train_imagenet.py --method pesf --data-dir /data/imagenet
    python train_imagenet.py --config configs/imagenet/kd.yaml --data-dir /data/imagenet
    python train_imagenet.py --benchmark-data /data/imagenet/val/n01440764   # images/s of each --decode path

The data folder is a torchvision ImageFolder tree (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``).
The teacher is torchvision's pretrained ResNet-50 (``teacher_weights``) or a checkpoint
(``teacher_ckpt``). Reads top to bottom: parse config -> build data -> build models -> build method ->
train and evaluate -> write results; the loop, checkpoints and metrics are ``engine.fit``'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import checkpoints
import engine
import imagenet_data
import models
from distillers import DistillConfig, build_distiller, method_names, needs_teacher
from distillers.feature import run_init_stage
from distillers.nlp import FACTORIES as BERT_ONLY_TERMS
from imagenet_data import KINDS
from models.imagenet import MODELS as IMAGENET_MODELS


@dataclass
class ImagenetConfig:
    method: str = "kd"
    teacher: str = "resnet50"
    student: str = "resnet18"
    teacher_weights: str | None = "IMAGENET1K_V1"   # torchvision's pretrained teacher (76.1 % top-1)
    teacher_ckpt: str | None = None                 # overrides teacher_weights
    data_dir: str | None = None             # the folder holding train/ and val/; None: engine.data_places
    out: str | None = None                  # default: runs/imagenet/<method>_<teacher>_<student>_s<seed>
    epochs: int = 100
    batch_size: int = 256                   # global batch, split across ranks
    lr: float = 0.1
    teacher_lr: float = 1e-3
    adapter_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    lr_milestones: list[int] = field(default_factory=lambda: [30, 60, 90])
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    alpha: float = 0.9
    tau: float = 4.0
    w_tce: float = 0.5
    w_tkl: float | None = None
    w_ce: float | None = None               # the student's CE weight; None: 1 - alpha
    label_adjust: bool | None = None
    adapter: str = "houlsby"
    adapter_slot: str = "head"
    bottleneck: int = 32
    feat_weight: float | None = None
    init_epochs: int | None = None          # ab/ft/fsp stage; None: RepDistiller's CIFAR 30 (set it here)
    crd_negatives: str = "other_class"      # other_class (RepDistiller's default) | uniform
    image_size: int = 224
    workers: int = 8                        # data-loading processes per rank
    decode: str = "auto"                    # pil | cpu | gpu (imagenet_data.py); auto: gpu on CUDA, cpu elsewhere
    seed: int = 0
    deterministic: bool = False             # GPU: deterministic algorithms, fixed cuBLAS workspace (README)
    device: str = "auto"
    amp: str = "auto"                       # bf16 | none | auto (bf16 on CUDA)
    channels_last: bool | None = None       # None: on for CUDA
    cuda_graph: bool = False                # the step is not launch-bound at batch 256
    backend: str = "auto"
    eval_batch_size: int = 256
    eval_every: int = 1
    limit_batches: int = 0
    benchmark_steps: int = 0
    save_every: int = 0                     # steps between mid-epoch checkpoints (last.pt); 0: epoch ends only
    log_every: int = 100


# ----------------------------------------------------------------------------------------------
# Data: ImageFolder read by worker processes, decoded and augmented as uint8 by imagenet_data's path,
# normalised on the device
# ----------------------------------------------------------------------------------------------
class Indexed(Dataset):
    """Adds the sample index (CRD's memory bank needs it). An item may also be ``(key, i)``: sample ``i``
    is then augmented from its own seed ``key * 10_000_019 + i``, so that its augmentation depends neither
    on the worker that loads it nor on the batches before it (a resumed epoch is augmented as a whole one)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, int):
            x, y = self.dataset[item]
            return x, y, item
        key, i = item
        with imagenet_data.sample_rng(key * 10_000_019 + i):   # torchvision's transforms draw from torch's RNG
            x, y = self.dataset[i]
        return x, y, i


class EpochSampler(DistributedSampler):
    """The training shard of an epoch as ``(key, index)`` items (``key``: seed and epoch, see Indexed),
    from the ``start``-th batch of ``batch`` items on."""

    def __init__(self, dataset: Dataset, batch: int, **options) -> None:
        super().__init__(dataset, shuffle=True, drop_last=True, **options)
        self.batch, self.start = batch, 0

    def __iter__(self):
        key = self.seed * 100_003 + self.epoch
        return ((key, i) for i in itertools.islice(super().__iter__(), self.start * self.batch, None))

    def __len__(self) -> int:
        return super().__len__() - self.start * self.batch


def image_folder(root: Path, train: bool, size: int, decode: str = "pil") -> Dataset:
    """The split at ``root`` as ``(x, label, index)`` samples decoded by ``decode``'s path (imagenet_data)."""
    return Indexed(imagenet_data.image_files(root, train, size, decode))


class LoaderBatches:
    """DataLoader over a sharded sampler; yields normalised ``(x, y, index)`` on the device, ``x`` in ``dtype``.

    Training drops the last partial batch and reshuffles per epoch (seeded by seed and epoch). An epoch
    with odd files (imagenet_data.KINDS) ends with one line counting them, through ``report``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, train: bool, device: torch.device, seed: int,
                 rank: int, world: int, workers: int, limit: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, report=None) -> None:
        if train and batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
        # Evaluation shards every image exactly once: DistributedSampler would pad the last shard with
        # repeated images, which then count twice in the accuracy.
        per_rank = batch_size // world if train else batch_size
        self.sampler = EpochSampler(dataset, per_rank, num_replicas=world, rank=rank, seed=seed) if train \
            else range(rank, len(dataset), world)
        self.loader = DataLoader(dataset, batch_size=per_rank, sampler=self.sampler, num_workers=workers,
                                 collate_fn=imagenet_data.collate, pin_memory=device.type == "cuda",
                                 drop_last=train, persistent_workers=workers > 0)
        self.steps = len(self.loader)
        self.device, self.limit = device, limit
        self.normalise = imagenet_data.Normalise(device, dtype, channels_last)
        self.report, self.split = report, "train" if train else "validation"

    def __len__(self) -> int:
        return min(self.steps, self.limit) if self.limit else self.steps

    def epoch(self, epoch: int, start: int = 0):
        """The batches of ``epoch``, in training from the ``start``-th on (the ones before are not loaded)."""
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.start = start
        kinds = torch.zeros(len(KINDS), dtype=torch.long)
        for i, (batch, y, index) in enumerate(self.loader, start=start):
            if i == len(self):
                break
            kinds += batch.kinds.bincount(minlength=len(KINDS))
            x = self.normalise(batch.images(self.device))
            yield x, y.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
        self.report_odd_files(epoch, engine.all_reduce_sum(kinds.to(self.device)).tolist())

    def report_odd_files(self, epoch: int, kinds: list[int]) -> None:
        if self.report is not None and sum(kinds[1:]):
            counts = ", ".join(f"{n} {kind}" for kind, n in zip(KINDS[1:], kinds[1:]) if n)
            self.report(f"{self.split} epoch {epoch + 1}: {sum(kinds[1:])} odd file(s) of {sum(kinds)} decoded "
                        f"by PIL on the CPU ({counts})")


class SyntheticBatches:
    """Random images for --benchmark-steps (no data set needed): step time does not depend on pixels."""

    def __init__(self, batch_size: int, size: int, num_classes: int, device: torch.device,
                 channels_last: bool) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(batch_size, 3, size, size, generator=gen).to(device, memory_format=memory_format)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.index = torch.arange(batch_size, device=device)

    def __len__(self) -> int:
        return 8

    def epoch(self, epoch: int):
        for _ in range(len(self)):
            yield self.x, self.y, self.index


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def build_models(cfg: ImagenetConfig, num_classes: int, log: engine.RunLog) -> tuple[nn.Module, nn.Module | None]:
    student = models.build_model(cfg.student, num_classes)
    if not needs_teacher(cfg.method):
        return student, None
    adapter = dict(adapter=cfg.adapter, slot=cfg.adapter_slot, bottleneck=cfg.bottleneck) \
        if cfg.method.split("+")[0] == "pesf" else {}
    if cfg.teacher_ckpt:
        teacher = models.build_model(cfg.teacher, num_classes, **adapter)
        models.load_checkpoint(teacher, checkpoints.load_file(cfg.teacher_ckpt, "teacher checkpoint"))
    elif cfg.teacher_weights and not (cfg.benchmark_steps and not cached_weights(cfg.teacher, cfg.teacher_weights)):
        if num_classes != 1000:
            raise engine.ConfigError(f"teacher_weights {cfg.teacher_weights!r} are for 1000 classes, the data has "
                                     f"{num_classes}: pass --teacher-ckpt")
        teacher = download_teacher(cfg.teacher, cfg.teacher_weights, num_classes, adapter)
    elif cfg.benchmark_steps:   # step time does not depend on the weights' values: never download for it
        missing = f"{cfg.teacher_weights} not in {hub_checkpoints()}" if cfg.teacher_weights else "no teacher weights"
        log.print(f"note: {missing}; benchmarking with a randomly initialised teacher (step time is the same)")
        teacher = models.build_model(cfg.teacher, num_classes, **adapter)
    else:
        raise engine.ConfigError(f"method {cfg.method!r} needs a teacher: set teacher_weights or --teacher-ckpt")
    return student, teacher


def hub_checkpoints() -> Path:
    """Where torchvision keeps (and downloads) its pretrained weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights(model: str, weights: str) -> Path | None:
    """The local file of torchvision's ``weights`` for ``model``, or None when it is not downloaded yet."""
    from torchvision.models import get_model_weights
    path = hub_checkpoints() / Path(get_model_weights(model)[weights].url).name
    return path if path.is_file() else None


def download_teacher(model: str, weights: str, num_classes: int, adapter: dict) -> nn.Module:
    """torchvision's pretrained ``model`` (downloaded into the torch hub cache unless already there). Offline, a
    one-line error, and the cache folders the attempt created are removed again."""
    created = [folder for folder in (hub_checkpoints().parent, hub_checkpoints()) if not folder.exists()]
    try:
        return models.build_model(model, num_classes, weights=weights, **adapter)
    except OSError as err:   # no network: say what to do instead of a urllib traceback
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise engine.ConfigError(f"could not download torchvision weights {weights!r} ({err}); put them in "
                                 f"{hub_checkpoints()} or pass --teacher-ckpt") from None


def resolve(cfg: ImagenetConfig, dist: engine.Dist) -> tuple[ImagenetConfig, torch.dtype | None]:
    cuda = dist.device.type == "cuda"
    amp, amp_dtype = engine.resolve_amp(cfg.amp, dist.device)
    engine.check_cuda_graph(cfg.cuda_graph, dist)
    if needs_teacher(cfg.method) and cfg.teacher_weights and not cfg.teacher_ckpt and cfg.teacher in IMAGENET_MODELS:
        from torchvision.models import get_model_weights   # checked before the data set is scanned
        known = [w.name for w in get_model_weights(cfg.teacher)]
        if cfg.teacher_weights not in known:
            raise engine.ConfigError(f"unknown teacher_weights {cfg.teacher_weights!r} for {cfg.teacher}; valid: "
                                     f"{', '.join(known)}")
    pair = cfg.student if not needs_teacher(cfg.method) else f"{cfg.teacher}_{cfg.student}"
    cfg = dataclasses.replace(cfg, amp=amp, out=cfg.out or f"runs/imagenet/{cfg.method}_{pair}_s{cfg.seed}",
                              decode=imagenet_data.resolve_decode(cfg.decode, dist.device),
                              channels_last=cuda if cfg.channels_last is None else cfg.channels_last)
    return cfg, amp_dtype


def run(cfg: ImagenetConfig, resume: bool | str = False, overwrite: bool = False) -> dict:
    """One run, start to end, holding its run folder throughout: its summary (``summary.json``)."""
    dist = engine.init_distributed(cfg.device)
    cfg, amp_dtype = resolve(cfg, dist)
    with engine.claim_run_folder(cfg, resume, overwrite, dist):
        return train(cfg, dist, amp_dtype, resume)


def train(cfg: ImagenetConfig, dist: engine.Dist, amp_dtype: torch.dtype | None, resume: bool | str) -> dict:
    log = engine.RunLog(cfg.out, enabled=dist.main)
    resume_from = None if cfg.benchmark_steps else engine.open_run(resume, log)
    engine.seed_everything(cfg.seed, cfg.deterministic)

    # Data
    if cfg.benchmark_steps:
        num_classes = 1000
        train = SyntheticBatches(cfg.batch_size // dist.world, cfg.image_size, num_classes, dist.device,
                                 cfg.channels_last)
        train_labels = train.y.repeat(len(train) * dist.world)   # bank row i holds batch row i % batch
    else:
        root = engine.find_data(cfg.data_dir, engine.data_places("imagenet", "PESF_IMAGENET"), ["train", "val"],
                                "ImageNet", "it cannot be downloaded by script: get ILSVRC-2012 from image-net.org "
                                "as ImageFolder trees and point --data-dir, PESF_IMAGENET or PESF_DATA/imagenet at "
                                "the folder that holds train/ and val/")
        train_set = image_folder(root / "train", True, cfg.image_size, cfg.decode)
        val_set = image_folder(root / "val", False, cfg.image_size, cfg.decode)
        num_classes, train_labels = len(train_set.dataset.classes), torch.tensor(train_set.dataset.targets)
        common = dict(device=dist.device, seed=cfg.seed, rank=dist.rank, world=dist.world, workers=cfg.workers,
                      limit=cfg.limit_batches, channels_last=cfg.channels_last, dtype=amp_dtype or torch.float32,
                      report=log.print)
        train = LoaderBatches(train_set, cfg.batch_size, True, **common)
        test = LoaderBatches(val_set, max(1, cfg.eval_batch_size // dist.world), False, **common)
        if len(train) == 0:
            raise engine.ConfigError(f"no full training batch: {len(train_labels)} images, batch size {cfg.batch_size}")

    # Models and method
    student, teacher = build_models(cfg, num_classes, log)
    distiller = build_distiller(cfg.method, student, teacher, DistillConfig.from_run_config(cfg),
                                train_labels=train_labels)
    distiller.to(dist.device)
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)

    def sgd(params, lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    if resume_from is None and not cfg.benchmark_steps:   # checkpoints come after the stage: a resumed run is past it
        run_init_stage(distiller, train, sgd, amp_dtype, log.print)
    optimizer = sgd(engine.param_groups(distiller), cfg.lr)

    # Train and evaluate
    if cfg.benchmark_steps:
        return engine.benchmark(cfg, dist, distiller, optimizer, train, amp_dtype, log)
    summary = engine.fit(cfg, dist, distiller, optimizer, train, test, amp_dtype, log, resume=resume_from)
    summary.update(method=cfg.method, teacher=cfg.teacher if teacher is not None else None, student=cfg.student,
                   epochs=cfg.epochs, seed=cfg.seed, num_classes=num_classes)
    log.write_summary(summary)
    return summary


def benchmark_data(cfg: ImagenetConfig, folder: str) -> dict:
    """--benchmark-data: imagenet_data.benchmark on ``folder``; the table, and <out>/benchmark_data.json."""
    device = torch.device(engine.check_device(cfg.device))
    log = engine.RunLog(cfg.out or "runs/imagenet/benchmark_data")
    paths = None if cfg.decode == "auto" else (imagenet_data.resolve_decode(cfg.decode, device),)
    result = imagenet_data.benchmark(Path(folder), device, cfg.image_size, cfg.batch_size, decode_paths=paths)
    result["table"] = imagenet_data.benchmark_table(result)
    log.print("\n".join(result["table"]))
    log.write_summary(result, "benchmark_data.json")
    return result


def parse_args(argv=None) -> tuple[ImagenetConfig, argparse.Namespace]:
    methods = [m for m in method_names() if not any(term in m for term in BERT_ONLY_TERMS)]
    p = engine.arg_parser(__doc__, "configs/imagenet/", [
        ("method", str, f"distillation method (default kd): {', '.join(methods)}"),
        ("teacher", str, f"teacher architecture (default resnet50): {', '.join(IMAGENET_MODELS)}"),
        ("student", str, "student architecture (default resnet18), one of the teacher's list"),
        ("teacher-ckpt", str, "the teacher's weights (default: torchvision's teacher_weights IMAGENET1K_V1)"),
        ("data-dir", str, "folder with train/ and val/ ImageFolder trees (default: the first of $PESF_IMAGENET, "
                             "$PESF_DATA/imagenet, ./data/imagenet, ../shared/data/imagenet that holds them)"),
        ("out", str, "run folder (default runs/imagenet/<method>_<teacher>_<student>_s<seed>)"),
        ("epochs", int, "training epochs (default 100)"),
        ("batch-size", int, "global batch size, split across processes (default 256)"),
        ("seed", int, "random seed (default 0)"),
        ("device", str, "auto (CUDA when available), cpu, cuda or cuda:N"),
        ("limit-batches", int, "train and validation batches per epoch, for smoke runs (default 0: all)"),
        ("benchmark-steps", int, "time this many steps on synthetic data, write <out>/benchmark.json and stop"),
        ("workers", int, "data-loading processes per rank (default 8)"),
        ("decode", str, "where images are decoded: pil, cpu (workers) or gpu (whole batches on the device); "
                        "default auto: gpu on CUDA, cpu elsewhere"),
        ("save-every", int, "also write last.pt every N steps inside an epoch (default 0: epoch ends only)")])
    p.add_argument("--benchmark-data", metavar="DIR", help="time each --decode path on the images under DIR, print "
                   "a table, write <out>/benchmark_data.json and stop (no training)")
    return engine.parse_config(ImagenetConfig, p, argv, actions=("benchmark_data",))


def main(argv=None) -> int:
    def body() -> None:
        cfg, args = parse_args(argv)
        if args.benchmark_data:
            benchmark_data(cfg, args.benchmark_data)
        else:
            run(cfg, resume=args.resume, overwrite=args.overwrite)
    return engine.cli(body)


if __name__ == "__main__":
    sys.exit(main())
