"""The paper's tables and figures from run folders, in one command.

    python report.py runs/cifar/resnet56_resnet20 --out reports/r56_r20
    python report.py 'runs/cifar/*/pesf_s*' runs/glue --out reports/all

Reads every run folder (a folder with config.yaml, summary.json, metrics.jsonl and, from training
scripts that save it, outputs.pt) found under the arguments, groups the runs by (task, teacher/student
setting, method, the config keys that differ between runs of that method) across seeds, and writes:

- ``tables.md``: Tables 1/10 (top-1), 7 (batch time, updated parameters), 10/11/13 (consistency) and the
  GLUE tables (each task's metric), mean ± std over seeds beside the paper's numbers (``paper_values.yaml``);
  cells with fewer than 3 seeds say ``(n=...)``; the run folders and git commits behind each table;
- one PNG per figure and, beside it, a CSV of exactly the numbers drawn (columns: panel, series, x, y, std, n):
  training curves per group, Fig. 2 (major logits), Fig. 3 (sharpness gap and its dependence on tau),
  Fig. 4 (top-1), Figs. 7-8 (CKA), Fig. 9 (t-SNE), Figs. 10-13 (sweeps of any config key).

matplotlib (figures) and scikit-learn (t-SNE) are optional: without them the tables and CSVs are written.
A run folder with a missing or malformed file is reported in one line and skipped.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

import runfolder

PAPER_VALUES = Path(__file__).resolve().parent / "paper_values.yaml"
# Config keys that never make two runs different experiments: seeds, paths, logging, hardware plumbing.
NOT_AN_EXPERIMENT = {"seed", "out", "data_dir", "download", "device", "log_every", "eval_every", "eval_batch_size",
                     "benchmark_steps", "git_commit", "teacher_ckpt", "backend", "cuda_graph", "channels_last",
                     "label_adjust", "workers", "deterministic", "decode"}
# summary key -> (column header, decimals, display factor: PL is stored as a fraction and shown in %)
METRICS = {"top1": ("top-1", 2, 1), "best_top1": ("best top-1", 2, 1), "score": ("score", 2, 1),
           "kl": ("KL", 3, 1), "pl": ("PL", 1, 100), "agreement": ("agreement", 1, 1), "gap": ("gap", 3, 1),
           "cka_logits": ("CKA logits", 3, 1), "cka_features": ("CKA features", 3, 1),
           "batch_time_ms": ("own-run wall ms/step", 1, 1), "teacher_top1": ("teacher top-1", 2, 1),
           "updated_params": ("updated params (M)", 2, 1e-6), "batch_time": ("paper batch time", 3, 1)}
TSNE_CLASSES = 7
TSNE_ROWS_PER_CLASS = 100


class RunError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    outputs: dict | None

    @property
    def commit(self) -> str:
        return str(self.config.get("git_commit", "unknown"))


def _read(path: Path, parse):
    if not path.is_file():
        raise RunError(f"{path.name} missing")
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise RunError(f"{path.name} malformed ({str(err).splitlines()[0]})") from None


def load_run(folder: Path) -> Run:
    config = _read(folder / "config.yaml", yaml.safe_load)
    summary = _read(folder / "summary.json", json.loads)
    metrics = _read(folder / "metrics.jsonl", lambda text: [json.loads(ln) for ln in text.splitlines() if ln.strip()])
    if not isinstance(config, dict) or not isinstance(summary, dict) or not all(isinstance(m, dict) for m in metrics):
        raise RunError("config.yaml, summary.json or metrics.jsonl does not hold the expected mapping")
    if "top1" not in summary:
        raise RunError("summary.json has no top1 (a benchmark, not a training run)")
    if not any("epoch" in m for m in metrics):
        raise RunError("metrics.jsonl has no epoch rows")
    outputs = None
    if (folder / "outputs.pt").is_file():
        try:
            outputs = torch.load(folder / "outputs.pt", map_location="cpu", weights_only=True)
        except Exception as err:   # any unpickling failure is a malformed file
            raise RunError(f"outputs.pt malformed ({type(err).__name__})") from None
        if not isinstance(outputs, dict) or not {"labels", "student_logits", "student_features"} <= set(outputs):
            raise RunError("outputs.pt lacks labels, student_logits or student_features")
    if "stages" in summary:   # a multi-stage run: its last stage's config names that stage's method and teacher
        config = {**config, "method": summary["method"], "teacher": summary.get("teacher", config.get("teacher"))}
    return Run(folder, config, summary, metrics, outputs)


def find_runs(patterns: list[str], log=print) -> list[Run]:
    """Every run folder at or under the paths (globs allowed); broken ones are one line each and skipped."""
    markers = ("config.yaml", "summary.json", "metrics.jsonl")
    folders: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or [pattern]
        found = []
        for match in map(Path, matches):
            if match.is_dir():
                found += sorted({p.parent for m in markers for p in match.rglob(m)})
        if not found:
            log(f"skipped {pattern}: no run folder (config.yaml, summary.json, metrics.jsonl) there")
        # A multi-stage run (stages.json) is reported as one run; its intermediate stages' folders are not runs.
        found = [f for f in found if not (f.parent / "stages.json").is_file()]
        folders += [f for f in found if f not in folders]
    runs = []
    for folder in folders:
        try:
            runs.append(load_run(folder))
        except RunError as err:
            log(f"skipped {folder}: {err}")
    return runs


# ----------------------------------------------------------------------------------------------
# Groups: runs of one experiment across seeds
# ----------------------------------------------------------------------------------------------
@dataclass
class Group:
    task: str                                   # cifar100 | imagenet | a GLUE task
    setting: str                                # teacher_student (or the student alone); GLUE: the task
    method: str                                 # the --method name, with a dagger when label_adjust is false
    variant: tuple[tuple[str, object], ...]     # the config keys that set it apart from its method's other runs
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.variant)])

    def values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.runs if isinstance(r.summary.get(key), (int, float))]

    def config_value(self, key: str):
        return self.runs[0].config.get(key)


def place(task: str, setting: str) -> str:
    """A heading's "task setting", once for GLUE, whose setting is the task."""
    return task if setting == task else f"{task} {setting}"


