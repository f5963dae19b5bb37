"""imagenet_data.py: the three decode paths (pil, cpu, gpu: the gpu path's batched decode runs on the CPU
device here, the same code), the odd files of the real data set, the augmentation's distribution against
torchvision's RandomResizedCrop on PIL images, and the data benchmark."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

import imagenet_data
import train_imagenet

CPU = torch.device("cpu")
MEAN = torch.tensor(imagenet_data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(imagenet_data.IMAGENET_STD).view(1, 3, 1, 1) * 255


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour image (waves and a gradient), as JPEG-friendly as a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [127 + 60 * np.sin(x / rng.uniform(6, 20) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(6, 20))
                + 60 * (x / width - y / height) for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def write_odd_tree(root: Path) -> dict[str, Path]:
    """One class folder: two RGB JPEGs, a CMYK JPEG, a grayscale JPEG and a PNG named .JPEG."""
    folder = root / "n0"
    folder.mkdir(parents=True)
    files = {name: folder / f"{name}.JPEG" for name in ("rgb_a", "rgb_b", "cmyk", "gray", "png")}
    Image.fromarray(photo_like(60, 80, 0)).save(files["rgb_a"], "JPEG", quality=95)
    Image.fromarray(photo_like(72, 54, 1)).save(files["rgb_b"], "JPEG", quality=95)
    Image.fromarray(photo_like(64, 70, 2)).convert("CMYK").save(files["cmyk"], "JPEG", quality=95)
    Image.fromarray(photo_like(50, 66, 3)).convert("L").save(files["gray"], "JPEG", quality=95)
    Image.fromarray(photo_like(58, 62, 4)).save(files["png"], "PNG")
    return files


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    write_odd_tree(root / "train")
    write_odd_tree(root / "val")
    return root


def pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised batch -> the uint8-scale pixels it came from."""
    return (x.float() * STD + MEAN).numpy()


def pil_validation_crop(path: Path, size: int) -> np.ndarray:
    """An independent reference: PIL decodes (any mode -> RGB), resizes the shorter side to size * 8 // 7
    with PIL's bilinear filter and cuts the central size x size square."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short = size * 8 // 7
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(new, Image.BILINEAR)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32).transpose(2, 0, 1)


@pytest.mark.parametrize("decode", imagenet_data.DECODE_PATHS)
def test_odd_files_are_decoded_right_and_counted_once_per_epoch(odd_tree, decode):
    lines = []
    dataset = train_imagenet.image_folder(odd_tree / "val", False, 32, decode)
    batches = train_imagenet.LoaderBatches(dataset, 5, False, CPU, 0, 0, 1, 0, report=lines.append)
    (x, y, index), = list(batches.epoch(0))
    got = pixels(x)
    # Every file, odd or not, is the PIL reference's picture: the PIL path exactly (it is PIL); the others
    # decode with libjpeg-turbo inside torchvision and resize with torch's uint8 antialiased bilinear filter,
    # which on the CPU rounds a pixel here and there one level away from PIL's (a CMYK file decoded as
    # if it were RGB, or a grayscale one as one channel, is off by tens of levels).
    for row, i in enumerate(index.tolist()):
        path = Path(dataset.dataset.samples[i][0])
        diff = np.abs(got[row] - pil_validation_crop(path, 32))
        assert diff.max() <= (1e-3 if decode == "pil" else 1 + 1e-3), (path.name, diff.max())
        assert diff.mean() < (1e-3 if decode == "pil" else 0.05), (path.name, diff.mean())
    assert lines == ["validation epoch 1: 3 odd file(s) of 5 decoded by PIL on the CPU "
                     "(1 grayscale JPEG, 1 CMYK JPEG, 1 other format or mode)"]
    # Only the RGB JPEGs are left to the device (nvJPEG decodes no CMYK, and no PNG at all).
    batch, _, index = imagenet_data.collate([dataset[i] for i in range(5)])
    on_device = {Path(dataset.dataset.samples[int(index[r])][0]).stem for r in batch.encoded_rows.tolist()}
    assert on_device == ({"rgb_a", "rgb_b"} if decode == "gpu" else set())
    train = train_imagenet.LoaderBatches(train_imagenet.image_folder(odd_tree / "train", True, 32, decode), 5, True,
                                         CPU, 0, 0, 1, 0, report=lines.append)
    for epoch in (0, 1):
        (x, _, _), = list(train.epoch(epoch))
        assert x.shape == (5, 3, 32, 32) and torch.isfinite(x).all()
    assert lines[1:] == [f"train epoch {e}: 3 odd file(s) of 5 decoded by PIL on the CPU (1 grayscale JPEG, "
                         "1 CMYK JPEG, 1 other format or mode)" for e in (1, 2)]


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(4):
            Image.fromarray(photo_like(50 + 7 * i, 70 - 5 * i, 10 * c + i)).save(root / f"c{c}" / f"{i}.JPEG",
                                                                                   quality=95)
    return root


def augmented(root: Path, decode: str, seeds: range, size: int = 24) -> torch.Tensor:
    """Image 0 of ``root`` augmented for training under each sample seed, as uint8 (N, 3, size, size)."""
    dataset = train_imagenet.image_folder(root, True, size, decode)
    batch, _, _ = imagenet_data.collate([dataset[(seed, 0)] for seed in seeds])   # (key, index)
    return batch.images(CPU)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_cpu_and_gpu_paths_take_the_pil_paths_crop_and_flip(photo_tree, decode):
    seeds = range(40)
    reference = augmented(photo_tree, "pil", seeds).float()
    got = augmented(photo_tree, decode, seeds).float()
    diff = (got - reference).abs()
    # The same crop and flip, and on the CPU a resize within one level of PIL's (a wrong flip or crop moves
    # pixels by about 12 levels on average here).
    assert diff.mean(dim=(1, 2, 3)).max() < 0.2, diff.mean(dim=(1, 2, 3))
    assert diff.max() <= 1


RAMP_W, RAMP_H, OUT = 240, 180, 32


@pytest.fixture(scope="module")
def ramp_tree(tmp_path_factory) -> Path:
    """One JPEG whose red channel is the column and green the row: a crop's place shows in its pixels."""
    root = tmp_path_factory.mktemp("ramp")
    (root / "n0").mkdir()
    y, x = np.mgrid[0:RAMP_H, 0:RAMP_W]
    ramp = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    Image.fromarray(ramp).save(root / "n0" / "ramp.JPEG", quality=100, subsampling=0)
    return root


