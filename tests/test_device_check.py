"""kernels/device_check.py, the one-call GPU script, run small on CPU so that a GPU session never
spends its minutes on a broken script."""
import json
import math
import re
from pathlib import Path

from conftest import load_script

device_check = load_script("kernels/device_check.py")


def test_device_check_runs_every_step_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = device_check.main(["--device", "cpu", "--out", str(out), "--teacher", "resnet8", "--student", "resnet8",
                            "--steps", "2", "--test-filter", "swap_correction", "--budget", "inf"])
    printed = capsys.readouterr().out
    assert rc == 0, (out / "device_check.log").read_text()[-3000:]
    # The plan comes first: one line per step (kernels/aot_check.py --plan binds every launch of the step as
    # Triton would for sm_90), the GPU case set keeps the kernel tests' compiles bounded, and the estimate of
    # the whole check on an H100 fits the one device call.
    planned = {name: int(n) for name, n in re.findall(r"^(\w+): planned compiles: (\d+)", printed, re.M)}
    assert list(planned) == [step.name for step in device_check.STEPS]
    assert 0 < planned["kernel_tests"] <= 160 + device_check.FIXED_TEST_COMPILES and planned["bench_tune"] > 0
    assert float(re.search(r"^estimate on an H100: (\d+) s", printed, re.M).group(1)) <= 540
    assert printed.index("planned compiles") < printed.index("# Device check")
    report = printed[printed.index("# Device check"):]
    assert "## Kernel tests: ok" in report and "Triton interpreter: 1 passed" in report
    assert "$ env KD_KERNEL_CASE_SET=gpu " in (out / "device_check.log").read_text()   # 60 cases, not 240
    assert (out / "report.md").read_text() == report.rstrip("\n") + "\n"
    bench = json.loads((out / "bench_quick.json").read_text())
    assert {r["variant"] for r in bench["results"]} >= {"eager"}
    steps = json.loads((out / "steps.json").read_text())
    assert [(r["method"], r["status"]) for r in steps] == [("kd", "ok"), ("pesf", "ok"), ("dml", "ok")]
    assert all(r["step_ms"] > 0 and r["cuda_graph"] is False for r in steps)
    assert "| pesf | False |" in report and "pesf/kd" in report
    concurrent = json.loads((out / "concurrent.json").read_text())
    assert [r["runs"] for r in concurrent] == [1, 2] and "Concurrent pesf runs in one process, batch 64 each: ok" in report
    data = json.loads((out / "imagenet_data.json").read_text())   # the gpu path's batched decode, on the CPU here
    assert data["files"] == 6 and [r["decode"] for r in data["results"]] == ["gpu"]
    assert "| gpu |" in report and "training step (pesf, resnet18 -> resnet18, batch 2):" in report
    assert "gpu decode:" in report and "x the step's rate" in report
    lm = json.loads((out / "bench_lm.json").read_text())
    assert {r["variant"] for r in lm["results"]} >= {"naive", "kd_core"} and "at language-model scale: ok" in report


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_cuts_steps_to_what_is_left_and_skips_when_too_little_remains():
    clock = FakeClock()
    budget = device_check.Budget(540, clock=clock)
    assert budget.step_limit(120) == 120                 # plenty left: the step's own cap
    clock.now += 440                                     # 100 s left, 10 s kept for the report
    assert budget.step_limit(120) == 90
    clock.now += 76                                      # 24 s left: 14 s < 15 s
    assert budget.step_limit(120) is None
    assert device_check.run_logged(["false"], 120, budget, Path("/nonexistent/log")) == "skipped"


def test_an_unlimited_budget_never_cuts_a_step():
    clock = FakeClock()
    budget = device_check.Budget(math.inf, clock=clock)
    clock.now += 1e9
    assert budget.step_limit(120) == math.inf
