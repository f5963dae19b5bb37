"""Token-level KD at language-model scale: kd_core.distill_linear against naive torch and the
fused-linear peers, forward + backward, time and peak memory above the inputs, side by side.

The loss is plain KD, tau^2 KL(t || s) at tau = 1, averaged over the tokens whose label is not -100
(about 10 % are), gradients into the student's hidden states and LM head; the teacher is frozen.

    naive     logits = h W^T materialised, log_softmax, KL, autograd
    liger     Liger-Kernel's chunked LigerFusedLinearJSDLoss, beta 0 (forward KL), chunk 1024
              (compiled=False on CPU); on a GPU its Triton LigerFusedLinearJSD, jsd_beta 0
    orda      orda-kernel's distillation_loss, SeparateTeacher, kl_weight 1, student CE weight 0
              (backend "torch" on CPU, "triton" on a GPU)
    kd_core   kd_core.distill_linear(..., tau=1.0) with its default memory budget

The peers are benchmark-only packages (requirements-test.txt); a variant whose package does not
import is reported as skipped. Every variant runs in this one process, interleaved repetition by
repetition, so a change of the machine's load hits all of them alike. CPU memory is the peak
resident set (VmHWM, reset through /proc/self/clear_refs before each run) minus the resident set
just before; GPU memory is torch.cuda.max_memory_allocated minus the allocation before.

    OMP_NUM_THREADS=1 python kernels/bench_lm.py                       # the issue's CPU table
    OMP_NUM_THREADS=1 python kernels/bench_lm.py --scaling 512,1024,2048,4096 --variants naive,kd_core
    python kernels/bench_lm.py --device cuda --shapes 8192x4096x128256,8192x4096x32000 --dtype bf16
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kd_core  # noqa: E402

CPU_SHAPES = [(2048, 256, 32000), (1024, 256, 128000)]
GPU_SHAPES = [(8192, 4096, 128256), (8192, 4096, 32000)]
VARIANTS = ("naive", "liger", "orda", "kd_core")


def naive(hs, ws, ht, wt, y):
    s, t = hs @ ws.T, (ht @ wt.T).detach()
    keep = (y != -100).float()
    log_p, log_q = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    per_row = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (per_row * keep).sum() / keep.sum().clamp(min=1)


def _liger(on_gpu: bool):
    if on_gpu:
        from liger_kernel.transformers import LigerFusedLinearJSD
        loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        return lambda hs, ws, ht, wt, y: loss(hs, ws, ht, wt, y)
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                   compiled=False, chunk_size=1024)
    return lambda hs, ws, ht, wt, y: loss(hs, ws, ht, wt, y)


def _orda(on_gpu: bool):
    from orda_kernel import SeparateTeacher, distillation_loss
    backend = "triton" if on_gpu else "torch"
    return lambda hs, ws, ht, wt, y: distillation_loss(
        hs, ws, y, SeparateTeacher(ht, wt), student_ce_weight=0.0, kl_weight=1.0, kl_temperature=1.0,
        backend=backend).loss


def variants(names: list[str], on_gpu: bool) -> tuple[dict, dict]:
    """The callables that import here, and why the others do not."""
    makers = {"naive": lambda: naive, "liger": lambda: _liger(on_gpu), "orda": lambda: _orda(on_gpu),
              "kd_core": lambda: lambda hs, ws, ht, wt, y: kd_core.distill_linear(hs, ws, ht, wt, y, tau=1.0)}
    fns, skipped = {}, {}
    for name in names:
        try:
            fns[name] = makers[name]()
        except Exception as exc:   # a peer not installed is a skipped column, not a failed benchmark
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return fns, skipped


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for package in ("liger-kernel", "orda-kernel", "torch", "triton"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    # glibc keeps freed heap pages resident: without this, a variant would reuse the pages of the
    # one before it and its peak would read as zero.
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_once(fn, inputs: dict, device: torch.device) -> dict:
    """One forward + backward: seconds, peak bytes above the inputs, loss, the student weight's gradient."""
    hs = inputs["hs"].detach().requires_grad_()
    ws = inputs["ws"].detach().requires_grad_()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _release_freed_memory()
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current resident set
        base = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    loss = fn(hs, ws, inputs["ht"], inputs["wt"], inputs["y"])
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    return {"s": seconds, "peak_bytes": peak, "loss": float(loss.detach()), "grad_ws": ws.grad, "grad_hs": hs.grad}


