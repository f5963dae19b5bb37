"""Ahead-of-time compile check of the kd_core kernels for GPU targets, on a machine without a GPU.

The launches are not listed by hand: the real launchers (``kd_core._launch_fwd`` / ``_launch_bwd``)
run on ``meta`` tensors with the kernels replaced by recorders and the SM count faked, so every
configuration they would choose on an H100 (sm_90, 132 SMs) or an A100 (sm_80, 108 SMs) is captured,
specialised by Triton's own argument binder exactly as a real launch would be, and compiled with
``triton.compile`` and the ``ptxas`` inside the triton wheel. Fails (exit 1) on a compile error,
more than 255 registers, any spill, or shared memory over the target's per-block limit.

    python kernels/aot_check.py            # the CI subset (tests/test_aot_compile.py runs it)
    python kernels/aot_check.py --full     # every shape, dtype, path and variant on both targets
    python kernels/aot_check.py --candidates   # every launch configuration bench_kd.py --tune may time
    python kernels/aot_check.py --plan     # the device check's compiles per step (JSON; compiles nothing)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import itertools
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The Triton interpreter (set for the whole CI pytest run) must be off before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kd_core  # noqa: E402


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    n_sm: int          # SMs of the card the launch heuristics plan for
    max_shared: int    # bytes of shared memory one block may use (opt-in maximum)


TARGETS = (Target("sm_90", 90, 132, 232448), Target("sm_80", 80, 108, 166912))
# The last two: distill_linear's chunks of bf16 tokens at its default GPU memory budget (1 GiB) for
# Llama-3's 128,256 and a 32,000 vocabulary.
SHAPES = ((64, 100), (256, 1000), (8192, 32768), (4096, 131072), (1, 262144), (697, 128256), (2796, 32000))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_REGISTERS = 255
# (path, adjust, detach, need_ds, need_dt): the forward of distill_terms, its backward and the
# gradient-in-forward forward of distill_loss (and its split-K backward), each with every adjust x
# detach combination writing both gradients, plus one-sided gradients (a frozen teacher, a trained
# teacher with a fixed student). The reduction never reaches a kernel: it only scales the weights.
VARIANTS = ([("fwd", adjust, False, False, False) for adjust in (True, False)]
            + [(path, adjust, detach, True, True) for path in ("bwd", "gif") for adjust in (True, False)
               for detach in (True, False)]
            + [(path, True, True, ds, dt) for path in ("bwd", "gif") for ds, dt in ((True, False), (False, True))]
            + [("rescale", False, False, True, False)])
# CI: the launches that spilled or sat at 254-255 registers before the fixes (the full set found the
# 256x1000 fp16 one with detached targets), plus every kernel and path at least once (split-K
# forward + merge + its backward, the large-K backward, fp32 and 16-bit).
CI_CASES = (
    ("sm_90", (64, 100), torch.float32, ("bwd", True, False, True, True)),
    ("sm_90", (64, 100), torch.bfloat16, ("bwd", True, False, True, True)),
    ("sm_90", (8192, 32768), torch.bfloat16, ("gif", True, False, True, True)),
    ("sm_90", (1, 262144), torch.float16, ("gif", True, True, True, False)),
    ("sm_90", (256, 1000), torch.float16, ("gif", True, True, True, True)),
    ("sm_80", (8192, 32768), torch.float32, ("gif", True, False, True, True)),
    ("sm_80", (8192, 32768), torch.bfloat16, ("gif", True, False, True, True)),
    ("sm_90", (697, 128256), torch.bfloat16, ("gif", False, True, True, True)),   # distill_linear, PESF
    ("sm_90", (2796, 32000), torch.bfloat16, ("gif", False, True, True, False)),  # distill_linear, plain KD
    ("sm_90", (8192, 32768), torch.bfloat16, ("rescale", False, False, True, False)),
    ("sm_80", (64, 100), torch.float32, ("rescale", False, False, True, False)),
)


@dataclass
class Launch:
    kernel: str
    fn: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, fn, calls: list[Launch]) -> None:
        self.name, self.fn, self.calls = name, fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(Launch(self.name, self.fn, args, kwargs))


@contextlib.contextmanager
def _recording(n_sm: int):
    kernels = kd_core._triton_kernels()
    if kernels is None:
        raise RuntimeError("triton is not importable; the AOT check needs it")
    calls: list[Launch] = []
    saved = kd_core._TRITON, kd_core._sm_count
    kd_core._TRITON = {**kernels, **{k: _Recorder(k, kernels[k], calls) for k in ("fwd", "merge", "bwd", "rescale")}}
    kd_core._sm_count = lambda device: n_sm
    try:
        yield calls
    finally:
        kd_core._TRITON, kd_core._sm_count = saved


def record_launches(n: int, k: int, dtype: torch.dtype, n_sm: int, variant: tuple,
                    tune: dict | None = None) -> list[Launch]:
    """The kernel launches the real launchers make for one call on contiguous inputs, on meta tensors."""
    meta = {"device": "meta"}
    s, t = torch.empty(n, k, dtype=dtype, **meta), torch.empty(n, k, dtype=dtype, **meta)
    return record_call(s, t, torch.empty(n, dtype=torch.int64, **meta), n_sm, variant, tune)


def record_call(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, n_sm: int, variant: tuple,
                tune: dict | None = None) -> list[Launch]:
    """The kernel launches for one call on these ``meta`` tensors (any strides and storage offsets: a meta
    view's data pointer is its byte offset, so Triton's alignment specialisation sees what a real one would),
    with ``kd_core._KD_TUNE`` set to ``tune``."""
    path, adjust, detach, need_ds, need_dt = variant
    n = s.shape[0]
    saved_tune = dict(kd_core._KD_TUNE)
    kd_core._KD_TUNE.clear()
    kd_core._KD_TUNE.update(tune or {})
    try:
        with _recording(n_sm) as calls:
            if path == "fwd":
                kd_core._launch_fwd(s, t, labels, 4.0, adjust, kd_core.IGNORE_INDEX)
            elif path == "rescale":   # distill_loss's backward scaling its gradient buffers on the device
                kd_core._launch_rescale(s, torch.empty((), device="meta"), torch.empty((), device="meta"))
            elif path == "bwd":
                stats = torch.empty(kd_core._N_STATS, n, device="meta")
                grad_rows = torch.empty(7, n, device="meta")
                kd_core._launch_bwd(grad_rows, s, t, labels, stats, 4.0, adjust, kd_core.IGNORE_INDEX, detach,
                                    need_ds, need_dt)
            else:
                weights = torch.empty(7, device="meta")
                kd_core._launch_fwd(s, t, labels, 4.0, adjust, kd_core.IGNORE_INDEX,
                                    grad=(weights, detach, need_ds, need_dt))
    finally:
        kd_core._KD_TUNE.clear()
        kd_core._KD_TUNE.update(saved_tune)
    return calls


@dataclass
class Compiled:
    kernel: str
    config: str
    dtype: str
    target: str
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    exponentials: int = -1   # ex2 instructions in the PTX (pow4_exp saves one per element)
    error: str = ""
    seconds: float = 0.0
    used_by: list[str] = field(default_factory=list)

    def problems(self, target: Target) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if self.shared > target.max_shared:
            out.append(f"shared memory {self.shared} B > {target.max_shared} B")
        return out


_FLAGS = ("ADJUST", "DETACH", "SPLIT", "GRAD", "WRITE_DS", "WRITE_DT", "OFF64", "POW4")


def _describe(launch: Launch, options) -> str:
    kw = launch.kwargs
    shape = f"{kw['ROWS']}x{kw['BLOCK_K']}" if "BLOCK_K" in kw else f"{kw.get('ROWS', kw.get('BLOCK'))}"
    flags = [f.lower() for f in _FLAGS if kw.get(f)]
    stages = [f"stages{kw['NUM_STAGES']}"] if kw.get("NUM_STAGES") is not None else []
    return " ".join([shape, f"w{options.num_warps}", *stages, *flags])


class AotCompiler:
    """Compiles launches for GPU targets; identical specialisations compile once (shared by all cases)."""

    def __init__(self) -> None:
        from triton import knobs
        self._knobs = knobs
        self.results: dict[tuple, Compiled] = {}
        self._binders: dict[tuple, object] = {}
        # A private cache directory: every compile runs ptxas, whose -v log gives the register figures.
        self._cache = tempfile.TemporaryDirectory(prefix="pesf_aot_")
        knobs.cache.dir = self._cache.name

    def _bind(self, launch: Launch, target: Target):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        key = (launch.kernel, target.name)
        if key not in self._binders:
            backend = make_backend(GPUTarget("cuda", target.capability, 32))
            self._binders[key] = backend, create_function_from_signature(launch.fn.signature, launch.fn.params,
                                                                         backend)
        backend, binder = self._binders[key]
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        return launch.fn._pack_args(backend, launch.kwargs, bound, specialization, options)

    def key(self, launch: Launch, target: Target) -> tuple:
        """What Triton compiles once: the kernel and its specialisation (dtypes, constants, alignment, options)."""
        options, signature, constexprs, attrs = self._bind(launch, target)
        return (launch.kernel, target.name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))

    def compile(self, launch: Launch, target: Target, used_by: str) -> Compiled:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        options, signature, constexprs, attrs = self._bind(launch, target)
        key = self.key(launch, target)
        if key in self.results:
            self.results[key].used_by.append(used_by)
            return self.results[key]
        dtype = next(v for name, v in signature.items() if name.endswith("_ptr")).lstrip("*")
        result = Compiled(launch.kernel, _describe(launch, options), dtype, target.name, used_by=[used_by])
        log = io.StringIO()
        start = time.perf_counter()
        self._knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                        target=GPUTarget("cuda", target.capability, 32), options=options.__dict__)
            result.shared = int(kernel.metadata.shared)
            result.exponentials = kernel.asm["ptx"].count("ex2.approx")
            _parse_ptxas(log.getvalue(), result)
        except Exception as exc:  # any compile failure is a finding, reported in the table
            result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        result.seconds = time.perf_counter() - start
        self.results[key] = result
        return result


def _parse_ptxas(log: str, result: Compiled) -> None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no register figures in the ptxas log: {log[-300:]!r}")
    result.registers = int(regs.group(1))
    result.spill_stores, result.spill_loads = int(spills.group(1)), int(spills.group(2))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# The training default (label adjustment, targets not detached, both gradients) of every path.
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v[1:] in ((True, False, False, False), (True, False, True, True)))


def cases(full: bool, variants: tuple = VARIANTS) -> list[tuple[Target, tuple[int, int], torch.dtype, tuple]]:
    targets = {t.name: t for t in TARGETS}
    if not full:
        return [(targets[name], shape, dtype, variant) for name, shape, dtype, variant in CI_CASES]
    return [(target, shape, dtype, variant)
            for target, shape, dtype, variant in itertools.product(TARGETS, SHAPES, DTYPES, variants)]


def _load(relative: str):
    """A script of this repository by path (kernels/ and tests/ are not packages)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What the benchmark times per shape: distill_terms (forward, backward) and distill_loss, as PESF trains them.