def task_of(config: dict) -> str:
    if "task" in config:
        return str(config["task"])
    return "imagenet" if "teacher_weights" in config else "cifar100"


def setting_of(run: Run) -> str:
    if "task" in run.config:
        return str(run.config["task"])
    teacher = run.summary.get("teacher")
    return f"{teacher}_{run.summary.get('student')}" if teacher else str(run.summary.get("student"))


def method_of(config: dict) -> str:
    return str(config.get("method")) + ("†" if config.get("label_adjust") is False else "")


def group_runs(runs: list[Run]) -> list[Group]:
    by_method: dict[tuple, list[Run]] = {}
    for run in runs:
        by_method.setdefault((task_of(run.config), setting_of(run), method_of(run.config)), []).append(run)
    groups = []
    for (task, setting, method), members in by_method.items():
        keys = sorted({k for r in members for k in r.config} - NOT_AN_EXPERIMENT)
        differing = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in members}) > 1]
        by_variant: dict[tuple, Group] = {}
        for run in members:
            variant = tuple((k, run.config.get(k)) for k in differing)
            by_variant.setdefault(variant, Group(task, setting, method, variant)).runs.append(run)
        groups += by_variant.values()
    for g in groups:
        g.runs.sort(key=lambda r: (r.config.get("seed", 0), str(r.path)))
    return sorted(groups, key=lambda g: (g.task, g.setting, g.method, [_sort_key(v) for _, v in g.variant]))


def _sort_key(value) -> tuple:
    """Numbers in numeric order (a sweep's 2 before 10), then everything else as text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, float(value), "") if number else (1, 0.0, str(value))


# ----------------------------------------------------------------------------------------------
# Numbers: mean and sample standard deviation over seeds
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def cell(values: list[float], metric: str) -> str:
    """``mean ± std`` (sample std over seeds) in the metric's display units; ``(n=k)`` when k < 3 seeds."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    _, digits, factor = METRICS.get(metric, (metric, 3, 1))
    text = f"{mean * factor:.{digits}f}" + (f" ± {std * factor:.{digits}f}" if std is not None else "")
    return text + (f" (n={n})" if n < 3 else "")


