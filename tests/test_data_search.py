"""One data search for every script ($PESF_DATA, ./data, shared/data beside the checkout) and benchmarks that
never download: a plain clone beside shared/ runs, and without it every command says in one line what is
missing and how to get it."""
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import engine
import train_glue
import train_imagenet

ROOT = Path(__file__).resolve().parents[1]


def clone_beside(tmp_path: Path, fake_cifar: Path | None) -> Path:
    """A copy of the checkout's code in ``tmp_path/clone``; with ``fake_cifar``, ``tmp_path/shared/data`` beside
    it holds that CIFAR-100 folder (as the project's machines hold the real one)."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", "runs", "tests", "__pycache__", "*.md"))
    if fake_cifar is not None:
        shutil.copytree(fake_cifar / "cifar-100-python", tmp_path / "shared" / "data" / "cifar-100-python")
    return clone


def run_script(clone: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PESF_")}
    env["OMP_NUM_THREADS"] = "1"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(clone / "train_cifar.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


SMALL = ["--method", "ce", "--student", "resnet8", "--epochs", "1", "--limit-batches", "1", "--batch-size", "8",
         "--set", "eval_batch_size=50"]


def test_a_clone_beside_shared_data_finds_cifar_there(fake_cifar, tmp_path):
    clone = clone_beside(tmp_path, fake_cifar)
    proc = run_script(clone, tmp_path / "work", *SMALL, "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_without_data_the_error_lists_every_place_and_the_download_flag(tmp_path):
    clone = clone_beside(tmp_path, None)
    proc = run_script(clone, tmp_path / "work", *SMALL, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: CIFAR-100 not found: looked for cifar-100-python/train and cifar-100-python/test")
    assert f" in ./data, {tmp_path / 'shared' / 'data'};" in line and "--download" in line


def test_places_are_searched_in_order_and_a_given_folder_alone(fake_cifar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PESF_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("PESF_GLUE", str(tmp_path / "glue_env"))
    shared = ROOT.parent / "shared" / "data"
    assert engine.data_places("") == [tmp_path / "env", Path("data"), shared]
    assert engine.data_places("glue", "PESF_GLUE") == [tmp_path / "glue_env", tmp_path / "env" / "glue",
                                                        Path("data/glue"), shared / "glue"]
    required = ["cifar-100-python/train"]
    shutil.copytree(fake_cifar, tmp_path / "data")                  # ./data holds it, $PESF_DATA does not
    assert engine.find_data(None, engine.data_places(""), required, "x", "") == Path("data")
    shutil.copytree(fake_cifar, tmp_path / "env")                   # now $PESF_DATA does too: it comes first
    assert engine.find_data(None, engine.data_places(""), required, "x", "") == tmp_path / "env"
    with pytest.raises(engine.DataNotFound, match=f"looked for cifar-100-python/train in {tmp_path / 'mine'}; get"):
        engine.find_data(str(tmp_path / "mine"), engine.data_places(""), required, "CIFAR-100", "get it")
    # --download with no place holding the data: the first place, to download into.
    assert engine.find_data(None, [tmp_path / "a", tmp_path / "b"], required, "x", "", download=True) == tmp_path / "a"


def test_glue_searches_the_same_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PESF_GLUE", raising=False)
    monkeypatch.setenv("PESF_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(engine, "SHARED_DATA", tmp_path / "shared")
    task = train_glue.TASKS["rte"]
    with pytest.raises(train_glue.DataNotFound) as err:
        train_glue.load_glue(None, task)
    message = str(err.value)
    assert "\n" not in message and f"in {tmp_path / 'env' / 'glue'}, ./data/glue, {tmp_path / 'shared' / 'glue'};" in message
    assert "gluebenchmark.com" in message and "PESF_GLUE" in message
    folder = tmp_path / "env" / "glue" / "RTE"
    folder.mkdir(parents=True)
    rows = "index\tsentence1\tsentence2\tlabel\n0\ta b\tc\tentailment\n1\td\te f\tnot_entailment\n"
    (folder / "train.tsv").write_text(rows)
    (folder / "dev.tsv").write_text(rows)
    assert train_glue.load_glue(None, task)["dev"].labels.tolist() == [0, 1]


def test_imagenet_not_found_names_every_place_and_says_it_cannot_be_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PESF_IMAGENET", raising=False)
    monkeypatch.delenv("PESF_DATA", raising=False)
    monkeypatch.setattr(engine, "SHARED_DATA", tmp_path / "shared")
    args = ["--teacher", "resnet18", "--student", "resnet18", "--set", "teacher_weights=null", "--workers", "0",
            "--out", str(tmp_path / "run")]
    assert train_imagenet.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"looked for train and val in ./data/imagenet, {tmp_path / 'shared' / 'imagenet'};" in line
    assert "cannot be downloaded" in line


def offline(*args, **kwargs):
    raise urllib.error.URLError("Name or service not known")


def test_imagenet_benchmark_never_downloads_and_names_its_fields(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)   # any download attempt fails the run
    args = ["--method", "pesf", "--teacher", "resnet18", "--student", "resnet18", "--benchmark-steps", "1",
            "--batch-size", "2", "--set", "image_size=32", "--out", str(tmp_path / "bench")]   # IMAGENET1K_V1
    assert train_imagenet.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if "randomly initialised teacher" in line]
    assert len(notes) == 1 and "IMAGENET1K_V1 not in " in notes[0]
    assert not (tmp_path / "torch_home").exists()
    (line,) = [line for line in out if line.startswith("benchmark pesf:")]
    for field in ("batch 2,", "amp none,", "cuda_graph False,", "device cpu,", "processes 1,", "1 timed steps:",
                  "ms/step,", "samples/s,", "M updated params"):
        assert field in line, (field, line)


def test_an_offline_teacher_download_is_one_line_and_leaves_no_empty_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(engine.ConfigError, match="could not download torchvision weights 'IMAGENET1K_V1'"):
        train_imagenet.download_teacher("resnet18", "IMAGENET1K_V1", 1000, {})
    assert not (tmp_path / "torch_home" / "hub").exists()
