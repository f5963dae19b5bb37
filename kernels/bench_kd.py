"""Benchmark of the PESF two-way distillation loss: fused Triton kernel vs eager torch vs torch.compile
vs Liger-Kernel's KL composite (issue 3 item 5, SPEC sec. 6).

The loss timed is the one PESF-KD trains with (SPEC sec. 2): both KL directions with label-adjusted,
detached targets, both CE terms, and the gap, gradients to student and teacher logits:

    L = 0.9 kl_ts + 0.9 kl_st + 0.1 ce_s + 0.5 ce_t   (+ gap, logged)

Variants: ``eager`` (kd_core torch path), ``compile`` (torch.compile of the same function),
``fused`` (distill_terms with the Triton kernel, forward + autograd backward), ``fused_gif``
(distill_loss, gradient-in-forward mode), ``liger`` (label adjustment in torch + Liger's KL and CE
kernels, when ``liger_kernel`` imports). Each is timed forward only and forward + backward (median).
The copy bandwidth is measured in the same run; the floor is the traffic a fused kernel cannot avoid
(forward: read s, t; forward + backward: read s, t and write ds, dt) at that bandwidth.

    python kernels/bench_kd.py                      # GPU: the issue's shapes, fp32 and bf16
    python kernels/bench_kd.py --quick --json out.json       # no torch.compile variant: its compile is slow
    python kernels/bench_kd.py --tune --winners kernels/kd_launch_winners.json   # launch configurations (GPU)
On a machine without CUDA it runs small shapes on CPU (``--quick`` is implied); the fused variants
then need TRITON_INTERPRET=1 (the interpreter: correct, not fast) and are skipped otherwise.
The Markdown table is printed last; ``--json`` is rewritten after every measured row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kd_core  # noqa: E402

GPU_SHAPES = [(64, 100), (256, 1000), (2048, 1000), (8192, 32768), (4096, 131072), (16384, 131072)]
QUICK_GPU_SHAPES = [(64, 100), (256, 1000), (2048, 1000), (8192, 32768)]
# --tune: the shapes whose launch configuration is chosen by measurement (the large-K ones are probably
# latency-bound; 64x100 is the CIFAR training step's) and where the winners go.
TUNE_SHAPES = [(64, 100), (256, 1000), (8192, 32768), (4096, 131072)]
TUNE_DTYPES = ["fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_SHAPES = [(8, 16), (64, 100)]
TAU = 4.0
WEIGHTS = {"kl_ts": 0.9, "kl_st": 0.9, "ce_s": 0.1, "ce_t": 0.5}


def pesf_loss(s, t, y, backend):
    terms = kd_core.distill_terms(s, t, y, TAU, adjust=True, detach_targets=True, backend=backend)
    return sum(w * getattr(terms, f) for f, w in WEIGHTS.items())


def _liger_variant():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = LigerCrossEntropyLoss()

    def loss(s, t, y):
        # Liger's composite: torch label adjustment and log_softmax, Liger KL (input = learner
        # log-probs, target = target log-probs) and Liger CE; fp32 math like the SPEC.
        s32, t32 = s.float(), t.float()
        adj_t = kd_core.label_adjust(t32, y).detach()
        adj_s = kd_core.label_adjust(s32, y).detach()
        ls, lt = torch.log_softmax(s32 / TAU, 1), torch.log_softmax(t32 / TAU, 1)
        kl_ts = kl(ls, torch.log_softmax(adj_t / TAU, 1)) * TAU * TAU
        kl_st = kl(lt, torch.log_softmax(adj_s / TAU, 1)) * TAU * TAU
        return 0.9 * kl_ts + 0.9 * kl_st + 0.1 * ce(s32, y) + 0.5 * ce(t32, y)
    return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes, iters):
    """GB/s of a device-to-device copy (read + write counted)."""
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sec = _time(lambda: dst.copy_(src), device, iters, 2)
    del src, dst
    return 2 * n * 4 / sec / 1e9


def bench_one(name, fn, s0, t0, y, device, iters, warmup):
    """Median seconds of forward and forward+backward, and peak memory above the inputs."""
    s = s0.detach().clone().requires_grad_()
    t = t0.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fn(s, t, y)

    def fwd_bwd():
        s.grad = t.grad = None
        loss = fn(s, t, y)
        loss.backward()

    out = {}
    try:
        out["fwd_s"] = _time(fwd, device, iters, warmup)
        out["fwd_bwd_s"] = _time(fwd_bwd, device, iters, warmup)
        if device.type == "cuda":
            s.grad = t.grad = None
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd()
            _sync(device)
            out["peak_mem_above_inputs_bytes"] = torch.cuda.max_memory_allocated(device) - base
        else:
            out["peak_mem_above_inputs_bytes"] = None
    except torch.OutOfMemoryError:
        out["error"] = "OOM"
    except Exception as exc:  # a variant failing must not hide the others
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    s.grad = t.grad = None
    del s, t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def tune_candidates(n: int, k: int, dtype: torch.dtype, n_sm: int, tau: float = TAU) -> list[dict]:
    """The launch configurations ``--tune`` times for one shape, as ``kd_core._KD_TUNE`` overrides: the
    heuristic default first, then twice the warps (more threads per program: fewer registers per thread, and
    more loads in flight where one program per SM is latency-bound; fewer warps spilled the 16-bit
    gradient-in-forward tile), half the tile width, split-K switched (off when the heuristic splits, on
    with 2 splits when K has room for it), the forward's K loops software-pipelined in 2 stages (the next
    tile's loads in flight during this one's math; not for fp32 gradient-in-forward tiles of 2048 elements,
    which then spill 8 B on sm_80), and at tau = 4 the cheaper exponent (exp(x - m) as exp((x - m) / 4) ** 4).
    kernels/aot_check.py --candidates compiles every one of them for sm_90 and sm_80 (no spill allowed)."""
    saved_sm = kd_core._sm_count
    kd_core._sm_count = lambda device: n_sm
    try:
        cfg = kd_core._kd_config(n, k, torch.empty((), dtype=dtype).element_size(), torch.device("meta"))
    finally:
        kd_core._sm_count = saved_sm
    out = [{}, {"num_warps": 2 * cfg["num_warps"]}]
    if cfg["block_k"] >= 256:
        out.append({"block_k": cfg["block_k"] // 2, "bwd_block_k": max(128, cfg["bwd_block_k"] // 2)})
    if cfg["splits"] > 1:
        out.append({"splits": 1})
    elif k >= 4 * cfg["block_k"]:
        out.append({"splits": 2})
    if dtype != torch.float32 or cfg["gif_rows"] * cfg["gif_block_k"] < 2048:
        out.append({"num_stages": 2})
    if tau == 4:
        out.append({"pow4_exp": True})
    return out


class RowWriter:
    """Writes the JSON after every measured row (atomically), so that a step cut short keeps its rows."""

    def __init__(self, path: str | None, meta: dict) -> None:
        self.path, self.doc = (Path(path) if path else None), {"meta": meta, "results": []}

    def add(self, row: dict) -> None:
        self.doc["results"].append(row)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1))
            tmp.replace(self.path)


def tune(shapes, dt_names, device, iters, warmup, writer: RowWriter, winners_path: str | None) -> list[dict]:
    """Time every candidate launch configuration of the training path (distill_terms forward + backward,
    and distill_loss beside it) per shape and dtype; the fastest forward + backward wins. Writes the winners
    for ``kd_core`` to read (``kd_core._launch_winner``): the card's name, the versions, one entry per shape."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    kd_core._launch_winner = lambda *args: {}   # candidates vary the heuristics, never an earlier winners file
    winners = []
    for (n, k) in shapes:
        for dn in dt_names:
            s0, t0, y = _inputs(n, k, DTYPES[dn], device)
            timed = []
            for cand in tune_candidates(n, k, DTYPES[dn], n_sm):
                kd_core._KD_TUNE.clear()
                kd_core._KD_TUNE.update(cand)
                for name, fn in (("fused", lambda s, t, y: pesf_loss(s, t, y, "triton")), ("fused_gif", _gif)):
                    r = bench_one(name, fn, s0, t0, y, device, iters, warmup)
                    writer.add({"N": n, "K": k, "dtype": dn, "variant": name, "tune": cand, **r})
                    if name == "fused" and "fwd_bwd_s" in r:
                        timed.append((r["fwd_bwd_s"], cand))
            kd_core._KD_TUNE.clear()
            if timed:
                best_s, best = min(timed, key=lambda x: x[0])
                winners.append({"N": n, "K": k, "dtype": dn, "tune": best, "fwd_bwd_s": best_s,
                                "default_fwd_bwd_s": timed[0][0] if timed[0][1] == {} else None})
                print(f"{n}x{k} {dn}: winner {best or 'default'} {best_s * 1e3:.3f} ms", flush=True)
    if winners_path:
        Path(winners_path).write_text(json.dumps({"device": torch.cuda.get_device_name(device),
                                                  "torch": torch.__version__, "triton": _triton_version(),
                                                  "date": time.strftime("%Y-%m-%d"), "winners": winners}, indent=1))
    return winners


