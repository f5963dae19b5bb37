"""ImageNet input for train_imagenet.py: three ways to decode and augment a training image, the real data
set's odd files, and a benchmark of the three (``train_imagenet.py --benchmark-data DIR``).

``--decode`` picks where the JPEG is decoded and augmented; the augmentation is the same on all three:
- ``pil``: PIL in the data-loading workers, torchvision's PIL transforms (the reference);
- ``cpu``: ``torchvision.io.decode_jpeg`` and ``transforms.v2`` on uint8 tensors in the workers;
- ``gpu``: the workers only read the file's bytes and draw the crop; the main process decodes the whole
  batch with ``decode_jpeg(list_of_bytes, device=...)`` and crops, flips and normalises it there. On a
  CPU device it runs the same code in the main process (how the tests drive it).
Training draws the crop (RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3) and the flip (50 %) from torch's
RNG in the order torchvision's ``T.RandomResizedCrop`` and ``T.RandomHorizontalFlip`` draw them, in the worker,
under the sample's own seed (train_imagenet.Indexed); so the three paths take the same crop of the same
image. Validation resizes the shorter side to size * 8 / 7 (256 for 224) and takes the central square.

Odd files (ImageNet's train set has 22 CMYK JPEGs, some grayscale ones and a PNG named ``.JPEG``) are
decoded by PIL in the worker on every path, then augmented like the others, and counted per kind.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from engine import ConfigError

DECODE_PATHS = ("pil", "cpu", "gpu")
KINDS = ("RGB JPEG", "grayscale JPEG", "CMYK JPEG", "other format or mode")   # an odd file is any kind but the first
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto`` is ``gpu`` on CUDA and ``cpu`` elsewhere."""
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode not in DECODE_PATHS:
        raise ConfigError(f"decode must be auto, {', '.join(DECODE_PATHS)}, got {decode!r}")
    return decode


def file_kind(image: Image.Image) -> int:
    """Index into KINDS of an opened (not yet decoded) PIL image."""
    if image.format != "JPEG":
        return 3
    return {"RGB": 0, "L": 1, "CMYK": 2}.get(image.mode, 3)


@contextlib.contextmanager
def sample_rng(seed: int):
    """torch's CPU generator seeded with ``seed`` inside, restored after. Unlike ``torch.manual_seed`` it
    leaves the CUDA generators alone (the main process draws from them when workers=0), and it is cheap:
    ``torch.manual_seed`` costs a few hundred microseconds per image on a CUDA build of torch."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def draw_crop(height: int, width: int, train: bool) -> list[int]:
    """Training: ``[top, left, height, width, flip]`` drawn from torch's RNG exactly as torchvision's
    RandomResizedCrop then RandomHorizontalFlip draw them; validation: ``[]`` (nothing random)."""
    if not train:
        return []
    shape_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
    top, left, h, w = T.RandomResizedCrop.get_params(shape_only, list(SCALE), list(RATIO))
    return [top, left, h, w, int(torch.rand(1) < 0.5)]


def augment(image: torch.Tensor, crop: list[int], size: int) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` image on any device -> uint8 ``(3, size, size)``: ``crop`` from ``draw_crop``
    resized with antialiasing (and flipped), or for ``[]`` validation's resize and centre crop."""
    if not crop:
        return F.center_crop(F.resize(image, [size * 8 // 7], antialias=True), [size, size])
    top, left, h, w, flip = crop
    out = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return F.horizontal_flip(out) if flip else out


def rgb_jpeg(encoded: torch.Tensor) -> torch.Tensor | None:
    """``decode_jpeg`` on the CPU when the file is a three-channel JPEG; ``None`` for an odd file (one
    channel, four, or no JPEG at all), which the caller hands to the PIL fallback."""
    try:
        image = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    return image if image.shape[0] == 3 else None


def pil_decode(data: bytes) -> torch.Tensor:
    """The fallback: any format PIL reads, any mode, as a uint8 RGB tensor."""
    return F.pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Item(NamedTuple):
    """One image as a worker hands it on: ``pixels`` (uint8, augmented) when the worker decoded it, else
    ``encoded`` (the file's bytes) and the ``crop`` to take on the device; ``size`` is the output's side."""
    pixels: torch.Tensor | None
    encoded: torch.Tensor | None
    crop: list[int]
    kind: int
    size: int


class Decoder:
    """The ImageFolder transform of one decode path: a file's bytes -> Item (in a data-loading worker)."""

    def __init__(self, decode: str, train: bool, size: int) -> None:
        self.decode, self.train, self.size = decode, train, size
        self.pil_transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()]) \
            if train else T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.PILToTensor()])

    def __call__(self, data: bytes) -> Item:
        if self.decode == "pil":
            image = Image.open(io.BytesIO(data))
            return Item(self.pil_transform(image.convert("RGB")), None, [], file_kind(image), self.size)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.decode == "cpu":
            image = rgb_jpeg(encoded)
            if image is not None:
                crop = draw_crop(image.shape[1], image.shape[2], self.train)
                return Item(augment(image, crop, self.size), None, crop, 0, self.size)
        header = Image.open(io.BytesIO(data))   # reads the header only
        kind = file_kind(header)
        crop = draw_crop(header.height, header.width, self.train)
        if self.decode == "gpu" and kind == 0:
            return Item(None, encoded, crop, kind, self.size)
        return Item(augment(pil_decode(data), crop, self.size), None, crop, kind, self.size)


