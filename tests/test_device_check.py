"""kernels/device_check.py, the one-call GPU script, run small on CPU so that a GPU session never
spends its minutes on a broken script."""
import json

from kernels import device_check


def test_device_check_runs_every_step_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = device_check.main(["--device", "cpu", "--out", str(out), "--teacher", "resnet8", "--student", "resnet8",
                            "--steps", "2", "--test-filter", "swap_correction", "--budget", "400"])
    report = capsys.readouterr().out
    assert rc == 0, (out / "device_check.log").read_text()[-3000:]
    assert "Triton interpreter: ok" in report and "1 passed" in report
    assert (out / "report.md").read_text() == report.rstrip("\n") + "\n"
    bench = json.loads((out / "bench_quick.json").read_text())
    assert {r["variant"] for r in bench["results"]} >= {"eager"}
    steps = json.loads((out / "steps.json").read_text())
    assert [(r["method"], r["status"]) for r in steps] == [("kd", "ok"), ("pesf", "ok"), ("dml", "ok")]
    assert all(r["step_ms"] > 0 and r["cuda_graph"] is False for r in steps)
    assert "| pesf | False |" in report and "pesf/kd" in report
    concurrent = json.loads((out / "concurrent.json").read_text())
    assert [r["runs"] for r in concurrent] == [1, 2] and "Concurrent pesf runs in one process, batch 64 each: ok" in report
