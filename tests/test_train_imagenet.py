"""train_imagenet.py on a tiny ImageFolder tree of real JPEG files the test writes."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagenet_data
import models
import train_imagenet
from train_imagenet import ImagenetConfig

CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.pt"
    torch.save({"model": models.build_model("resnet18", len(CLASSES)).state_dict()}, path)
    return path


def tiny(tmp_path, data, **keys) -> ImagenetConfig:
    return ImagenetConfig(**{"teacher": "resnet18", "student": "resnet18", "teacher_weights": None, "epochs": 1,
                             "batch_size": 4, "eval_batch_size": 3, "limit_batches": 2, "image_size": 32,
                             "workers": 0, "log_every": 1, "data_dir": str(data), "out": str(tmp_path / "run"),
                             **keys})


def test_validation_batches_are_the_resized_centre_crop(image_tree):
    dataset = train_imagenet.image_folder(image_tree / "val", False, 32, "pil")
    batches = train_imagenet.LoaderBatches(dataset, 2, False, torch.device("cpu"), 0, 0, 1, 0)
    x, y, index = next(batches.epoch(0))
    mean = torch.tensor(imagenet_data.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(imagenet_data.IMAGENET_STD).view(3, 1, 1) * 255
    for j in range(len(index)):
        path, label = dataset.dataset.samples[int(index[j])]
        assert int(y[j]) == label
        image = Image.open(path).convert("RGB")
        w, h = image.size            # shorter side to 36 (= 32 * 8 // 7), then the central 32 x 32
        size = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
        image = image.resize(size, Image.BILINEAR)
        left, top = round((size[0] - 32) / 2), round((size[1] - 32) / 2)
        crop = np.asarray(image.crop((left, top, left + 32, top + 32)), dtype=np.float32).transpose(2, 0, 1)
        restored = (x[j] * std + mean).numpy()
        assert np.abs(restored - crop).max() < 1e-3


@pytest.mark.parametrize("method", ["kd", "pesf", "dml"])
def test_methods_run_end_to_end(method, image_tree, teacher_ckpt, tmp_path):
    summary = train_imagenet.run(tiny(tmp_path, image_tree, method=method, teacher_ckpt=str(teacher_ckpt)))
    assert summary["num_classes"] == 3 and 0 <= summary["top1"] <= 100
    assert np.isfinite(summary["kl"]) and np.isfinite(summary["cka_features"])
    assert {"last.pt", "summary.json", "metrics.jsonl"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_feature_method_runs_its_init_stage_first(image_tree, teacher_ckpt, tmp_path, capsys):
    summary = train_imagenet.run(tiny(tmp_path, image_tree, method="fsp", init_epochs=1,
                                      teacher_ckpt=str(teacher_ckpt)))
    out = capsys.readouterr().out
    assert "init stage (FSP) epoch 1/1" in out and out.index("init stage") < out.index("epoch 1 |")
    assert 0 <= summary["top1"] <= 100


def test_clear_errors(image_tree, tmp_path, capsys):
    base = ["--teacher", "resnet18", "--student", "resnet18", "--out", str(tmp_path / "r"), "--workers", "0",
            "--batch-size", "4"]
    assert train_imagenet.main([*base, "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "ImageFolder tree" in capsys.readouterr().err
    assert train_imagenet.main([*base, "--data-dir", str(image_tree)]) == 2
    assert "are for 1000 classes" in capsys.readouterr().err


def test_benchmark_needs_no_data(tmp_path, capsys):
    args = ["--method", "pesf", "--teacher", "resnet18", "--student", "resnet18", "--benchmark-steps", "1",
            "--batch-size", "2", "--set", "image_size=32", "--set", "teacher_weights=null", "--out",
            str(tmp_path / "bench")]
    assert train_imagenet.main(args) == 0
    assert "ms/step" in capsys.readouterr().out


def test_shipped_configs_parse_and_name_known_methods():
    import engine
    from distillers import parse_method
    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "imagenet").glob("*.yaml"))
    assert len(files) >= 9
    for path in files:
        parse_method(engine.build_config(ImagenetConfig, str(path)).method)


def test_per_sample_seeding_leaves_the_cuda_generators_alone(image_tree, monkeypatch):
    """workers=0 augments in the main process: seeding a sample must not reseed the training step's CUDA RNG."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    dataset = train_imagenet.image_folder(image_tree / "train", True, 32)
    torch.manual_seed(5)
    reseeded.clear()
    state = torch.get_rng_state()
    first, again, other = (dataset[item][0].pixels for item in ((7, 2), (7, 2), (8, 2)))
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), state)          # the CPU generator is restored too
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_channels_last_batches_hold_the_same_values(image_tree):
    dataset = train_imagenet.image_folder(image_tree / "val", False, 32)
    plain, last = (next(train_imagenet.LoaderBatches(dataset, 3, False, torch.device("cpu"), 0, 0, 1, 0,
                                                      channels_last=cl).epoch(0))[0] for cl in (False, True))
    assert last.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(
        memory_format=torch.channels_last)
    assert last.dtype == torch.float32 and torch.equal(last, plain)


def test_a_cuda_graph_is_refused_under_ddp_and_off_cuda(image_tree, tmp_path, capsys):
    import engine
    engine.check_cuda_graph(True, engine.Dist(device=torch.device("cuda")))          # one GPU process: allowed
    engine.check_cuda_graph(False, engine.Dist(world=2, device=torch.device("cuda")))
    with pytest.raises(engine.ConfigError, match="cuda_graph needs one process on a CUDA device"):
        engine.check_cuda_graph(True, engine.Dist(world=2, device=torch.device("cuda")))
    args = ["--teacher", "resnet18", "--student", "resnet18", "--out", str(tmp_path / "r"), "--workers", "0",
            "--data-dir", str(image_tree), "--device", "cpu", "--set", "cuda_graph=true"]
    assert train_imagenet.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cuda_graph needs one process on a CUDA device" in err[0]