def recovered_boxes(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area fraction, aspect ratio (w / h) and flip of each crop, read back from the ramp's pixels: along a
    row, red rises by w / OUT per output column (falls when flipped); along a column green by h / OUT."""
    inner = slice(2, OUT - 2)                       # the resize filter is clamped at the crop's edges
    steps = np.arange(OUT)[inner]
    red = images[:, 0].float().mean(1).numpy()[:, inner]
    green = images[:, 1].float().mean(2).numpy()[:, inner]
    red_slope = np.polyfit(steps, red.T, 1)[0]
    green_slope = np.polyfit(steps, green.T, 1)[0]
    w, h = np.abs(red_slope) * OUT, green_slope * OUT
    return w * h / (RAMP_W * RAMP_H), w / h, red_slope < 0


DRAWS = 2000


@pytest.fixture(scope="module")
def pil_boxes(ramp_tree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: torchvision's RandomResizedCrop and RandomHorizontalFlip on PIL images (the pil path)."""
    return recovered_boxes(augmented(ramp_tree, "pil", range(DRAWS), OUT))


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_crop_area_aspect_and_flip_follow_torchvisions_random_resized_crop(ramp_tree, pil_boxes, decode):
    draws = DRAWS
    area_ref, ratio_ref, flip_ref = pil_boxes
    area, ratio, flip = recovered_boxes(augmented(ramp_tree, decode, range(draws, 2 * draws), OUT))
    # Other seeds than the reference's: a two-sample test of the distributions, not of the same draws.
    assert ks_2samp(area, area_ref).pvalue > 1e-3
    assert ks_2samp(np.log(ratio), np.log(ratio_ref)).pvalue > 1e-3
    assert 0.05 < area.min() and area.max() < 1.05 and 0.7 < ratio.min() and ratio.max() < 1.4   # scale, ratio
    for flips in (flip, flip_ref):
        assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(draws)       # 50 %, within 4 standard errors


@pytest.mark.parametrize("decode", imagenet_data.DECODE_PATHS)
def test_batches_depend_neither_on_workers_nor_on_resuming_mid_epoch(photo_tree, decode):
    def epoch(workers: int, start: int = 0) -> list[torch.Tensor]:
        batches = train_imagenet.LoaderBatches(train_imagenet.image_folder(photo_tree, True, 24, decode), 2, True,
                                               CPU, 5, 0, 1, workers)
        return [torch.cat([x.flatten(), index.float()]) for x, _, index in batches.epoch(3, start=start)]

    whole = epoch(0)
    assert len(whole) == 4
    assert all(torch.equal(a, b) for a, b in zip(whole, epoch(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], epoch(0, start=2), strict=True))


def test_gpu_path_trains_end_to_end_and_reports_odd_files(odd_tree, tmp_path, capsys):
    cfg = train_imagenet.ImagenetConfig(method="ce", student="resnet18", teacher_weights=None, epochs=1,
                                        batch_size=5, eval_batch_size=5, image_size=32, workers=0, decode="gpu",
                                        data_dir=str(odd_tree), out=str(tmp_path / "run"))
    summary = train_imagenet.run(cfg)
    assert 0 <= summary["top1"] <= 100
    out = capsys.readouterr().out
    assert "train epoch 1: 3 odd file(s) of 5" in out and "validation epoch 1: 3 odd file(s) of 5" in out


def test_decode_auto_is_cpu_here_and_a_bad_value_is_one_line(tmp_path, capsys):
    assert imagenet_data.resolve_decode("auto", CPU) == "cpu"
    assert imagenet_data.resolve_decode("auto", torch.device("cuda")) == "gpu"
    rc = train_imagenet.main(["--decode", "nvjpeg", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "decode must be auto, pil, cpu, gpu, got 'nvjpeg'" in err


def test_benchmark_data_prints_the_table_for_each_path(photo_tree, odd_tree, tmp_path, capsys):
    out = tmp_path / "bench"
    assert train_imagenet.main(["--benchmark-data", str(photo_tree), "--out", str(out), "--set", "image_size=24"]) == 0
    text = capsys.readouterr().out
    assert "| decode | images/s per core | images/s total |" in text
    assert "8 files under" in text and "odd files: none" in text
    result = json.loads((out / "benchmark_data.json").read_text())
    assert [r["decode"] for r in result["results"]] == ["pil", "cpu"]
    assert all(r["images_per_s_per_core"] > 0 for r in result["results"])
    # The gpu path's device share on the CPU device (the seam), and a folder of odd files.
    assert train_imagenet.main(["--benchmark-data", str(odd_tree / "train"), "--decode", "gpu", "--out", str(out),
                                "--set", "image_size=24", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "| gpu |" in text and "odd files: 1 grayscale JPEG, 1 CMYK JPEG, 1 other format or mode" in text
    gpu, = json.loads((out / "benchmark_data.json").read_text())["results"]
    assert gpu["device_images_per_s"] > 0
