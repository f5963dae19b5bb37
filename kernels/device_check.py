"""One call on a GPU machine: is the fused kernel right there, how fast is it, and does a training step
meet the CIFAR targets. Prints one Markdown report last and writes it, with a log and JSON, under --out.

    python3 kernels/device_check.py --out "$OUT" --budget 540      # an H100/H200 session, one device call

Each step runs in its own process, with a time limit cut to what is left of ``--budget`` seconds, so a
slow or hung step costs its own result and never the report:
1. ``tests/test_triton_kernel.py`` with the kernel compiled for the GPU (no interpreter), against the
   float64 reference;
2. ``kernels/bench_kd.py --quick`` (the issue-3 small-shape targets);
   then ``kernels/bench_lm.py``: ``kd_core.distill_linear`` against naive torch, Liger and orda-kernel
   at 8192 tokens x 4096 hidden, vocabularies 128,256 and 32,000, bf16 (issue 24);
3. ``train_cifar.py --benchmark-steps`` for kd, pesf and dml (resnet56 -> resnet20, batch 64), eager and
   with the whole step in a CUDA graph (issue 5: pesf <= 3.5 ms, pesf/kd <= 1.10, dml/kd about 2.3);
4. ``train_cifar.py --benchmark-steps --seeds`` for pesf: aggregate images/s of 1, 2, 4 and 8 runs at once in
   one process (issue 10: 8 runs >= 3x one graphed run);
5. ``kernels/bench_kd.py`` on the large shapes, with the time that is left.
On a CPU (``--device cpu``) the same steps run small: that is how CI checks this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("kd", "pesf", "dml")
STEPS_PER_EPOCH = 50_000 // 64   # CIFAR-100 at batch 64, the paper's protocol


class Budget:
    """What is left of ``--budget`` seconds. ``inf`` (the CPU test, a long manual run) cuts no step short,
    so that a result never depends on how loaded the machine is."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def step_limit(self, cap: float) -> float | None:
        """A step's time limit: its ``cap`` cut to what is left less 10 s for the report; ``None`` when under
        15 s would be left (skip the step); ``inf`` when the budget is unlimited (no cap either)."""
        if math.isinf(self.deadline):
            return math.inf
        limit = min(cap, self.left() - 10)
        return None if limit < 15 else limit


def run_logged(cmd: list[str], cap: float, budget: Budget, log: Path, env: dict | None = None) -> str:
    """Run ``cmd`` from the repository root, output appended to ``log``; returns ``ok``, ``rc N``,
    ``timeout`` or ``skipped`` (too little time left)."""
    limit = budget.step_limit(cap)
    if limit is None:
        return "skipped"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
        f.flush()
        started = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=None if math.isinf(limit) else limit).returncode
        except subprocess.TimeoutExpired:
            rc = None
        f.write(f"# {time.monotonic() - started:.1f} s\n")
    return "ok" if rc == 0 else ("timeout" if rc is None else f"rc {rc}")


def pytest_summary(log: Path) -> str:
    """pytest's closing line (``3 passed in 1.2s``) from the log, or the log's last line."""
    lines = [ln.strip(" =") for ln in log.read_text().splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.search(r"\d+ (passed|failed|errors?|skipped)\b", ln)]
    return (hits or lines or ["(no output)"])[-1]


