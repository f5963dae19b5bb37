"""Times that mean something and figures a person can read: step-time ratios only from runs timed side by side
in one process; report figures with labelled axes, legends beside the data and identical series named."""
import json
import types
from pathlib import Path

import numpy as np
import pytest

import engine
import multirun
import report
import train_cifar


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class CostlyStep:
    """Stands for engine.TrainStep: every call takes ``distiller.seconds`` on the fake clock."""
    clock: FakeClock | None = None

    def __init__(self, distiller, *args, **kwargs):
        self.seconds, self.cuda_graph = distiller.seconds, False

    def __call__(self, x, y, index):
        self.clock.now += self.seconds


class Distiller:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def updated_params(self) -> int:
        return 7

    def train(self) -> None:
        pass


class Batches:
    def epoch(self, start: int):
        return [(None, None, None)] * 4


def test_interleaved_runs_each_time_only_their_own_steps(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(engine.time, "perf_counter", clock)
    monkeypatch.setattr(CostlyStep, "clock", clock)
    monkeypatch.setattr(engine, "TrainStep", CostlyStep)

    def job(name: str, seconds: float) -> multirun.Job:
        cfg = types.SimpleNamespace(method=name, benchmark_steps=6, batch_size=8, cuda_graph=False)
        log = engine.RunLog(tmp_path / name)
        return multirun.Job(name, lambda: engine.time_steps(cfg, engine.Dist(), Distiller(seconds), None, Batches(),
                                                            None, log))

    rows = multirun.compare([job("pesf", 0.010), job("kd", 0.002)], engine.torch.device("cpu"), tmp_path, "kd")
    # Interleaved, each run's clock holds its own 6 steps only, not the other run's turns in between.
    assert [r["step_ms"] for r in rows] == pytest.approx([10.0, 2.0])
    assert [r["vs_reference"] for r in rows] == pytest.approx([5.0, 1.0])
    saved = json.loads((tmp_path / "benchmark_side_by_side.json").read_text())
    assert saved["reference"] == "kd" and [r["run"] for r in saved["rows"]] == ["pesf", "kd"]


def test_a_sweep_benchmark_compares_methods_side_by_side_and_the_report_prints_only_those_ratios(
        fake_cifar, teacher_ckpt, tmp_path, capsys):
    common = ["--teacher", "resnet8", "--student", "resnet8", "--teacher-ckpt", str(teacher_ckpt), "--batch-size", "8",
              "--data-dir", str(fake_cifar), "--device", "cpu"]
    assert train_cifar.main([*common, "--sweep", "method=pesf,kd", "--benchmark-steps", "2",
                             "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    assert "step time measured side by side (interleaved one step each, 2 timed steps per run" in out
    bench = json.loads((tmp_path / "bench" / "sweep" / "benchmark_side_by_side.json").read_text())
    pesf, kd = bench["rows"]
    assert bench["reference"] == "method=kd" and (pesf["method"], kd["method"]) == ("pesf", "kd")
    assert pesf["setting"] == "resnet8_resnet8" and pesf["updated_params"] > kd["updated_params"]
    # The report: a training run's own wall time gets no ratio; the side-by-side benchmark's ratio is printed.
    assert train_cifar.main([*common, "--method", "kd", "--epochs", "1", "--limit-batches", "2", "--set",
                             "eval_batch_size=50", "--out", str(tmp_path / "kd_run")]) == 0
    tables = report.write_report([str(tmp_path)], tmp_path / "report", figures=False).read_text()
    cost = tables.split("## Table 7", 1)[1].split("\n## ", 1)[0]
    assert "own-run wall ms/step" in cost and "÷ KD |" not in cost.replace("paper ÷ KD", "")
    side = tables.split("## Step time measured side by side", 1)[1].split("\n## ", 1)[0]
    assert f"| method=pesf | {pesf['step_ms']:.2f} |" in side
    assert f"| {pesf['step_ms'] / kd['step_ms']:.2f} |" in side and "÷ method=kd" in side


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def drawn_figures(monkeypatch):
    """pyplot, and the list into which every figure report.draw closes is kept instead (to inspect it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return plt, figures


def test_every_panel_has_axis_labels_and_its_legend_beside_the_data(monkeypatch, tmp_path):
    plt, figures = drawn_figures(monkeypatch)
    curves = [{"panel": report.TOP1, "series": s, "x": e, "y": y, "std": None, "n": 1}
              for s, base in (("student", 10.0), ("teacher", 30.0)) for e, y in ((1, base), (2, base + 5))]
    hist = [{"panel": "teacher major logit", "series": s, "x": x, "y": y, "std": None, "n": 5}
            for s in ("kd", "pesf", "ftkd") for x, y in ((0.5, 0.2), (1.5, 0.8 if s != "ftkd" else 0.6))]
    bars = [{"panel": "cifar100", "series": s, "x": setting, "y": y, "std": 0.5, "n": 3}
            for s, setting, y in (("kd", "resnet56_resnet20", 70.0), ("pesf", "resnet56_resnet20", 71.0),
                                  ("ce", "resnet20", 69.0))]
    report.draw(plt, tmp_path / "curves.png", "t", curves, "line", {}, "footer")
    report.draw(plt, tmp_path / "hist.png", "t", hist, "hist", {}, "footer")
    report.draw(plt, tmp_path / "bars.png", "t", bars, "bar", {"cifar100": ("pair", "top-1 (%)")}, "footer")
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in [a for a in fig.axes if a.axison]:
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
            legend = ax.get_legend()
            if legend is not None:   # wholly to the right of the axes, never over the data
                assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    (curve_ax,) = figures[0].axes
    assert curve_ax.get_ylabel() == "top-1 (%)" and curve_ax.get_xlabel() == "epoch"
    # Identical series are named as such and drawn in another line style, so that both stay visible.
    (hist_ax,) = figures[1].axes
    labels = [line.get_label() for line in hist_ax.get_lines()]
    assert labels == ["kd", "pesf (identical to kd)", "ftkd"]
    assert len({line.get_linestyle() for line in hist_ax.get_lines()}) == 3
    # Bar labels are wrapped, not cut: the whole text of each setting is on the tick.
    (bar_ax,) = figures[2].axes
    ticks = [t.get_text() for t in bar_ax.get_xticklabels()]
    assert ticks == ["resnet56 ->\nresnet20", "resnet20"]
    centres = sorted(bar.get_x() + bar.get_width() / 2 for bar in bar_ax.patches)   # each group on its tick
    assert centres == pytest.approx([-0.2, 0.2, 1.0])


def test_one_tau_draws_no_gap_against_tau_panel():
    def group(method: str, tau: float) -> report.Group:
        run = report.Run(Path(method), {"method": method, "tau": tau}, {"gap": 1.0 + tau}, [], None)
        return report.Group("cifar100", "a_b", method, (("tau", tau),), [run])
    assert report.fig3_rows([group("kd", 4.0), group("pesf", 4.0)]) == []
    rows = report.fig3_rows([group("pesf", 4.0), group("pesf", 2.0)])
    assert sorted(r["x"] for r in rows if r["panel"] == "mean gap vs tau") == [2.0, 4.0]
    assert np.isclose(sum(r["y"] for r in rows), 3.0 + 5.0)