def load_paper_values(path: Path = PAPER_VALUES) -> dict[tuple, list[dict]]:
    """(task, setting, method, metric) -> the paper's entries (several where two tables print the number)."""
    table: dict[tuple, list[dict]] = {}
    for e in yaml.safe_load(path.read_text())["values"]:
        table.setdefault((e["task"], e["setting"], e["method"], e["metric"]), []).append(e)
    return table


def paper_cell(paper: dict, group: Group, metric: str, measured: float | None = None) -> str:
    """The paper's value(s) for this cell in display units, the table cited, and measured minus paper."""
    parts = []
    for e in paper.get((group.task, group.setting, group.method, metric), []):
        scale = float(e.get("scale", 1))
        _, digits, factor = METRICS.get(metric, (metric, 3, 1))
        value = e["value"] * scale * factor
        text = f"{value:.{digits}f}" + (f" ± {e['std'] * scale * factor:.{digits}f}" if "std" in e else "")
        text += f" (T{e['table']}"
        if measured is not None and metric in METRICS:
            text += f", Δ {measured * factor - value:+.{digits}f}"
        parts.append(text + ")")
    return "; ".join(parts) or "–"


def provenance(groups: list[Group]) -> str:
    runs = [r for g in groups for r in g.runs]
    commits = sorted({r.commit for r in runs})
    return f"Runs ({len(runs)}): " + ", ".join(f"`{r.path}`" for r in runs) + \
        ". Commit" + ("s" if len(commits) > 1 else "") + ": " + ", ".join(f"`{c}`" for c in commits) + "."


# ----------------------------------------------------------------------------------------------
# tables.md
# ----------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def with_paper(group: Group, metric: str, paper: dict) -> str:
    measured = cell(group.values(metric), metric)
    mean = mean_std(group.values(metric))[0]
    return f"{measured} · paper {paper_cell(paper, group, metric, mean)}"


def top1_tables(groups: list[Group], paper: dict) -> list[str]:
    """Tables 1 and 10 (and 2 for ImageNet): methods down, teacher/student settings across."""
    out = []
    for task, title in (("cifar100", "Tables 1/10: CIFAR-100 top-1 (last epoch)"),
                        ("imagenet", "Table 2: ImageNet top-1 (last epoch)")):
        chosen = [g for g in groups if g.task == task]
        if not chosen:
            continue
        settings = list(dict.fromkeys(g.setting for g in chosen))
        labels = list(dict.fromkeys(g.label for g in chosen))
        rows = []
        for label in labels:
            row = [label]
            for setting in settings:
                g = next((g for g in chosen if g.label == label and g.setting == setting), None)
                row.append(with_paper(g, "top1", paper) if g else "")
            rows.append(row)
        out.append(f"## {title}\n\nmean ± std over seeds · the paper's number (table) and Δ = measured − paper. "
                   f"† = no label adjustment.\n\n" + md_table(["method", *settings], rows)
                   + f"\n\n{provenance(chosen)}")
    return out


def cost_tables(groups: list[Group], paper: dict) -> list[str]:
    """Table 7 (Table 2 for ImageNet): each run's own step time, updated parameters, top-1. No ratio: runs timed
    apart saw different loads; the ratios come from ``side_by_side_tables``."""
    out = []
    for (task, setting) in dict.fromkeys((g.task, g.setting) for g in groups if g.task in ("cifar100", "imagenet")):
        chosen = [g for g in groups if (g.task, g.setting) == (task, setting)]
        rows = [[g.label, cell(g.values("batch_time_ms"), "batch_time_ms"), paper_cell(paper, g, "batch_time"),
                 paper_ratio(paper, task, setting, g.method), cell(g.values("updated_params"), "updated_params"),
                 paper_cell(paper, g, "updated_params"), with_paper(g, "top1", paper)] for g in chosen]
        table = 7 if task == "cifar100" else 2
        out.append(f"## Table {table}: {place(task, setting)}, training cost\n\n\"own-run wall ms/step\" is each run's "
                   f"mean training step while it ran, on whatever machine and load it had: runs made at different "
                   f"times are not comparable, so no ratio is printed from it (a side-by-side benchmark gives the "
                   f"ratios: `train_cifar.py --sweep method=kd,pesf --benchmark-steps 200`). The paper's parameter "
                   f"counts include the frozen teacher for KD; ours count updated parameters only.\n\n"
                   + md_table(["method", "own-run wall ms/step", "paper batch time", "paper ÷ KD",
                               "updated params (M)", "paper params (M)", "top-1"], rows)
                   + f"\n\n{provenance(chosen)}")
    return out