def bench_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no result)"]
    data = json.loads(path.read_text())
    rows: dict[tuple, dict] = {}
    for r in data["results"]:
        rows.setdefault((r["N"], r["K"], r["dtype"]), {})[r["variant"]] = r
    variants = [v for v in ("eager", "compile", "fused", "fused_gif", "liger") if any(v in x for x in rows.values())]
    out = [f"device {data['meta']['device']}, copy bandwidth {data['meta']['copy_bandwidth_GBps']:.0f} GB/s; "
           "fwd+bwd ms (x the copy floor)", "",
           "| N x K | dtype | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for (n, k, dt), by in rows.items():
        cells = []
        for v in variants:
            r = by.get(v)
            cells.append("–" if r is None else r.get("error", f"{r['fwd_bwd_s'] * 1e3:.3f} ({r['x_floor']:.1f}x)"))
        out.append(f"| {n} x {k} | {dt} | " + " | ".join(cells) + " |")
    return out


def step_times(args, budget: Budget, log: Path, graphs: list[bool]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for graph in graphs:
            for method in METHODS:
                out = Path(tmp) / f"{method}_{graph}"
                status = run_logged([sys.executable, "train_cifar.py", "--method", method, "--teacher", args.teacher,
                                     "--student", args.student, "--benchmark-steps", str(args.steps), "--device",
                                     args.device, "--out", str(out), "--set", f"cuda_graph={str(graph).lower()}"],
                                    120, budget, log)
                row = {"method": method, "cuda_graph": graph, "status": status}
                if status == "ok":
                    row.update(json.loads((out / "benchmark.json").read_text()))
                results.append(row)
    return results


def steps_table(rows: list[dict]) -> list[str]:
    ms = {(r["method"], r["cuda_graph"]): r.get("step_ms") for r in rows}
    out = ["| method | cuda graph | step ms | images/s | / kd |", "|---|---|---|---|---|"]
    for r in rows:
        kd = ms.get(("kd", r["cuda_graph"]))
        if r["status"] != "ok":
            out.append(f"| {r['method']} | {r['cuda_graph']} | {r['status']} | | |")
            continue
        ratio = f"{r['step_ms'] / kd:.2f}" if kd else "–"
        out.append(f"| {r['method']} | {r['cuda_graph']} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | {ratio} |")
    best = {m: min((v for (mm, _), v in ms.items() if mm == m and v), default=None) for m in METHODS}
    if best["pesf"] and best["kd"]:
        minutes = 240 * STEPS_PER_EPOCH * best["pesf"] / 60_000
        out += ["", f"targets (issue 5, fastest mode): pesf step {best['pesf']:.2f} ms (<= 3.5), "
                f"pesf/kd {best['pesf'] / best['kd']:.2f} (<= 1.10)"
                + (f", dml/kd {best['dml'] / best['kd']:.2f} (about 2.3)" if best["dml"] else "")
                + f"; 240 epochs of pesf steps alone: {minutes:.1f} min (an estimate: no evaluation, no data)"]
    return out


def concurrency(args, budget: Budget, log: Path, cuda: bool) -> tuple[str, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        seeds = ",".join(map(str, range(8 if cuda else 2)))
        status = run_logged([sys.executable, "train_cifar.py", "--method", "pesf", "--teacher", args.teacher,
                             "--student", args.student, "--benchmark-steps", str(args.steps), "--device", args.device,
                             "--out", tmp, "--seeds", seeds] + ([] if cuda else ["--concurrent", "2"]),
                            150, budget, log)
        path = Path(tmp) / "concurrent" / "benchmark_concurrent.json"
        return status, json.loads(path.read_text()) if status == "ok" else []


def concurrency_table(rows: list[dict]) -> list[str]:
    out = ["| runs at once | aggregate images/s | vs. 1 run |", "|---|---|---|"]
    out += [f"| {r['runs']} | {r['images_per_s']:.0f} | {r['speedup']:.2f}x |" for r in rows]
    if rows:
        best = max(rows, key=lambda r: r["images_per_s"])
        hours = 18 * 240 * 50_000 / best["images_per_s"] / 3600
        out += ["", f"target (issue 10): 8 runs >= 3x one run; measured {best['speedup']:.2f}x at {best['runs']} "
                f"runs; Table 1's 18 student runs of one pair (6 rows x 3 seeds, 240 epochs) at that rate: "
                f"{hours:.2f} GPU-hours of training steps (an estimate: no evaluation, no teacher)"]
    return out


def lm_bench(budget: Budget, log: Path, env: dict, out: Path, cuda: bool) -> tuple[str, list[str]]:
    """kd_core.distill_linear against naive torch, Liger's and orda-kernel's Triton paths at the LM shapes
    (8192 tokens x 4096 hidden, vocabularies 128,256 and 32,000, bf16); a tiny shape on CPU."""
    table = out / "bench_lm.md"
    shapes = [] if cuda else ["--shapes", "64x16x500", "--reps", "1"]
    status = run_logged([sys.executable, "kernels/bench_lm.py", "--device", "cuda" if cuda else "cpu", *shapes,
                         "--json", str(out / "bench_lm.json"), "--markdown", str(table)], 150, budget, log, env)
    return status, (table.read_text().splitlines() if table.is_file() else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything (inf: no step is cut short)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--steps", type=int, default=200, help="timed training steps per method")
    ap.add_argument("--test-filter", default=None, help="pytest -k for the kernel tests (CPU smoke runs)")
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "device_check.log"
    cuda = args.device == "cuda"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["TRITON_INTERPRET"] = "1"     # the kernel on CPU runs only under the interpreter
    py = sys.executable

    info = subprocess.run([py, "-c", "import torch, triton; print(torch.cuda.get_device_name() if "
                           f"{cuda} else 'cpu', torch.__version__, triton.__version__, sep=', ')"],
                          capture_output=True, text=True, cwd=ROOT)
    card = info.stdout.strip() or (info.stderr.strip().splitlines() or ["device unknown"])[-1]

    tests = [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_triton_kernel.py"]
    tests += ["-k", args.test_filter] if args.test_filter else []
    test_status = run_logged(tests, 240, budget, log, env)
    test_line = pytest_summary(log) if test_status != "skipped" else "(skipped)"
    if test_status == "ok" and not re.search(r"[1-9]\d* passed", test_line):
        test_status = "no test ran"   # every test skipped (triton missing, say) is no evidence

    bench = [py, "kernels/bench_kd.py", "--device", args.device]
    quick_status = run_logged(bench + ["--quick", "--json", str(out / "bench_quick.json")]
                              + ([] if cuda else ["--shapes", "4x16,64x100", "--iters", "1"]), 150, budget, log, env)
    lm_status, lm_table = lm_bench(budget, log, env, out, cuda)
    steps = step_times(args, budget, log, [False, True] if cuda else [False])
    (out / "steps.json").write_text(json.dumps(steps, indent=1))
    concurrent_status, concurrent = concurrency(args, budget, log, cuda)
    (out / "concurrent.json").write_text(json.dumps(concurrent, indent=1))
    full_status = run_logged(bench + ["--json", str(out / "bench_full.json")], 300, budget, log, env) \
        if cuda else "skipped (CPU)"

    report = [f"# Device check, {time.strftime('%Y-%m-%d')}: {card}", "",
              f"## Kernel tests, {'compiled for the GPU' if cuda else 'Triton interpreter'}: {test_status}", "",
              f"    {test_line}", "",
              f"## Fused kernel, small shapes: {quick_status}", "", *bench_table(out / "bench_quick.json"), "",
              f"## distill_linear at language-model scale: {lm_status}", "", *lm_table, "",
              f"## Training step, {args.teacher} -> {args.student}, batch 64", "", *steps_table(steps), "",
              f"## Concurrent pesf runs in one process, batch 64 each: {concurrent_status}", "",
              *concurrency_table(concurrent), "",
              f"## Fused kernel, large shapes: {full_status}", "", *bench_table(out / "bench_full.json")]
    text = "\n".join(report) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    return 0 if test_status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
