"""report.py on run folders of short real CPU runs: outputs.pt, provenance, tables, CSVs, figures, bad folders.

Every expected number is computed here, with numpy, from the runs' own summary.json / metrics.jsonl /
outputs.pt, never by calling report.py's helpers.
"""
import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import engine
import report
import train_cifar
from train_cifar import CifarConfig

ROOT = Path(__file__).resolve().parents[1]
# (method, seed, tau): kd and pesf with 2 seeds, a second tau for pesf (Fig. 3 and the sweep figure), a ce student.
RUNS = [("ce", 0, 4.0), ("kd", 0, 4.0), ("kd", 1, 4.0), ("pesf", 0, 4.0), ("pesf", 1, 4.0), ("pesf", 0, 2.0)]


@pytest.fixture(scope="module")
def runs(fake_cifar, teacher_ckpt, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    base = CifarConfig(teacher="resnet8", student="resnet8", epochs=2, batch_size=16, limit_batches=2,
                       eval_batch_size=50, log_every=100, data_dir=str(fake_cifar), teacher_ckpt=str(teacher_ckpt))
    for method, seed, tau in RUNS:
        train_cifar.run(dataclasses.replace(base, method=method, seed=seed, tau=tau,
                                            out=str(root / f"{method}_tau{tau}_s{seed}")))
    return root


@pytest.fixture(scope="module")
def made(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert report.main([str(runs), "--out", str(out)]) == 0
    return out


def summaries(runs: Path, method: str, tau: float = 4.0) -> list[dict]:
    return [json.loads((runs / f"{method}_tau{tau}_s{s}" / "summary.json").read_text())
            for m, s, t in RUNS if m == method and t == tau]


def expected_cell(values: list[float], digits: int, factor: float = 1.0) -> str:
    values = np.asarray(values, dtype=np.float64) * factor
    text = f"{values.mean():.{digits}f}" + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")
    return text + (f" (n={len(values)})" if len(values) < 3 else "")


def section(tables: str, title: str) -> str:
    return tables.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def row(text: str, label: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# What the training scripts save for the report
# ----------------------------------------------------------------------------------------------
def test_outputs_pt_holds_the_final_test_outputs(runs, fake_cifar):
    folder = runs / "pesf_tau4.0_s0"
    out = torch.load(folder / "outputs.pt", weights_only=True)
    summary = json.loads((folder / "summary.json").read_text())
    test_images, test_labels = train_cifar.load_cifar100(fake_cifar)["test"]
    assert torch.equal(out["index"], torch.arange(100)) and torch.equal(out["labels"], test_labels[:100])
    assert out["student_logits"].dtype == torch.float16 and out["student_features"].shape == (100, 64)
    assert out["teacher_logits"].shape == (100, 100) and out["teacher_features"].shape == (100, 64)
    # The saved student logits are the last.pt student's on the test images.
    student = train_cifar.models.build_model("resnet8", 100)
    student.load_state_dict(torch.load(folder / "last.pt", weights_only=True)["model"])
    mean = torch.tensor(train_cifar.CIFAR_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(train_cifar.CIFAR_STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        logits = student.eval()((test_images.float() - mean) / std)
    torch.testing.assert_close(out["student_logits"].float(), logits, atol=2e-2, rtol=2e-3)
    # Accuracy and KL(t || s) at tau 1 recomputed from the saved logits match the summary's.
    s, t = out["student_logits"].double(), out["teacher_logits"].double()
    assert 100 * (s.argmax(1) == out["labels"]).double().mean().item() == pytest.approx(summary["top1"])
    assert 100 * (t.argmax(1) == out["labels"]).double().mean().item() == pytest.approx(summary["teacher_top1"])
    kl = (t.softmax(1) * (t.log_softmax(1) - s.log_softmax(1))).sum(1).mean().item()
    assert kl == pytest.approx(summary["kl"], abs=2e-3)
    assert "teacher_logits" not in torch.load(runs / "ce_tau4.0_s0" / "outputs.pt", weights_only=True)


def test_outputs_over_budget_keep_every_kth_row_once(monkeypatch, tmp_path):
    monkeypatch.setattr(engine.EvalOutputs, "OUTPUTS_BYTES", 4000)
    collected = engine.EvalOutputs()
    logits, feats = torch.randn(40, 10), torch.randn(40, 4)
    # Two shards out of order, the second padded with a repeat of row 0 (DDP eval padding).
    order = torch.cat([torch.arange(20, 40), torch.arange(0, 20), torch.tensor([0])])
    collected.add(order, order % 3, logits[order], feats[order], None, None)
    collected.save(tmp_path / "o.pt", engine.Dist())
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    row_bytes = 8 + 8 + 10 * 2 + 4 * 2
    stride = -(-40 * row_bytes // 4000)   # 2
    assert torch.equal(out["index"], torch.arange(0, 40, stride)) and out["rows_total"] == 40
    torch.testing.assert_close(out["student_logits"].float(), logits[::stride].half().float())


def test_config_records_the_git_commit_and_loads_back(runs):
    cfg = yaml.safe_load((runs / "kd_tau4.0_s0" / "config.yaml").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert cfg["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    loaded = engine.build_config(CifarConfig, str(runs / "kd_tau4.0_s0" / "config.yaml"))
    assert loaded.method == "kd" and loaded.tau == 4.0


# ----------------------------------------------------------------------------------------------
# tables.md and the CSVs against numbers computed here
# ----------------------------------------------------------------------------------------------
def test_tables_hold_independent_means_and_stds(runs, made):
    tables = (made / "tables.md").read_text()
    top1 = section(tables, "Tables 1/10")
    assert expected_cell([s["top1"] for s in summaries(runs, "kd")], 2) in row(top1, "kd")
    assert expected_cell([s["top1"] for s in summaries(runs, "pesf")], 2) in row(top1, "pesf tau=4.0")
    assert expected_cell([s["top1"] for s in summaries(runs, "pesf", 2.0)], 2) in row(top1, "pesf tau=2.0")
    consistency = section(tables, "Tables 10/11/13")
    kd_row = row(consistency, "kd")
    for key, digits, factor in (("kl", 3, 1), ("pl", 1, 100), ("agreement", 1, 1), ("gap", 3, 1),
                                ("cka_logits", 3, 1), ("cka_features", 3, 1)):
        assert expected_cell([s[key] for s in summaries(runs, "kd")], digits, factor) in kd_row, key
    cost = section(tables, "Table 7: cifar100 resnet8_resnet8")
    assert expected_cell([s["batch_time_ms"] for s in summaries(runs, "kd")], 1) in row(cost, "kd")
    # Provenance: every run folder and the commit from config.yaml are named.
    commit = yaml.safe_load((runs / "kd_tau4.0_s0" / "config.yaml").read_text())["git_commit"]
    assert all(f"`{runs / f'{m}_tau{t}_s{s}'}`" in tables for m, s, t in RUNS) and f"`{commit}`" in tables


def test_paper_numbers_sit_beside_the_measured_ones(tmp_path, runs):
    # A run folder that claims to be resnet56 -> resnet20 KD picks up Table 1's 70.95 ± 0.51 and the difference.
    folder = tmp_path / "r56" / "kd"
    shutil.copytree(runs / "kd_tau4.0_s0", folder)
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(teacher="resnet56", student="resnet20", top1=70.0)
    (folder / "summary.json").write_text(json.dumps(summary))
    report.write_report([str(folder)], tmp_path / "out", log=lambda *a: None, figures=False)
    line = row(section((tmp_path / "out" / "tables.md").read_text(), "Tables 1/10"), "kd")
    assert "70.00 (n=1) · paper 70.95 ± 0.51 (T1, Δ -0.95)" in line


def test_csvs_hold_independent_numbers(runs, made):
    kd, pesf = summaries(runs, "kd"), summaries(runs, "pesf")
    bars = {r["series"]: r for r in read_csv(made / "fig4_top1.csv")}
    for label, group in (("kd", kd), ("pesf tau=4.0", pesf)):
        values = np.array([s["top1"] for s in group])
        assert float(bars[label]["y"]) == pytest.approx(values.mean())
        assert float(bars[label]["std"]) == pytest.approx(values.std(ddof=1)) and bars[label]["n"] == "2"
    cka = read_csv(made / "fig7_8_cka_cifar100_resnet8_resnet8.csv")
    fig7 = next(r for r in cka if r["series"] == "kd" and r["panel"].endswith("(Fig. 7)"))
    assert float(fig7["y"]) == pytest.approx(np.mean([s["cka_features"] for s in kd]))
    # Curves: per-epoch mean over the seeds' metrics.jsonl rows.
    rows = [json.loads(ln) for s in (0, 1)
            for ln in (runs / f"kd_tau4.0_s{s}" / "metrics.jsonl").read_text().splitlines()]
    curve = read_csv(made / "curves_cifar100_resnet8_resnet8_kd.csv")
    for epoch in (1, 2):
        for panel, series, key in (("top-1 on the test set", "student", "top1"),
                                   ("training loss, per term as summed into it", "kl (weighted)", "train_kl"),
                                   ("KL(teacher || student), tau 1", "KL", "kl")):
            want = [r[key] for r in rows if r["epoch"] == epoch]
            got = next(r for r in curve if (r["panel"], r["series"], r["x"]) == (panel, series, str(epoch)))
            assert float(got["y"]) == pytest.approx(np.mean(want))
            assert float(got["std"]) == pytest.approx(np.std(want, ddof=1))
    # Fig. 3: mean gap against tau from the summaries; the per-row histogram from outputs.pt (float64 logsumexp).
    gap = read_csv(made / "fig3_sharpness_gap_cifar100_resnet8_resnet8.csv")
    by_tau = {float(r["x"]): float(r["y"]) for r in gap if r["panel"] == "mean gap vs tau" and r["series"] == "pesf"}
    assert by_tau == pytest.approx({2.0: summaries(runs, "pesf", 2.0)[0]["gap"],
                                    4.0: np.mean([s["gap"] for s in pesf])})
    outs = [torch.load(runs / f"kd_tau4.0_s{s}" / "outputs.pt", weights_only=True) for s in (0, 1)]
    rows_gap = np.concatenate([(o["teacher_logits"].double().logsumexp(1) - o["student_logits"].double().logsumexp(1))
                               .numpy() for o in outs])
    hist = [r for r in gap if r["panel"] == "per-row gap" and r["series"] == "kd"]
    centres, density = np.array([float(r["x"]) for r in hist]), np.array([float(r["y"]) for r in hist])
    width = centres[1] - centres[0]
    assert density.sum() * width == pytest.approx(1.0) and hist[0]["n"] == str(len(rows_gap))
    assert (centres * density).sum() * width == pytest.approx(rows_gap.mean(), abs=width)
    sweep = {float(r["x"]): float(r["y"]) for r in read_csv(made / "sweep_tau_cifar100_resnet8_resnet8.csv")}
    assert sweep == pytest.approx({2.0: summaries(runs, "pesf", 2.0)[0]["top1"],
                                   4.0: np.mean([s["top1"] for s in pesf])})


def test_every_figure_is_written_with_its_csv(made):
    stems = ["curves_cifar100_resnet8_ce", "curves_cifar100_resnet8_resnet8_kd",
             "curves_cifar100_resnet8_resnet8_pesf_tau=4.0", "fig2_major_logits_cifar100_resnet8_resnet8",
             "fig3_sharpness_gap_cifar100_resnet8_resnet8", "fig4_top1", "fig7_8_cka_cifar100_resnet8_resnet8",
             "fig9_tsne_cifar100_resnet8_resnet8", "sweep_tau_cifar100_resnet8_resnet8"]
    for stem in stems:
        assert (made / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert len(read_csv(made / f"{stem}.csv")) > 0, stem
    tsne = read_csv(made / "fig9_tsne_cifar100_resnet8_resnet8.csv")
    assert 1 < len({r["series"] for r in tsne if r["panel"] == "kd"}) <= 7


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_a_broken_run_folder_is_one_line_and_skipped(runs, tmp_path, capsys):
    damage = {"bad_summary": ("summary.json", "{not json"), "no_metrics": ("metrics.jsonl", None),
              "bad_outputs": ("outputs.pt", "garbage"), "bad_config": ("config.yaml", "a: [")}
    for name, (file, text) in damage.items():
        shutil.copytree(runs / "kd_tau4.0_s0", tmp_path / "in" / name)
        target = tmp_path / "in" / name / file
        target.unlink() if text is None else target.write_text(text)
    shutil.copytree(runs / "kd_tau4.0_s1", tmp_path / "in" / "good")
    capsys.readouterr()
    args = [str(tmp_path / "in"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--no-figures"]
    assert report.main(args) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    for name, (file, _) in damage.items():
        hits = [ln for ln in lines if f"/{name}:" in ln]
        assert len(hits) == 1 and hits[0].startswith("skipped") and file in hits[0], (name, hits)
    assert sum(ln.startswith("skipped") for ln in lines) == 5 and "Traceback" not in captured.err
    assert "| kd | 1 |" in (tmp_path / "out" / "tables.md").read_text()
    assert report.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.startswith("error: no usable run folder")


def test_without_matplotlib_the_tables_and_csvs_are_still_written(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    report.write_report([str(runs / "kd_tau4.0_s0")], tmp_path)
    out = capsys.readouterr().out
    assert "matplotlib is not installed (pip install matplotlib)" in out and "scikit-learn is not installed" in out
    assert (tmp_path / "tables.md").is_file() and (tmp_path / "fig4_top1.csv").is_file()
    assert not list(tmp_path.glob("*.png"))


def test_paper_values_are_printed_in_the_paper(shared_data):
    paper = (shared_data.parent / "paper" / "pesf-kd.txt")
    if not paper.is_file():
        pytest.skip(f"paper text not found at {paper}")
    text = paper.read_text()
    entries = yaml.safe_load(report.PAPER_VALUES.read_text())["values"]
    assert len(entries) > 200
    for e in entries:
        for v in (e["value"], e.get("std")):
            if v is not None:
                assert f"{v:g}" in text, e