def paper_ratio(paper: dict, task: str, setting: str, method: str) -> str:
    """The paper's batch time of ``method`` over its KD's (Table 7), or "–"."""
    own, kd = paper.get((task, setting, method, "batch_time")), paper.get((task, setting, "kd", "batch_time"))
    return f"{own[0]['value'] / kd[0]['value']:.2f}" if own and kd else "–"


def side_by_side_tables(paths: list[str], paper: dict, log=print) -> list[str]:
    """Step time from each ``benchmark_side_by_side.json`` under ``paths`` (``multirun.compare``: its rows timed
    interleaved in one process, under one load): the only step-time ratios the report prints."""
    files = sorted({f for pattern in paths for match in (glob.glob(pattern, recursive=True) or [pattern])
                    for f in Path(match).rglob("benchmark_side_by_side.json")})
    out = []
    for path in files:
        try:
            bench = json.loads(path.read_text())
            rows = [[r["run"], f"{r['step_ms']:.2f}", f"{r['images_per_s']:.0f}", f"{r['vs_reference']:.2f}",
                     paper_ratio(paper, r.get("task", ""), r.get("setting", ""), r["method"]),
                     f"{r['updated_params'] / 1e6:.3f}"] for r in bench["rows"]]
            first = bench["rows"][0]
            out.append(f"## Step time measured side by side ({path.parent})\n\nEvery row timed in one process, "
                       f"interleaved one step at a time ({first['steps']} timed steps each, batch "
                       f"{first['batch_size']}, device {first['device']}), so that all saw the same load.\n\n"
                       + md_table(["run", "ms/step", "samples/s", f"÷ {bench['reference']}", "paper ÷ KD",
                                   "updated params (M)"], rows))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            log(f"skipped {path}: malformed ({type(err).__name__}: {err})")
    return out


def consistency_tables(groups: list[Group], paper: dict) -> list[str]:
    """Tables 10, 11 and 13: the task's score and the teacher-student consistency metrics."""
    out = []
    metrics = ("kl", "pl", "agreement", "gap", "cka_logits", "cka_features", "teacher_top1")
    for (task, setting) in dict.fromkeys((g.task, g.setting) for g in groups):
        chosen = [g for g in groups if (g.task, g.setting) == (task, setting) and g.values("kl")]
        if not chosen:
            continue
        score = "top1" if task in ("cifar100", "imagenet") else "score"
        rows = [[g.label, with_paper(g, score, paper), *(cell(g.values(m), m) + (
            f" · paper {paper_cell(paper, g, m, mean_std(g.values(m))[0])}"
            if paper.get((task, setting, g.method, m)) else "") for m in metrics)] for g in chosen]
        header = ["method", METRICS[score][0], *(METRICS[m][0] for m in metrics)]
        out.append(f"## Tables 10/11/13: {place(task, setting)}, teacher-student consistency\n\nOn the test "
                   f"(GLUE: dev) set after the last epoch: KL(t ‖ s) at τ = 1, PL in %, agreement in %, "
                   f"gap = mean of logsumexp(t) − logsumexp(s), linear CKA.\n\n" + md_table(header, rows)
                   + f"\n\n{provenance(chosen)}")
    return out


def glue_table(groups: list[Group], paper: dict) -> list[str]:
    """Tables 3/5: each task's metric (accuracy; F1 for QQP and MRPC; Matthews' correlation for CoLA)."""
    chosen = [g for g in groups if g.task not in ("cifar100", "imagenet")]
    if not chosen:
        return []
    tasks = list(dict.fromkeys(g.task for g in chosen))
    metric_names = {t: next(str(r.summary.get("metric", "top1")) for g in chosen if g.task == t for r in g.runs)
                    for t in tasks}
    rows = []
    for label in dict.fromkeys(g.label for g in chosen):
        row = [label]
        for t in tasks:
            g = next((g for g in chosen if g.label == label and g.task == t), None)
            row.append(with_paper(g, "score", paper) if g else "")
        rows.append(row)
    header = ["method", *(f"{t} ({metric_names[t]})" for t in tasks)]
    return [f"## Tables 3/5: GLUE dev\n\n" + md_table(header, rows) + f"\n\n{provenance(chosen)}"]


