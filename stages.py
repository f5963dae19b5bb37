"""Multi-stage methods (TAKD, SFTN): a list of ordinary runs, each in its own folder, resumable inside
any stage. ``distillers.STAGED_METHODS`` lists the stages of each method; a script runs them with
``run_stages`` and its own ``run_steps``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch.distributed as dist

from engine import ConfigError, RunLog


@dataclasses.dataclass(frozen=True)
class Stage:
    """One run of a multi-stage method. ``name`` is its sub-folder of the run folder; the last stage runs
    in the run folder itself. ``trains`` says which network the stage produces for later stages
    (``student``: its student, ``teacher``: its trained teacher); ``teacher_from`` names the earlier stage
    whose network teaches this one (None: the run's teacher); ``student`` picks the network the stage
    trains (``student`` or ``assistant``)."""
    name: str
    method: str
    trains: str = "student"
    teacher_from: str | None = None
    student: str = "student"


STAGES_FILE = "stages.json"


def run_stages(cfg, stages: list[Stage], stage_config, run_one, resume: bool, log: RunLog, overwrite: bool = False):
    """Run ``stages`` in order, yielding after every training step; ``run_one(stage_cfg, resume, overwrite)``
    is a generator of one stage's steps that returns its summary (each stage holds its own folder).

    ``stage_config(cfg, stage, out, source)`` makes a stage's config, running into ``out``; ``source`` is
    ``(run folder, Stage)`` of the stage named by ``teacher_from`` (None when there is none).
    ``<out>/stages.json`` records finished stages: with ``resume`` they are skipped and the first
    unfinished one continues from its own ``last.pt`` (or starts, when it has none). Returns
    the last stage's summary with ``updated_params`` and ``train_time_s`` summed over the stages and
    ``stages`` (per stage: run folder, updated params, train time, top-1).
    """
    if getattr(cfg, "benchmark_steps", 0):
        raise ConfigError(f"--benchmark-steps times one run; {cfg.method} runs {len(stages)} stages: benchmark "
                          f"their methods ({', '.join(s.method for s in stages)}) one by one")
    out = Path(cfg.out)
    record = out / STAGES_FILE
    done: dict = json.loads(record.read_text()) if resume and record.is_file() else {}
    folders = {s.name: str(out / s.name) for s in stages[:-1]}
    folders[stages[-1].name] = str(out)
    by_name = {s.name: s for s in stages}
    summary: dict = {}
    for i, stage in enumerate(stages):
        if stage.name in done:
            log.print(f"stage {i + 1}/{len(stages)} ({stage.name}): finished earlier, skipped")
            summary = done[stage.name]["summary"]
            continue
        source = (folders[stage.teacher_from], by_name[stage.teacher_from]) if stage.teacher_from else None
        stage_cfg = stage_config(cfg, stage, folders[stage.name], source)
        stage_resume = resume and (Path(stage_cfg.out) / "last.pt").is_file()
        log.print(f"stage {i + 1}/{len(stages)} ({stage.name}): {stage.method} into {stage_cfg.out}"
                  + (" (resumed)" if stage_resume else ""))
        # Under --resume a stage without a checkpoint yet starts afresh in its folder (open_run says so).
        summary = yield from run_one(stage_cfg, resume=bool(resume), overwrite=overwrite)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()   # the next stage loads what rank 0 has just written
        done[stage.name] = {"out": stage_cfg.out, "method": stage.method, "summary": summary}
        if log.enabled:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{STAGES_FILE}.tmp"
            tmp.write_text(json.dumps(done, indent=2) + "\n")
            os.replace(tmp, record)
    per_stage = {name: {"out": d["out"], "method": d["method"], "updated_params": d["summary"]["updated_params"],
                        "train_time_s": d["summary"]["train_time_s"], "top1": d["summary"]["top1"],
                        "teacher_top1": d["summary"].get("teacher_top1")}
                 for name, d in done.items()}
    total = {**summary, "method": cfg.method, "teacher": cfg.teacher, "stages": per_stage,
             "updated_params": sum(d["updated_params"] for d in per_stage.values()),
             "train_time_s": sum(d["train_time_s"] for d in per_stage.values())}
    log.write_summary(total)
    return total
