"""kernels/bench_kd.py runs on CPU with tiny shapes, prints a Markdown table last and writes JSON."""
import json
import os

import torch

from conftest import load_script

bench_kd = load_script("kernels/bench_kd.py")


def test_bench_runs_on_cpu_with_tiny_shapes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_kd.main(["--device", "cpu", "--shapes", "4x16,2x5", "--iters", "1", "--json", str(out)])
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-1].startswith("| ") and any(line.startswith("| N x K |") for line in text)
    data = json.loads(out.read_text())
    assert data["meta"]["copy_bandwidth_GBps"] > 0
    rows = data["results"]
    variants = {r["variant"] for r in rows}
    assert "eager" in variants
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret:   # the real kernel under the interpreter (correct, not fast)
        assert {"fused", "fused_gif"} <= variants
    for r in rows:
        assert "error" not in r, r
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["floor_fwd_bwd_s"] > 0
        assert r["floor_fwd_bwd_s"] == 2 * r["floor_fwd_s"]
        assert r["fwd_bwd_GBps"] > 0
    assert torch.get_default_dtype() == torch.float32
