"""Shared test fixtures: the real data in ../shared/data (skipped with a reason when absent)."""
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def load_script(relative_path: str):
    """Import a script of the repository (``kernels/bench_kd.py``) by its path. ``kernels/`` is no package
    (no ``__init__.py``), so that it never shadows the installed ``kernels`` package transformers imports."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on the shared 2-core machine two threads spin against each other
    and make small layers many times slower (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED_DATA = Path(os.environ.get("PESF_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PESF_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture
def cifar_dir(shared_data) -> Path:
    path = shared_data / "cifar-100-python"
    if not (path / "train").is_file():
        pytest.skip(f"CIFAR-100 pickles not found under {path}")
    return shared_data


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    """A CIFAR-100 folder in the standard python-pickle format, small and random."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 100)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": [0] * n,
                 "filenames": [f"{i}.png" for i in range(n)], "batch_label": split}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised resnet8 'teacher' checkpoint in the {"model": state_dict} layout."""
    import models
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": models.build_model("resnet8", 100).state_dict()}, path)
    return path


def torchrun(args: list[str], nproc: int = 2, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone`` (it picks a free port itself) on CPU; on failure show the ranks' stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}" \
                                 f"\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


class Pair(torch.nn.Module):
    """The student and teacher attributes ``engine.evaluate`` reads from a distiller."""

    def __init__(self, s, t):
        super().__init__()
        self.student, self.teacher = s, t


class RowBatches:
    """``epoch(e)`` yields ``(x, y, index)`` batches whose inputs are the row indices of ``y``."""

    def __init__(self, y, size):
        self.y, self.size = y, size

    def epoch(self, epoch):
        for i in range(0, len(self.y), self.size):
            x = torch.arange(i, min(i + self.size, len(self.y)))
            yield x, self.y[x], x