BENCH_VARIANTS = (("fwd", True, False, False, False), ("bwd", True, True, True, True), ("gif", True, True, True, True))


def candidate_jobs() -> list[tuple[Target, str, list[Launch]]]:
    """Every launch configuration ``bench_kd.py --tune`` may time (its ``tune_candidates``), on both targets."""
    bench = _load("kernels/bench_kd.py")
    jobs = []
    for target, (n, k), dn in itertools.product(TARGETS, bench.TUNE_SHAPES, bench.TUNE_DTYPES):
        for tune in bench.tune_candidates(n, k, bench.DTYPES[dn], target.n_sm):
            for variant in BENCH_VARIANTS:
                jobs.append((target, f"{n}x{k} {variant[0]} {tune or 'default'}",
                             record_launches(n, k, bench.DTYPES[dn], target.n_sm, variant, tune)))
    return jobs


def run(full: bool, variants: tuple = VARIANTS, progress=print,
        jobs: list[tuple[Target, str, list[Launch]]] | None = None) -> tuple[list[Compiled], list[str]]:
    """Compile every launch of the chosen cases (or of ``jobs``); returns the distinct compiles and the failures."""
    if jobs is None:
        jobs = [(target, f"{n}x{k} {variant[0]}", record_launches(n, k, dtype, target.n_sm, variant))
                for target, (n, k), dtype, variant in cases(full, variants)]
    compiler = AotCompiler()
    failures = []
    for i, (target, used_by, launches) in enumerate(jobs):
        for launch in launches:
            before = len(compiler.results)
            result = compiler.compile(launch, target, used_by)
            if len(compiler.results) > before:
                progress(f"[{i + 1}/{len(jobs)}] {result.target} {result.kernel} {result.config} {result.dtype}: "
                         f"{result.registers} regs, spills {result.spill_stores}/{result.spill_loads} B, "
                         f"{result.seconds:.1f} s {result.error}")
                failures += [f"{result.target} {result.kernel} {result.config} {result.dtype}: {p}"
                             for p in result.problems(target)]
    return list(compiler.results.values()), failures


