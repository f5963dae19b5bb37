"""kd_core.py is portable: copied alone into an empty folder, it works in a fresh process with only torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import importlib.util
    import sys

    # Triton is "not installed": find_spec gives None and `import triton` raises ModuleNotFoundError.
    sys.modules["triton"] = None
    assert importlib.util.find_spec("triton") is None

    import torch
    import kd_core

    assert kd_core.__file__.startswith(sys.argv[1]), kd_core.__file__
    assert not kd_core.triton_available()
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100])
    out = kd_core.distill_terms(s, t, y, tau=4.0)
    (0.9 * out.kl_ts + 0.1 * out.ce_s + out.kl_st + 0.5 * out.ce_t).backward()
    assert s.grad.isfinite().all() and t.grad.isfinite().all() and s.grad.abs().sum() > 0
    meter = kd_core.ConsistencyMeter()
    meter.update(s, t, s.detach() @ torch.randn(10, 4), t.detach())
    result = meter.compute()
    assert set(result) == {"kl", "gap", "agreement", "pl", "cka_logits", "cka_features"}, result
    assert sys.modules["triton"] is None
    print("ok", result["kl"])
""")


def test_kd_core_alone_with_only_torch(tmp_path: Path) -> None:
    shutil.copy(ROOT / "kd_core.py", tmp_path / "kd_core.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd_core.py"]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout
