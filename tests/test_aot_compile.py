"""The kd_core kernels compile for sm_90 and sm_80 without a GPU: no compile error, <= 255 registers,
no spill, shared memory within the target (kernels/aot_check.py, run outside the Triton interpreter).

CI compiles a representative subset; PESF_AOT_FULL=1 compiles every launch the launchers choose
(every shape, dtype, path and variant on both targets: several minutes on two cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _aot_supported() -> bool:
    # The check binds arguments with Triton's own JIT internals (as in triton 3.8) and needs the wheel's ptxas.
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        return hasattr(JITFunction, "_pack_args") and Path(knobs.nvidia.ptxas.path).is_file()
    except Exception:
        return False


@pytest.mark.skipif(not _aot_supported(),
                    reason="needs a triton with knobs, the JIT binder internals and its bundled ptxas (as 3.8)")
def test_kernels_compile_for_gpu_targets_without_spills():
    # TRITON_INTERPRET is set for the whole CI run; the compiler needs it off before triton imports.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full = os.environ.get("PESF_AOT_FULL", "0") not in ("", "0")
    proc = subprocess.run([sys.executable, str(ROOT / "kernels" / "aot_check.py"), *(["--full"] if full else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout)
    assert proc.returncode == 0, f"AOT compile check failed\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kernel")]
    assert rows, proc.stdout
    # Every kernel (split-K merge included) was derived from the launchers and compiled for both targets.
    assert {r[0] for r in rows} == {"fwd", "merge", "bwd", "rescale"}
    assert {r[3] for r in rows} == {"sm_90", "sm_80"}
    assert {r[2] for r in rows} >= {"fp32", "bf16", "fp16"}
    for kernel, config, dtype, target, registers, spills, shared, _ in rows:
        assert 0 < int(registers) <= 255 and spills == "0/0", (kernel, config, dtype, target, registers, spills)
        assert 0 <= int(shared) <= (232448 if target == "sm_90" else 166912)


@pytest.mark.skipif(not _aot_supported(),
                    reason="needs a triton with knobs, the JIT binder internals and its bundled ptxas (as 3.8)")
def test_stage_and_exponent_candidates_change_the_compiled_forward():
    """The tune keys reach the compiled code (the interpreter ignores num_stages): on sm_90 the forward with
    num_stages = 2 stages its K loop's loads through shared memory, pow4_exp has fewer exponentials in its PTX,
    and the default launch neither (three compiles)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = """if True:
        import json, torch, aot_check
        target, compiler = aot_check.TARGETS[0], aot_check.AotCompiler()
        out = {}
        for name, tune in (("default", {}), ("stages", {"num_stages": 2}), ("pow4", {"pow4_exp": True})):
            [launch] = aot_check.record_launches(8192, 32768, torch.float32, target.n_sm,
                                                 ("fwd", True, False, False, False), tune)
            r = compiler.compile(launch, target, name)
            out[name] = (r.error, r.spill_stores + r.spill_loads, r.shared, r.exponentials, r.config)
        print(json.dumps(out))"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "kernels", env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (error, spills, _, exponentials, _) in got.items():
        assert error == "" and spills == 0 and exponentials > 0, (name, got[name])
    (_, _, shared, exps, config), (_, _, shared_st, exps_st, config_st), (_, _, shared_p4, exps_p4, config_p4) = \
        got["default"], got["stages"], got["pow4"]
    assert "stages2" in config_st and "stages" not in config and "pow4" in config_p4 and "pow4" not in config
    # a 1 x 4096 fp32 tile of s and t (32 KiB) waits in shared memory for the next iteration
    assert shared_st >= shared + 2 * 4096 * 4 and shared_p4 == shared, got
    assert exps_p4 < exps and exps_st == exps, got
