"""--seeds: one command, one run folder per seed, each run bit-identical to the same run started alone."""
import torch

import train_cifar

TINY = ["--teacher", "resnet8", "--student", "resnet8", "--epochs", "1", "--batch-size", "16", "--limit-batches", "2",
        "--set", "eval_batch_size=50"]


def student(folder) -> dict:
    return torch.load(folder / "last.pt", weights_only=False)["distiller"]["student"]


def test_seeds_runs_each_seed_as_if_alone(fake_cifar, teacher_ckpt, tmp_path, capsys):
    common = [*TINY, "--method", "pesf", "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar)]
    assert train_cifar.main([*common, "--out", str(tmp_path / "multi"), "--seeds", "3,4"]) == 0
    table = capsys.readouterr().out
    assert "| pesf | 2 |" in table and "+-" in table
    assert train_cifar.main([*common, "--out", str(tmp_path / "alone"), "--seed", "4"]) == 0
    multi3, multi4, alone4 = student(tmp_path / "multi_s3"), student(tmp_path / "multi_s4"), student(tmp_path / "alone")
    for k, v in alone4.items():
        assert torch.equal(v, multi4[k]), k
    assert any(not torch.equal(v, multi3[k]) for k, v in alone4.items() if v.is_floating_point())


def test_seeds_with_sweep_and_bad_seeds(fake_cifar, teacher_ckpt, tmp_path, capsys):
    common = [*TINY, "--method", "kd", "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar),
              "--out", str(tmp_path / "sw")]
    assert train_cifar.main([*common, "--sweep", "tau=2", "--seeds", "0,1"]) == 0
    assert sorted(p.name for p in (tmp_path / "sw" / "sweep").iterdir()) == ["tau=2_s0", "tau=2_s1"]
    assert (tmp_path / "sw" / "sweep" / "tau=2_s1" / "config.yaml").read_text().count("seed: 1\n") == 1
    assert "| tau=2 | 2 |" in capsys.readouterr().out
    assert train_cifar.main([*common, "--seeds", "0,zero"]) == 2
    assert "--seeds expects integers" in capsys.readouterr().err


def test_seeds_use_the_folder_each_seed_would_use_alone(fake_cifar, tmp_path):
    common = [*TINY, "--method", "ce", "--student", "resnet8", "--data-dir", str(fake_cifar)]
    assert train_cifar.main([*common, "--out", str(tmp_path / "x_s{seed}"), "--seeds", "1,2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_s1", "x_s2"]