def _triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _inputs(n, k, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    t0 = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    return s0, t0, torch.randint(0, k, (n,), generator=g).to(device)


def _gif(s, t, y):
    return kd_core.distill_loss(s, t, y, TAU, WEIGHTS, adjust=True, detach_targets=True, backend="triton")[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few iterations")
    ap.add_argument("--shapes", default=None, help="e.g. 64x100,256x1000 (overrides the defaults)")
    ap.add_argument("--dtypes", default=None, help="comma list among fp32,bf16,fp16")
    ap.add_argument("--variants", default="eager,compile,fused,fused_gif,liger")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tune", action="store_true",
                    help="GPU: time the candidate launch configurations (tune_candidates) instead of the variants")
    ap.add_argument("--winners", default=None, help="--tune: write the winning configurations here "
                    "(kd_core reads kernels/kd_launch_winners.json, or $PESF_KD_WINNERS, when present)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    quick = args.quick or not on_gpu
    if args.shapes:
        shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
    else:
        shapes = (QUICK_GPU_SHAPES if quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    if args.tune:
        shapes = [tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")] if args.shapes else TUNE_SHAPES
    dt_names = (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")
    iters = args.iters or (5 if quick else 20)
    warmup = 1 if not on_gpu else 3
    # --quick leaves out torch.compile: its compile alone takes longer than the rest of the quick table
    variants = [v for v in args.variants.split(",") if not (quick and v == "compile")]
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    fused_ok = kd_core.triton_available() and (on_gpu or interpret)

    fns = {"eager": lambda s, t, y: pesf_loss(s, t, y, "torch")}
    if "compile" in variants:
        if on_gpu or os.environ.get("BENCH_CPU_COMPILE") == "1":
            fns["compile"] = torch.compile(lambda s, t, y: pesf_loss(s, t, y, "torch"))
    if fused_ok:
        fns["fused"] = lambda s, t, y: pesf_loss(s, t, y, "triton")
        fns["fused_gif"] = _gif
    liger = _liger_variant() if "liger" in variants and on_gpu else None
    if liger is not None:
        fns["liger"] = liger
    fns = {k: v for k, v in fns.items() if k in variants}
    skipped = [v for v in variants if v not in fns]

    largest = max(n * k for n, k in shapes) * 4
    bw = copy_bandwidth(device, min(max(largest, 1 << 24), 1 << 30), max(3, iters))
    meta = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "torch": torch.__version__, "triton_interpret": interpret, "copy_bandwidth_GBps": bw,
            "date": time.strftime("%Y-%m-%d"), "skipped_variants": skipped, "iters": iters,
            "loss": "0.9 kl_ts + 0.9 kl_st + 0.1 ce_s + 0.5 ce_t, label-adjusted detached targets, tau 4"}
    writer = RowWriter(args.json, meta)
    if args.tune:
        if not (on_gpu and fused_ok):
            raise SystemExit("bench_kd.py --tune: needs a CUDA device and triton")
        return tune(shapes, dt_names, device, iters, warmup, writer, args.winners)
    results = writer.doc["results"]
    for (n, k) in shapes:
        for dn in dt_names:
            s0, t0, y = _inputs(n, k, DTYPES[dn], device)
            elem = s0.element_size()
            floor_fwd = 2 * n * k * elem / (bw * 1e9)
            floor_fb = 4 * n * k * elem / (bw * 1e9)
            for name, fn in fns.items():
                r = bench_one(name, fn, s0, t0, y, device, iters, warmup)
                row = {"N": n, "K": k, "dtype": dn, "variant": name, "floor_fwd_s": floor_fwd,
                       "floor_fwd_bwd_s": floor_fb, **r}
                if "fwd_bwd_s" in r:
                    row["fwd_bwd_GBps"] = 4 * n * k * elem / r["fwd_bwd_s"] / 1e9
                    row["fwd_GBps"] = 2 * n * k * elem / r["fwd_s"] / 1e9
                    row["x_floor"] = r["fwd_bwd_s"] / floor_fb
                writer.add(row)
                print(f"{n}x{k} {dn} {name}: " + (r.get("error") or
                      f"fwd {r['fwd_s'] * 1e3:.3f} ms, fwd+bwd {r['fwd_bwd_s'] * 1e3:.3f} ms"), flush=True)
            del s0, t0
    print()
    print(f"device: {meta['device']}; copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}"
          + ("; Triton INTERPRETER (not a performance number)" if interpret and not on_gpu else "")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    print()
    print("| N x K | dtype | variant | fwd ms | fwd+bwd ms | floor ms (fwd+bwd) | x floor | GB/s (fwd+bwd) | peak mem above inputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['N']} x {r['K']} | {r['dtype']} | {r['variant']} | {r['error']} | | "
                  f"{r['floor_fwd_bwd_s'] * 1e3:.3f} | | | |")
            continue
        mem = r["peak_mem_above_inputs_bytes"]
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.1f} MiB"
        print(f"| {r['N']} x {r['K']} | {r['dtype']} | {r['variant']} | {r['fwd_s'] * 1e3:.3f} | "
              f"{r['fwd_bwd_s'] * 1e3:.3f} | {r['floor_fwd_bwd_s'] * 1e3:.4f} | {r['x_floor']:.1f} | "
              f"{r['fwd_bwd_GBps']:.1f} | {mem_s} |")
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