# ----------------------------------------------------------------------------------------------
# The device check's compile plan: the kernels each of its steps makes Triton compile for an H100
# ----------------------------------------------------------------------------------------------
def _kernel_test_launches(n_sm: int) -> list[Launch]:
    """The random parity cases of the GPU case set (tests/kernel_cases.py), forward and backward, with the
    layouts the tests give the kernel (``.to("cuda")`` densifies a strided view; so does ``.to("meta")``)."""
    kernel_cases = _load("tests/kernel_cases.py")
    launches = []
    for seed in kernel_cases.gpu_case_seeds():
        c = kernel_cases.make_case(seed)
        s, t, y = c["s"].to("meta"), c["t"].to("meta"), c["y"].to("meta")
        for variant in (("fwd", c["adjust"], False, False, False), ("bwd", c["adjust"], c["detach"], True, True)):
            launches += record_call(s, t, y, n_sm, variant, c["config"])
    return launches


def _bench_launches(shapes, dtype_names, n_sm: int, tuned: bool = False) -> list[Launch]:
    bench = _load("kernels/bench_kd.py")
    launches = []
    for (n, k), dn in itertools.product(shapes, dtype_names):
        for tune in (bench.tune_candidates(n, k, bench.DTYPES[dn], n_sm) if tuned else [{}]):
            for variant in BENCH_VARIANTS:
                launches += record_launches(n, k, bench.DTYPES[dn], n_sm, variant, tune)
    return launches