def make_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    return {"hs": torch.randn(n, hidden, generator=g).to(device, dtype),
            "ws": (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype),
            "ht": torch.randn(n, hidden, generator=g).to(device, dtype),
            "wt": (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype),
            "y": y.to(device)}


def bench_shape(shape, fns: dict, reps: int, dtype, device) -> list[dict]:
    n, hidden, vocab = shape
    inputs = make_inputs(n, hidden, vocab, dtype, device)
    runs = {name: [] for name in fns}
    reference = None
    for _ in range(reps):
        for name, fn in fns.items():     # interleaved: every repetition runs every variant once
            try:
                out = run_once(fn, inputs, device)
            except torch.OutOfMemoryError:
                out = {"error": "OOM"}
            if reference is None and "grad_ws" in out:
                reference = out
            runs[name].append(out)
            print(f"{n}x{hidden}x{vocab} {name}: " + (out.get("error") or
                  f"{out['s']:.2f} s, {out['peak_bytes'] / 2**20:.0f} MiB, loss {out['loss']:.6f}"), flush=True)
    rows = []
    for name, outs in runs.items():
        ok = [o for o in outs if "error" not in o]
        if not ok:
            rows.append({"N": n, "H": hidden, "V": vocab, "variant": name, "error": outs[0]["error"]})
            continue
        grad = ok[0]["grad_ws"].float()
        ref_grad = reference["grad_ws"].float()
        rows.append({"N": n, "H": hidden, "V": vocab, "variant": name,
                     "median_s": statistics.median(o["s"] for o in ok),
                     "peak_mib": statistics.median(o["peak_bytes"] for o in ok) / 2 ** 20,
                     "loss": ok[0]["loss"],
                     "grad_ws_rel_diff_vs_first": float((grad - ref_grad).abs().max() / ref_grad.abs().max())})
    del inputs, runs, reference
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| N x H x V | variant | median s | peak MiB above inputs | × naive memory | × naive time | loss |",
             "|---|---|---|---|---|---|---|"]
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["N"], r["H"], r["V"]), []).append(r)
    for (n, h, v), group in by_shape.items():
        base = next((r for r in group if r["variant"] == "naive" and "error" not in r), None)
        for r in group:
            if "error" in r:
                lines.append(f"| {n} x {h} x {v} | {r['variant']} | {r['error']} | | | | |")
                continue
            mem_x = f"{r['peak_mib'] / base['peak_mib']:.3f}" if base else ""
            time_x = f"{r['median_s'] / base['median_s']:.2f}" if base else ""
            lines.append(f"| {n} x {h} x {v} | {r['variant']} | {r['median_s']:.2f} | {r['peak_mib']:.0f} | "
                         f"{mem_x} | {time_x} | {r['loss']:.6f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=None, help="NxHxV,... (default: the issue's shapes for the device)")
    ap.add_argument("--scaling", default=None, help="N,N,... at H 256, V 32000: peak memory against N")
    ap.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (GPU default)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if on_gpu else "fp32")]
    if args.scaling:
        shapes = [(int(n), 256, 32000) for n in args.scaling.split(",")]
    elif args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    fns, skipped = variants(args.variants.split(","), on_gpu)
    meta = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "threads": torch.get_num_threads(),
            "dtype": str(dtype), "versions": peer_versions(), "skipped": skipped, "reps": args.reps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(meta), flush=True)
    rows = [row for shape in shapes for row in bench_shape(shape, fns, args.reps, dtype, device)]
    result = {"meta": meta, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print()
    print(table(rows))
    if args.markdown:
        Path(args.markdown).write_text(table(rows) + "\n")
    return result


if __name__ == "__main__":
    main()