def runs_table(groups: list[Group]) -> str:
    rows = [[g.task, g.setting, g.label, str(len(g.runs)), ", ".join(str(r.config.get("seed")) for r in g.runs),
             cell(g.values("top1"), "top1"), cell(g.values("best_top1"), "best_top1"),
             ", ".join(sorted({r.commit[:12] for r in g.runs}))] for g in groups]
    header = ["task", "setting", "group", "runs", "seeds", "top-1", "best top-1", "commit"]
    return "## Runs\n\n" + md_table(header, rows)


# ----------------------------------------------------------------------------------------------
# Figures: each a list of rows (panel, series, x, y, std, n), written as CSV and drawn from the same rows
# ----------------------------------------------------------------------------------------------
# Panels of the training curves and the axis labels of every panel: (x label, y label), units included.
TOP1, GAP, KL, AGREEMENT = "top-1 on the test set", "sharpness gap", "KL(teacher || student), tau 1", "agreement"
LOSS = "training loss, per term as summed into it"
AXES = {TOP1: ("epoch", "top-1 (%)"), GAP: ("epoch", "mean logsumexp(t) - logsumexp(s) (nats)"),
        KL: ("epoch", "KL (nats, unweighted)"), AGREEMENT: ("epoch", "same top-1 class (% of test images)"),
        LOSS: ("epoch", "loss per batch (nats)"),
        "student major logit": ("max logit - mean logit (logit units)", "density"),
        "teacher major logit": ("max logit - mean logit (logit units)", "density"),
        "per-row gap": ("logsumexp(t) - logsumexp(s) per test image (nats)", "density"),
        "mean gap vs tau": ("temperature tau", "mean gap (nats)"),
        "CKA of penultimate features (Fig. 7)": ("teacher -> student", "linear CKA (0 to 1)"),
        "CKA of predictions (Fig. 8)": ("teacher -> student", "linear CKA (0 to 1)")}


def stat_row(panel: str, series: str, x, values: list[float]) -> dict:
    mean, std, n = mean_std(values)
    return {"panel": panel, "series": series, "x": x, "y": mean, "std": std, "n": n}


def curve_rows(group: Group) -> list[dict]:
    """Per epoch, mean ± std over seeds: top-1 (and the teacher's), each loss term, gap, KL, agreement."""
    series = [(TOP1, "student", "top1"), (TOP1, "teacher", "teacher_top1"), (GAP, "gap", "gap"),
              (KL, "KL", "kl"), (AGREEMENT, "agreement", "agreement")]
    loss_keys = sorted({k for r in group.runs for m in r.metrics for k in m if k.startswith("train_")},
                       key=lambda k: (k != "train_loss", k))
    # Every logged term is the weighted addend of the loss (engine.TrainStep sums them): say so in its name.
    series += [(LOSS, "total loss" if k == "train_loss" else f"{k.removeprefix('train_')} (weighted)", k)
               for k in loss_keys]
    epochs = sorted({m["epoch"] for r in group.runs for m in r.metrics if "epoch" in m})
    rows = []
    for panel, name, key in series:
        for epoch in epochs:
            values = [float(m[key]) for r in group.runs for m in r.metrics
                      if m.get("epoch") == epoch and isinstance(m.get(key), (int, float))]
            if values:
                rows.append(stat_row(panel, name, epoch, values))
    return rows


def _outputs(group: Group) -> list[dict]:
    return [r.outputs for r in group.runs if r.outputs is not None and "teacher_logits" in r.outputs]


def _histogram(panel: str, series: dict[str, np.ndarray], bins: int = 30) -> list[dict]:
    low = min(v.min() for v in series.values())
    high = max(v.max() for v in series.values())
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    rows = []
    for name, values in series.items():
        density, _ = np.histogram(values, edges, density=True)
        rows += [{"panel": panel, "series": name, "x": float((a + b) / 2), "y": float(d), "std": None,
                  "n": len(values)} for a, b, d in zip(edges[:-1], edges[1:], density)]
    return rows


def major_logit(logits: torch.Tensor) -> np.ndarray:
    """Each row's largest logit minus the row mean (the shift softmax ignores), in float64."""
    z = logits.double()
    return (z.max(1).values - z.mean(1)).numpy()


def row_gap(out: dict) -> np.ndarray:
    """Per-row sharpness gap logsumexp(t) - logsumexp(s) (paper eq. 3), in float64."""
    return (out["teacher_logits"].double().logsumexp(1) - out["student_logits"].double().logsumexp(1)).numpy()


def fig2_rows(groups: list[Group]) -> list[dict]:
    """Fig. 2: distribution of the normalised major logit, students (left) and teachers (right), seeds pooled."""
    with_out = [g for g in groups if _outputs(g)]
    if not with_out:
        return []
    rows = []
    for net in ("student", "teacher"):
        rows += _histogram(f"{net} major logit", {g.label: np.concatenate([major_logit(o[f"{net}_logits"])
                                                                           for o in _outputs(g)]) for g in with_out})
    return rows


def fig3_rows(groups: list[Group]) -> list[dict]:
    """Fig. 3: per-row sharpness gap distribution, and the mean gap (summary.json) against the run's tau."""
    with_out = [g for g in groups if _outputs(g)]
    rows = _histogram("per-row gap", {g.label: np.concatenate([row_gap(o) for o in _outputs(g)])
                                      for g in with_out}) if with_out else []
    taus = sweep_rows([g for g in groups if g.values("gap")], "tau", "gap", "mean gap vs tau")
    return rows + (taus if len({r["x"] for r in taus}) > 1 else [])   # one tau: no curve to draw


def sweep_rows(groups: list[Group], key: str, metric: str, panel: str) -> list[dict]:
    """``metric`` (mean ± std over seeds) against the config value ``key``; one series per method and other keys."""
    rows = []
    for g in groups:
        x = g.config_value(key)
        if isinstance(x, (int, float)) and not isinstance(x, bool) and g.values(metric):
            series = " ".join([g.method, *(f"{k}={v}" for k, v in g.variant if k != key)])
            rows.append(stat_row(panel, series, x, g.values(metric)))
    return sorted(rows, key=lambda r: (r["series"], r["x"]))


def bar_rows(groups: list[Group], metric: str, panel: str) -> list[dict]:
    return [stat_row(panel, g.label, g.setting, g.values(metric)) for g in groups if g.values(metric)]


def tsne_rows(groups: list[Group]) -> list[dict]:
    """Fig. 9: t-SNE of the students' pooled features for 7 classes, first seed with outputs.pt per group."""
    from sklearn.manifold import TSNE
    rows = []
    for g in groups:
        out = next((r.outputs for r in g.runs if r.outputs is not None), None)
        if out is None:
            continue
        labels = out["labels"].numpy()
        present = np.unique(labels)
        classes = present[np.linspace(0, len(present) - 1, min(TSNE_CLASSES, len(present))).round().astype(int)]
        keep = np.concatenate([np.flatnonzero(labels == c)[:TSNE_ROWS_PER_CLASS] for c in classes])
        if len(keep) < 5:
            continue
        feats = out["student_features"][keep].double().numpy()
        xy = TSNE(n_components=2, perplexity=min(30.0, (len(keep) - 1) / 3), init="pca",
                  random_state=0).fit_transform(feats)
        rows += [{"panel": g.label, "series": f"class {int(c)}", "x": float(a), "y": float(b), "std": None, "n": 1}
                 for c, (a, b) in zip(labels[keep], xy)]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["panel", "series", "x", "y", "std", "n"])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P")


def same_as(mine: list[dict], series: list[str]) -> dict[str, str]:
    """Series whose points are exactly those of an earlier series: series -> the earlier one."""
    points = {s: [(r["x"], r["y"]) for r in mine if r["series"] == s] for s in series}
    return {s: next(o for o in series[:i] if points[o] == points[s]) for i, s in enumerate(series)
            if any(points[o] == points[s] for o in series[:i])}


