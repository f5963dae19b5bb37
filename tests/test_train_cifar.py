"""train_cifar.py end to end on CPU: data, every method, teacher updates, resume, errors, DDP."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torchrun

import engine
import models
import train_cifar
from distillers import STAGED_METHODS, parse_method
from train_cifar import CifarConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(teacher="resnet8", student="resnet8", epochs=1, batch_size=16, limit_batches=2, eval_batch_size=50,
            log_every=1)



def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loads_real_cifar100(cifar_dir):
    data = train_cifar.load_cifar100(cifar_dir)
    images, labels = data["train"]
    assert images.shape == (50000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() == 0 and labels.max() == 99 and torch.bincount(labels).eq(500).all()
    assert data["test"][0].shape == (10000, 3, 32, 32) and torch.bincount(data["test"][1]).eq(100).all()
    mean = images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(train_cifar.CIFAR_MEAN), atol=1e-3)


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(train_cifar.DataNotFound, match=str(tmp_path / "cifar-100-python")):
        train_cifar.load_cifar100(tmp_path)


def test_offline_download_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(train_cifar.DataNotFound, match="could not download CIFAR-100 into .*cifar-100-python/"):
        train_cifar.load_cifar100(tmp_path, download=True)


def test_augmentation_is_a_padded_crop_with_optional_flip(fake_cifar):
    images, labels = train_cifar.load_cifar100(fake_cifar)["train"]
    batches = train_cifar.DeviceBatches(images, labels, 16, torch.device("cpu"), train=True, seed=3)
    mean = torch.tensor(train_cifar.CIFAR_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(train_cifar.CIFAR_STD).view(3, 1, 1) * 255
    x, y, idx = next(batches.epoch(0))
    assert torch.equal(y, labels[idx])
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4)).float()
    for j in range(len(idx)):
        pixels = x[j] * std + mean
        src = padded[idx[j]]
        candidates = [c for dy in range(9) for dx in range(9)
                      for c in (src[:, dy:dy + 32, dx:dx + 32], src[:, dy:dy + 32, dx:dx + 32].flip(2))]
        assert min((pixels - c).abs().max().item() for c in candidates) < 1e-3


def test_epoch_permutation_is_sharded_without_overlap(fake_cifar):
    images, labels = train_cifar.load_cifar100(fake_cifar)["train"]
    seen = []
    for rank in range(2):
        b = train_cifar.DeviceBatches(images, labels, 16, torch.device("cpu"), train=True, seed=0, rank=rank,
                                      world=2)
        seen.append(torch.cat([idx for _, _, idx in b.epoch(5)]))
    both = torch.cat(seen)
    assert len(both) == 160 and len(torch.unique(both)) == 160


def test_unknown_config_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: kd\nlearning_rate: 0.1\n")
    with pytest.raises(engine.ConfigError, match="learning_rate.*valid keys:.*lr"):
        engine.build_config(CifarConfig, str(bad))
    with pytest.raises(engine.ConfigError, match="epochs must be an integer"):
        engine.build_config(CifarConfig, None, ["epochs=ten"])


def test_every_shipped_config_parses():
    files = sorted((ROOT / "configs" / "cifar").rglob("*.yaml"))
    assert len(files) > 40
    folders = set()
    for path in files:
        cfg = engine.build_config(CifarConfig, str(path))
        if cfg.method not in STAGED_METHODS:
            parse_method(cfg.method)
        folders.add(train_cifar.run_folder(cfg))
        if cfg.teacher_ckpt:     # every teacher checkpoint is made by a shipped teacher config
            assert (ROOT / "configs" / "cifar" / "teachers" / f"{cfg.teacher}.yaml").is_file()
    assert len(folders) == len(files)     # no two cells write into the same run folder


def run(tmp_path, data, **keys) -> dict:
    cfg = CifarConfig(**{**TINY, "data_dir": str(data), "out": str(tmp_path / "run"), **keys})
    return train_cifar.run(cfg)


@pytest.mark.parametrize("method", ["ce", "kd", "ftkd", "pesf", "dml", "kdcl"])
def test_every_method_runs_on_real_cifar(method, cifar_dir, teacher_ckpt, tmp_path):
    summary = run(tmp_path, cifar_dir, method=method, teacher_ckpt=str(teacher_ckpt))
    assert 0 <= summary["top1"] <= 100
    out = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    if method != "ce":
        for key in ("teacher_top1", "kl", "gap", "agreement", "pl", "cka_logits", "cka_features"):
            assert summary[key] is not None and np.isfinite(summary[key]), key


def teacher_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=False)["distiller"]["teacher"]


@pytest.mark.parametrize("method,moves", [("kd", False), ("pesf", False), ("ftkd", True), ("dml", True),
                                          ("kdcl", True)])
def test_which_teacher_tensors_change(method, moves, fake_cifar, teacher_ckpt, tmp_path):
    run(tmp_path, fake_cifar, method=method, teacher_ckpt=str(teacher_ckpt))
    before = torch.load(teacher_ckpt)["model"]
    after = teacher_state(tmp_path / "run")
    backbone_changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert bool(backbone_changed) == moves, backbone_changed
    adapters = {k: v for k, v in after.items() if k not in before}
    if method == "pesf":
        assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "up" in k)


def test_pesf_counts_only_adapter_parameters(fake_cifar, teacher_ckpt, tmp_path):
    summary = run(tmp_path, fake_cifar, method="pesf", teacher_ckpt=str(teacher_ckpt))
    student = models.count_trainable(models.build_model("resnet8", 100))
    feature_dim = models.build_model("resnet8", 100).feature_dim
    adapter = feature_dim * 32 + 32 + 32 * feature_dim + feature_dim
    assert summary["updated_params"] == student + adapter


def test_resume_is_bit_identical(fake_cifar, teacher_ckpt, tmp_path):
    keys = dict(method="pesf", teacher_ckpt=str(teacher_ckpt), epochs=2)
    straight = tmp_path / "straight"
    train_cifar.run(CifarConfig(**{**TINY, **keys, "data_dir": str(fake_cifar), "out": str(straight)}))
    split = tmp_path / "split"
    train_cifar.run(CifarConfig(**{**TINY, **keys, "epochs": 1, "data_dir": str(fake_cifar), "out": str(split)}))
    train_cifar.run(CifarConfig(**{**TINY, **keys, "data_dir": str(fake_cifar), "out": str(split)}), resume=True)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(split / "last.pt", weights_only=False)
    for part in ("student", "teacher"):
        for k, v in a["distiller"][part].items():
            assert torch.equal(v, b["distiller"][part][k]), (part, k)
    assert (straight / "metrics.jsonl").read_text().count("\n") == (split / "metrics.jsonl").read_text().count("\n")


def test_resume_refuses_a_changed_config(fake_cifar, teacher_ckpt, tmp_path):
    run(tmp_path, fake_cifar, method="kd", teacher_ckpt=str(teacher_ckpt))
    cfg = CifarConfig(**{**TINY, "method": "kd", "tau": 2.0, "teacher_ckpt": str(teacher_ckpt),
                         "data_dir": str(fake_cifar), "out": str(tmp_path / "run")})
    with pytest.raises(engine.ConfigError, match="tau"):
        train_cifar.run(cfg, resume=True)


def test_missing_and_mismatched_teacher_checkpoints(fake_cifar, tmp_path, capsys):
    base = ["--method", "kd", "--data-dir", str(fake_cifar), "--out", str(tmp_path / "r"), "--epochs", "1"]
    assert train_cifar.main([*base, "--teacher", "resnet8"]) == 2
    assert "needs a trained teacher" in capsys.readouterr().err
    assert train_cifar.main([*base, "--teacher", "resnet8", "--teacher-ckpt", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": models.build_model("resnet14", 100).state_dict()}, wrong)
    assert train_cifar.main([*base, "--teacher", "resnet8", "--teacher-ckpt", str(wrong)]) == 2
    assert "layer1.1" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(fake_cifar, teacher_ckpt, tmp_path, capsys, monkeypatch):
    run(tmp_path, fake_cifar, method="kd", teacher_ckpt=str(teacher_ckpt))
    before = digest(tmp_path / "run" / "last.pt")

    def diverging_lr(optimizer, factor, overwrite=False):   # lr 1e30 in the resumed epoch (a config lr may not change)
        for group in optimizer.param_groups:
            group["lr"] = 1e30
    monkeypatch.setattr(engine, "set_lr", diverging_lr)
    args = ["--method", "kd", "--teacher", "resnet8", "--student", "resnet8", "--teacher-ckpt", str(teacher_ckpt),
            "--data-dir", str(fake_cifar), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "16",
            "--limit-batches", "2", "--set", "eval_batch_size=50", "--set", "log_every=1", "--resume"]
    assert train_cifar.main(args) == 2
    assert f"non-finite loss (loss, kl, ce) in epoch 2 by step 2; the last checkpoint {tmp_path / 'run' / 'last.pt'} " \
           f"is left intact" in capsys.readouterr().err
    assert digest(tmp_path / "run" / "last.pt") == before


def test_benchmark_steps_prints_step_time(tmp_path, capsys):
    args = ["--method", "pesf", "--teacher", "resnet8", "--student", "resnet8", "--benchmark-steps", "2",
            "--batch-size", "8", "--out", str(tmp_path / "bench")]
    assert train_cifar.main(args) == 0
    assert "ms/step" in capsys.readouterr().out


def test_quickstart_cpu_mode_reduced(fake_cifar, tmp_path, capsys):
    args = ["--quickstart", "--data-dir", str(fake_cifar), "--out", str(tmp_path / "qs"), "--limit-batches", "1"]
    assert train_cifar.main(args) == 0
    out = capsys.readouterr().out
    assert "| resnet8 pesf |" in out and "| resnet8 kd |" in out
    headers = [out.index(f"== quickstart run {i}/4: {name}") for i, name in
               enumerate(("teacher (resnet14, ce)", "resnet8 ce", "resnet8 kd", "resnet8 pesf"), 1)]
    assert headers == sorted(headers) and "What to expect: at this CPU size" in out
    assert "(this and 3 more runs)" in out[headers[0]:headers[1]] and "more run" not in out[headers[3]:]
    # It ends with report.py's tables and figures, and says where they are.
    assert f"report: {tmp_path / 'qs' / 'report' / 'tables.md'}" in out.splitlines()[-1]
    assert "| pesf |" in (tmp_path / "qs" / "report" / "tables.md").read_text()
    assert (tmp_path / "qs" / "report" / "fig3_sharpness_gap_cifar100_resnet14_resnet8.png").is_file()
    # No per-run wall time in its table: the students' step times come from one side-by-side benchmark.
    assert "| run | top-1 | teacher top-1 | gap | KL | agreement |" in out and "batch ms" not in out
    bench = json.loads((tmp_path / "qs" / "benchmark" / "benchmark_side_by_side.json").read_text())
    assert [r["run"] for r in bench["rows"]] == ["resnet8 ce", "resnet8 kd", "resnet8 pesf"]
    assert bench["reference"] == "resnet8 kd" and bench["rows"][0]["steps"] == 20
    # It evaluates every epoch: one point per epoch in the curves.
    metrics = [json.loads(line) for line in (tmp_path / "qs" / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "top1" in m] == [1, 2, 3, 4]


def test_ddp_two_processes_match_one(fake_cifar, teacher_ckpt, tmp_path):
    """Same global batch: the ranks agree exactly, and the update matches one process's."""
    common = ["train_cifar.py", "--method", "pesf", "--teacher", "resnet8", "--student", "resnet8",
              "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar), "--epochs", "1",
              "--batch-size", "64", "--limit-batches", "2", "--device", "cpu", "--set", "lr=0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    torchrun([*common, "--out", str(tmp_path / "two")])
    torch.manual_seed(0)   # the script seeds with --seed 0 before building the student
    init = models.build_model("resnet8", 100).state_dict()
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["model"]
    num, den = 0.0, 0.0
    for k, v in init.items():
        if v.is_floating_point() and "running" not in k:
            d1, d2 = one[k] - v, two[k] - v
            num += (d1 - d2).pow(2).sum().item()
            den += d1.pow(2).sum().item()
    # BatchNorm sees per-rank halves of the batch, so the match is close but not exact.
    assert den > 0 and (num / den) ** 0.5 < 0.2
    # outputs.pt gathers both ranks' shards of the test set, each row once.
    assert torch.equal(torch.load(tmp_path / "two" / "outputs.pt", weights_only=True)["index"], torch.arange(100))