def device_check_plan(target: Target = TARGETS[0]) -> dict[str, int]:
    """Distinct compiles each step of kernels/device_check.py needs on ``target``, in step order; a kernel an
    earlier step compiled is in Triton's cache and not counted again. The training steps (kd, pesf, dml at
    64 x 100, bf16 under autocast) are planned as every forward and backward variant at that shape."""
    bench = _load("kernels/bench_kd.py")
    train = [launch for variant in VARIANTS if variant[0] != "gif"
             for launch in record_launches(64, 100, torch.bfloat16, target.n_sm, variant)]
    steps = {"kernel_tests": _kernel_test_launches(target.n_sm),
             "bench_quick": _bench_launches(bench.QUICK_GPU_SHAPES, ["fp32", "bf16"], target.n_sm),
             "train_steps": train,
             "bench_tune": _bench_launches(bench.TUNE_SHAPES, bench.TUNE_DTYPES, target.n_sm, tuned=True),
             "bench_full": _bench_launches(bench.GPU_SHAPES, ["fp32", "bf16"], target.n_sm)}
    compiler = AotCompiler()
    seen: set = set()
    plan = {}
    for name, launches in steps.items():
        keys = {compiler.key(launch, target) for launch in launches} - seen
        plan[name] = len(keys)
        seen |= keys
    return plan


def table(results: list[Compiled]) -> str:
    lines = ["| kernel | config | dtype | target | registers | spill st/ld (B) | shared (B) | used by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.target, r.kernel, r.dtype, r.config)):
        used = sorted(set(r.used_by))
        spills = "error" if r.error else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"| {r.kernel} | {r.config} | {r.dtype} | {r.target} | {r.registers} | {spills} | {r.shared} "
                     f"| {', '.join(used[:3])}{' …' if len(used) > 3 else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every shape x dtype x path x variant on sm_90 and sm_80 (minutes), not the CI subset")
    parser.add_argument("--default-variants", action="store_true",
                        help="with --full: only the training default of each path (adjust, targets not detached)")
    parser.add_argument("--candidates", action="store_true",
                        help="every launch configuration bench_kd.py --tune may time, on sm_90 and sm_80")
    parser.add_argument("--plan", action="store_true",
                        help="print (JSON) the distinct sm_90 compiles of each device-check step; compiles nothing")
    args = parser.parse_args(argv)
    if not kd_core.triton_available():
        print("aot_check: triton is not importable", file=sys.stderr)
        return 2
    if args.plan:
        print(json.dumps(device_check_plan()))
        return 0
    start = time.perf_counter()
    variants = DEFAULT_VARIANTS if args.default_variants else VARIANTS
    results, failures = run(args.full, variants, progress=lambda line: print(line, file=sys.stderr, flush=True),
                            jobs=candidate_jobs() if args.candidates else None)
    print(table(results))
    spilling = sum(1 for r in results if r.spill_stores or r.spill_loads)
    errors = sum(1 for r in results if r.error)
    print(f"\n{len(results)} compiles, {errors} compile failures, {spilling} spill, "
          f"max {max(r.registers for r in results)} registers, {time.perf_counter() - start:.0f} s")
    for line in failures:
        print(f"FAIL {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