def draw(plt, path: Path, title: str, rows: list[dict], kind: str | dict[str, str],
         axes_labels: dict[str, tuple[str, str]], footer: str) -> None:
    """One axes per panel, each axis labelled (``axes_labels[panel]``, else ``AXES``), the legend beside the
    axes. kind (or panel -> kind): line (x numeric, error bars), bar (x categorical), hist (density), scatter.
    Series differ in colour and line style (a dashed line stays visible on a solid one it coincides with), and
    a series identical to an earlier one says so in the legend."""
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    cols = min(len(panels), 2)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        mine = [r for r in rows if r["panel"] == panel]
        series = list(dict.fromkeys(r["series"] for r in mine))
        twins = same_as(mine, series)
        names = {s: f"{s} (identical to {twins[s]})" if s in twins else s for s in series}
        panel_kind = kind.get(panel, "line") if isinstance(kind, dict) else kind
        if panel_kind == "bar":   # each category's bars centred on its tick
            cats = list(dict.fromkeys(r["x"] for r in mine))
            present = {c: [r["series"] for r in mine if r["x"] == c] for c in cats}
            width = 0.8 / max(len(v) for v in present.values())
            for i, s in enumerate(series):
                pts = [r for r in mine if r["series"] == s]
                xs = [j + (present[r["x"]].index(s) - (len(present[r["x"]]) - 1) / 2) * width
                      for j, r in ((cats.index(r["x"]), r) for r in pts)]
                ax.bar(xs, [r["y"] for r in pts], width, yerr=[r["std"] or 0 for r in pts], capsize=3,
                       label=names[s], hatch=("", "//", "..", "xx")[i % 4])
            ax.set_xticks(range(len(cats)), [str(c).replace("_", " ->\n") for c in cats], fontsize=8)
        else:
            for i, s in enumerate(series):
                pts = [r for r in mine if r["series"] == s]
                xs, ys = [r["x"] for r in pts], [r["y"] for r in pts]
                # later series thinner and in another dash pattern: one drawn over another stays visible
                style = dict(label=names[s], linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                             linewidth=max(2.4 - 0.4 * i, 0.8))
                if panel_kind == "scatter":
                    ax.scatter(xs, ys, s=6, label=names[s], marker=MARKERS[i % len(MARKERS)])
                elif panel_kind == "hist":
                    ax.plot(xs, ys, drawstyle="steps-mid", **style)
                else:
                    ax.errorbar(xs, ys, yerr=[r["std"] or 0 for r in pts], marker=MARKERS[i % len(MARKERS)], ms=4,
                                capsize=3, **style)
            xs = [r["x"] for r in mine]
            if panel_kind == "line" and min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
            if panel_kind == "line" and all(float(x).is_integer() for x in xs):
                ax.xaxis.get_major_locator().set_params(integer=True)   # epochs, not fractions of one
        xlabel, ylabel = axes_labels.get(panel) or AXES.get(panel, ("", ""))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel, fontsize=9)
        if len(series) > 1 or panel_kind == "bar":
            ax.legend(fontsize=7, markerscale=2 if panel_kind == "scatter" else 1, loc="upper left",
                      bbox_to_anchor=(1.01, 1), borderaxespad=0, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.0, footer, fontsize=6, color="gray", va="top")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text.replace("†", "_noadj")).strip("_")


