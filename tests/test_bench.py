"""kernels/bench_kd.py runs on CPU with tiny shapes, prints a Markdown table last and writes JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_script

bench_kd = load_script("kernels/bench_kd.py")
ROOT = Path(__file__).resolve().parents[1]


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


def test_each_row_is_written_when_measured_and_quick_leaves_out_torch_compile(tmp_path, monkeypatch):
    """A benchmark cut short (the device check's time limit) keeps the rows measured so far."""
    monkeypatch.setenv("BENCH_CPU_COMPILE", "1")   # would add the compile variant, but --quick must not
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    out = tmp_path / "bench.json"
    calls = []
    measure = bench_kd.bench_one

    def killed_at_the_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt   # as a timeout's kill would end it
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench_kd, "bench_one", killed_at_the_third)
    try:
        bench_kd.main(["--device", "cpu", "--quick", "--shapes", "4x16,2x5", "--iters", "1", "--json", str(out),
                       "--variants", "eager,compile"])
    except KeyboardInterrupt:
        pass
    rows = json.loads(out.read_text())["results"]
    assert [(r["N"], r["variant"]) for r in rows] == [(4, "eager"), (2, "eager")] and calls[:2] == ["eager"] * 2


def test_tune_candidates_start_with_the_heuristic_and_vary_warps_tile_and_split():
    import kd_core
    big = bench_kd.tune_candidates(4096, 131072, torch.bfloat16, 132)
    assert big[0] == {} and {"num_warps": 16} in big and {"splits": 2} in big
    assert any("block_k" in c for c in big)
    split = bench_kd.tune_candidates(1, 262144, torch.float32, 132)   # the heuristic splits K here
    assert {"splits": 1} in split
    # software pipelining and, at tau = 4 only, the cheaper exponent
    assert {"num_stages": 2} in big and {"pow4_exp": True} in big
    assert {"pow4_exp": True} not in bench_kd.tune_candidates(4096, 131072, torch.bfloat16, 132, tau=2.0)
    # ... but no pipelining of the fp32 gradient-in-forward tile of 2048 elements (spills on sm_80)
    assert {"num_stages": 2} not in bench_kd.tune_candidates(8192, 32768, torch.float32, 108)
    assert {"num_stages": 2} in bench_kd.tune_candidates(256, 1000, torch.float32, 108)
    assert kd_core._KD_TUNE == {}


def test_aot_check_compiles_every_tune_candidate():
    """kernels/aot_check.py --candidates (no spill allowed) covers exactly what bench_kd.py --tune may time. In a
    subprocess: aot_check turns the interpreter off before triton imports."""
    import itertools
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    listing = "import json, aot_check; print(json.dumps([(t.name, u) for t, u, _ in aot_check.candidate_jobs()]))"
    proc = subprocess.run([sys.executable, "-c", listing], cwd=ROOT / "kernels", env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    targets = {"sm_90": 132, "sm_80": 108}
    want = {(name, f"{n}x{k} {path} {tune or 'default'}")
            for (name, n_sm), (n, k), dn in itertools.product(targets.items(), bench_kd.TUNE_SHAPES,
                                                                bench_kd.TUNE_DTYPES)
            for tune in bench_kd.tune_candidates(n, k, bench_kd.DTYPES[dn], n_sm)
            for path in ("fwd", "bwd", "gif")}
    assert {tuple(x) for x in json.loads(proc.stdout)} == want


def test_kd_core_takes_the_winners_measured_on_the_same_card(tmp_path, monkeypatch):
    """The winners file of bench_kd.py --tune sets the launch configuration on a card of the same name only;
    explicit _KD_TUNE overrides still win. A CUDA device is faked: only its name and SM count are read."""
    import kd_core
    path = tmp_path / "winners.json"
    path.write_text(json.dumps({"device": "Card A", "winners": [
        {"N": 64, "K": 100, "dtype": "bf16", "tune": {"num_warps": 8}},
        {"N": 8192, "K": 32768, "dtype": "bf16", "tune": {"splits": 2}},
        {"N": 64, "K": 100, "dtype": "fp32", "tune": {"block_k": 64}}]}))
    monkeypatch.setenv("PESF_KD_WINNERS", str(path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # read at call time: the GPU heuristics apply
    monkeypatch.setattr(kd_core, "_sm_count", lambda device: 132)
    card = {"name": "Card A"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: card["name"])
    cuda = torch.device("cuda", 0)

    def config(n, k, elem):
        monkeypatch.setattr(kd_core, "_WINNERS", {})
        return kd_core._kd_config(n, k, elem, cuda)

    heuristic = kd_core._kd_config(96, 100, 2, torch.device("meta"))
    assert heuristic["num_warps"] == 4
    assert config(96, 100, 2)["num_warps"] == 8            # nearest N with the same K bucket and width
    assert config(96, 100, 4)["block_k"] == 64 and config(96, 100, 4)["num_warps"] == 4
    assert config(4096, 32000, 2)["splits"] == 2
    assert config(96, 1000, 2) == kd_core._kd_config(96, 1000, 2, torch.device("meta"))   # no entry: heuristics
    monkeypatch.setattr(kd_core, "_KD_TUNE", {"num_warps": 2})
    assert config(96, 100, 2)["num_warps"] == 2             # an explicit override beats the file
    monkeypatch.setattr(kd_core, "_KD_TUNE", {})
    card["name"] = "Card B"
    assert config(96, 100, 2) == heuristic                  # another card: the file is not used
