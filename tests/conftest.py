"""Shared test fixtures: the real data in ../shared/data (skipped with a reason when absent)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