def image_files(root: Path, train: bool, size: int, decode: str):
    """The ImageFolder tree at ``root`` read as file bytes and decoded by ``decode``'s path."""
    from torchvision.datasets import ImageFolder
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet split not found: {root} (expected an ImageFolder tree <data_dir>/"
                                f"{root.name}/<class>/<image>; set --data-dir or PESF_IMAGENET)")
    return ImageFolder(str(root), loader=read_bytes, transform=Decoder(decode, train, size))


class Batch(NamedTuple):
    """A worker's batch: the rows it decoded (``pixels`` at ``pixel_rows``), the files left to decode on the
    device (``encoded``, the files' bytes one after another, ``lengths`` each, at ``encoded_rows``, with their
    ``crops``), every row's ``kinds`` (index into KINDS), and the images' side ``size``."""
    pixels: torch.Tensor
    pixel_rows: torch.Tensor
    encoded: torch.Tensor
    lengths: torch.Tensor
    encoded_rows: torch.Tensor
    crops: list[list[int]]
    kinds: torch.Tensor
    size: int

    def images(self, device: torch.device) -> torch.Tensor:
        """The batch as uint8 ``(B, 3, size, size)`` on ``device``, decoding the encoded files there."""
        if not len(self.encoded_rows):   # the workers decoded every row (pil, cpu): the rows are in order
            return self.pixels.to(device, non_blocking=True)
        x = torch.empty(len(self.kinds), 3, self.size, self.size, dtype=torch.uint8, device=device)
        x[self.pixel_rows.to(device)] = self.pixels.to(device, non_blocking=True)
        if len(self.encoded_rows):
            files = list(torch.split(self.encoded, self.lengths.tolist()))
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
            for row, image, crop in zip(self.encoded_rows.tolist(), decoded, self.crops):
                x[row] = augment(image, crop, self.size)
        return x