def make_figures(groups: list[Group], out: Path, log=print) -> list[tuple[str, str, list[Group]]]:
    """Write every figure's CSV (and PNG when matplotlib imports); returns (file stem, title, groups) per figure."""
    plans = []   # (stem, title, kind, axis labels of the panels not in AXES, rows, groups)
    for g in groups:
        plans.append((f"curves_{slug(g.task + '_' + g.setting + '_' + g.label)}",
                      f"Training curves: {g.task} {g.setting} {g.label} (one point per evaluated epoch)", "line", {},
                      curve_rows(g), [g]))
    for (task, setting) in dict.fromkeys((g.task, g.setting) for g in groups):
        chosen = [g for g in groups if (g.task, g.setting) == (task, setting)]
        taught = [g for g in chosen if g.values("kl")]
        where = slug(f"{task}_{setting}")
        plans += [(f"fig2_major_logits_{where}", f"Fig. 2: normalised major logits, {place(task, setting)}", "hist",
                   {}, fig2_rows(taught), taught),
                  (f"fig3_sharpness_gap_{where}", f"Fig. 3: sharpness gap, {place(task, setting)}",
                   {"per-row gap": "hist"}, {}, fig3_rows(taught), taught),
                  (f"fig7_8_cka_{where}", f"Figs. 7-8: linear CKA, {place(task, setting)}", "bar", {},
                   bar_rows(taught, "cka_features", "CKA of penultimate features (Fig. 7)")
                   + bar_rows(taught, "cka_logits", "CKA of predictions (Fig. 8)"), taught)]
        try:
            plans.append((f"fig9_tsne_{where}", f"Fig. 9: t-SNE of student features, {place(task, setting)}", "scatter",
                          {g.label: ("t-SNE 1 (no unit)", "t-SNE 2 (no unit)") for g in chosen}, tsne_rows(chosen),
                          chosen))
        except ImportError:
            log("Fig. 9 (t-SNE) skipped: scikit-learn is not installed (pip install scikit-learn)")
        for key in dict.fromkeys(k for g in chosen for k, _ in g.variant):
            rows = sweep_rows(chosen, key, "top1", f"top-1 vs {key}")
            if len({r["x"] for r in rows}) > 1:
                plans.append((f"sweep_{slug(key)}_{where}", f"Figs. 10-13: top-1 against {key}, {place(task, setting)}",
                              "line", {f"top-1 vs {key}": (key, "top-1 (%)")}, rows, chosen))
    plans.append(("fig4_top1", "Fig. 4: top-1 (mean ± std over seeds)", "bar",
                  {g.task: ("teacher -> student (or the network trained alone)", "top-1 (%)") for g in groups},
                  [r for g in groups for r in bar_rows([g], "top1", g.task)], groups))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        log("figures skipped (CSVs written): matplotlib is not installed (pip install matplotlib)")
    written = []
    for stem, title, kind, axes_labels, rows, members in plans:
        if not rows:
            continue
        write_csv(out / f"{stem}.csv", rows)
        if plt is not None:
            commits = ", ".join(sorted({r.commit[:12] for g in members for r in g.runs}))
            draw(plt, out / f"{stem}.png", title, rows, kind, axes_labels,
                 f"{sum(len(g.runs) for g in members)} run folders; commit {commits}")
        log(f"wrote {out / stem}.{'png and .csv' if plt is not None else 'csv'}")
        written.append((stem, title, members))
    return written


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
def write_report(paths: list[str], out: str | Path, log=print, figures: bool = True) -> Path:
    """Tables and figures of the run folders under ``paths`` into ``out``; returns the tables.md path."""
    out = Path(out)
    inside = next((folder for folder in (out, *out.absolute().parents)
                   if any((folder / name).is_file() for name in runfolder.RESULT_FILES)), None)
    if inside is not None:
        raise ValueError(f"--out {out} is inside the run folder {inside}: a report is never written into a run "
                         f"folder; choose another --out")
    runs = find_runs([str(p) for p in paths], log)
    if not runs:
        raise FileNotFoundError(f"no usable run folder under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    log(f"{len(runs)} runs in {len(groups)} groups")
    paper = load_paper_values()
    written = make_figures(groups, out, log) if figures else []
    sections = [runs_table(groups), *top1_tables(groups, paper), *cost_tables(groups, paper),
                *side_by_side_tables([str(p) for p in paths], paper, log),
                *consistency_tables(groups, paper), *glue_table(groups, paper)]
    figure_rows = [[f"[{stem}.png]({stem}.png)", f"[csv]({stem}.csv)", title,
                    provenance(members)] for stem, title, members in written]
    sections.append("## Figures\n\n" + md_table(["figure", "numbers", "what", "from"], figure_rows))
    tables = out / "tables.md"
    tables.write_text(f"# Report\n\nMade by `report.py {' '.join(map(str, paths))}`. Mean ± sample standard "
                      f"deviation over seeds; `(n=k)` marks cells with fewer than 3 seeds. The paper's numbers come "
                      f"from `paper_values.yaml` (T = the paper's table).\n\n" + "\n\n".join(sections) + "\n")
    log(f"wrote {tables}")
    return tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_GLOB", help="run folders, folders above them, or globs")
    p.add_argument("--out", required=True, help="folder for tables.md, the PNGs and their CSVs")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables.md only")
    args = p.parse_args(argv)
    try:
        write_report(args.paths, args.out, figures=args.figures)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