class Normalise:
    """uint8 ``(B, 3, S, S)`` images on the device -> ``(x - mean) / std`` (ImageNet's statistics) in ``dtype``,
    channels-last when asked (converted while still uint8, the cheapest)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        return x.float().sub_(self.mean).div_(self.std).to(self.dtype)


def collate(samples: list[tuple]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """``(x, label, index)`` samples -> ``(Batch, labels, indices)``; ``x`` is an Item or a uint8 image."""
    items = [x if isinstance(x, Item) else Item(x, None, [], 0, x.shape[-1]) for x, _, _ in samples]
    size = items[0].size
    decoded = [r for r, item in enumerate(items) if item.pixels is not None]
    encoded = [r for r, item in enumerate(items) if item.pixels is None]
    pixels = torch.stack([items[r].pixels for r in decoded]) if decoded else \
        torch.empty(0, 3, size, size, dtype=torch.uint8)
    files = [items[r].encoded for r in encoded]
    batch = Batch(pixels=pixels, pixel_rows=torch.tensor(decoded, dtype=torch.long),
                  encoded=torch.cat(files) if files else torch.empty(0, dtype=torch.uint8),
                  lengths=torch.tensor([len(f) for f in files], dtype=torch.long),
                  encoded_rows=torch.tensor(encoded, dtype=torch.long),
                  crops=[items[r].crop for r in encoded],
                  kinds=torch.tensor([item.kind for item in items], dtype=torch.long), size=size)
    return batch, torch.tensor([y for _, y, _ in samples]), torch.tensor([i for _, _, i in samples])


# ----------------------------------------------------------------------------------------------
# Benchmark: train_imagenet.py --benchmark-data DIR
# ----------------------------------------------------------------------------------------------
def folder_stats(files: list[Path]) -> dict:
    sizes = [Image.open(f).size for f in files]
    kinds = [0] * len(KINDS)
    for f in files:
        kinds[file_kind(Image.open(f))] += 1
    return {"files": len(files), "mean_kb": statistics.mean(f.stat().st_size for f in files) / 1024,
            "mean_width": statistics.mean(w for w, _ in sizes), "mean_height": statistics.mean(h for _, h in sizes),
            "kinds": dict(zip(KINDS, kinds))}


def worker_pass(decoder: Decoder, files: list[Path]) -> tuple[float, list[tuple]]:
    """What one worker process does for ``files`` (read, seed, decode or draw): the CPU seconds it took
    (not wall-clock seconds, which on a shared machine count the other processes' turns too) and the samples."""
    samples = []
    started = time.process_time()
    for i, path in enumerate(files):
        with sample_rng(i):
            samples.append((decoder(read_bytes(str(path))), 0, i))
    return time.process_time() - started, samples


def device_pass(batches: list[Batch], normalise: Normalise, device: torch.device) -> float:
    """Seconds to decode, augment and normalise ``batches`` on ``device`` (the main process's share)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for batch in batches:
        normalise(batch.images(device))
    sync()
    return time.perf_counter() - started


def benchmark(folder: Path, device: torch.device, size: int = 224, batch_size: int = 256, rounds: int = 3,
              decode_paths: tuple[str, ...] | None = None) -> dict:
    """Images/s of each decode path on the images under ``folder`` (training augmentation): one thread, per
    CPU second, the paths interleaved round by round in this process; the median round counts. ``gpu`` runs
    where ``device`` is CUDA (or when named in ``decode_paths``): its per-core rate is the workers' share (read,
    header, crop draw), its total the device's decode rate in ``batch_size`` batches, bf16 channels-last."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise ConfigError(f"no .JPEG, .jpg or .png files under {folder}")
    paths = decode_paths or (("pil", "cpu", "gpu") if device.type == "cuda" else ("pil", "cpu"))
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a data-loading worker's setting
    try:
        worker_s: dict[str, list[float]] = {p: [] for p in paths}
        device_s: list[float] = []
        normalise = Normalise(device, torch.bfloat16, channels_last=True)
        for _ in range(rounds):
            for path in paths:
                seconds, samples = worker_pass(Decoder(path, True, size), files)
                worker_s[path].append(seconds)
                if path == "gpu":
                    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
                    device_pass([batches[0][0]], normalise, device)   # warm-up: the decoder's first call
                    device_s.append(device_pass([b for b, _, _ in batches], normalise, device))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for path in paths:
        per_core = len(files) / statistics.median(worker_s[path])
        total = per_core * cores if path != "gpu" else min(per_core * cores, len(files) / statistics.median(device_s))
        rows.append({"decode": path, "images_per_s_per_core": per_core, "images_per_s_total": total,
                     **({"device_images_per_s": len(files) / statistics.median(device_s)} if path == "gpu" else {})})
    return {"folder": str(folder), "cores": cores, "device": str(device), "size": size, "rounds": rounds,
            **folder_stats(files), "results": rows}


def benchmark_table(result: dict) -> list[str]:
    """The benchmark as Markdown lines: the folder's statistics, the table, and what the columns mean."""
    odd = ", ".join(f"{n} {kind}" for kind, n in result["kinds"].items() if n and kind != KINDS[0]) or "none"
    lines = [f"{result['files']} files under {result['folder']}: mean {result['mean_kb']:.0f} KB, mean "
             f"{result['mean_width']:.0f} x {result['mean_height']:.0f} pixels, odd files: {odd}; "
             f"{result['cores']} CPU cores; training augmentation to {result['size']} x {result['size']}", "",
             "| decode | images/s per core | images/s total |", "|---|---|---|"]
    for r in result["results"]:
        lines.append(f"| {r['decode']} | {r['images_per_s_per_core']:.0f} | {r['images_per_s_total']:.0f} |")
    lines += ["", "per core: one thread doing a data-loading worker's share, images per CPU second (median of "
              f"{result['rounds']} interleaved rounds); total: per core x {result['cores']} cores"]
    gpu = [r for r in result["results"] if r["decode"] == "gpu"]
    if gpu:
        lines[-1] += (f", for gpu capped by the device's own rate ({gpu[0]['device_images_per_s']:.0f} images/s on "
                      f"{result['device']}: batched decode_jpeg, crop, flip, bf16 channels-last)")
    return lines
