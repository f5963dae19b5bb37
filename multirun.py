"""Several runs in one process (``--seeds``, ``--sweep``, ``--concurrent N``), interleaved step by step.

A run is a generator that yields after every training step and returns its summary (a script's
``run_steps``). The scheduler advances the active runs in turn, one step each. Every run keeps its own
random state (swapped in when the scheduler turns to it) and, on a GPU, its own CUDA stream, so that
one run's kernels or CUDA-graph replay overlap with the others' on the device while the host prepares
the next step. Models, optimisers, data and data order are the run's own, built by its generator, so
each run ends exactly as if it had run alone (``tests/test_multirun.py``: bit-identical on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
import traceback
import typing
from pathlib import Path

import torch

import checkpoints
import engine
import runfolder

GPU_CONCURRENCY = 8      # runs at once by default on a GPU (each holds its data set and models on the device)
BENCHMARK_COUNTS = (1, 2, 4, 8)


@dataclasses.dataclass
class Job:
    """One run: ``name`` tags its console lines; ``start()`` makes its generator (nothing runs before
    the scheduler first advances it)."""
    name: str
    start: typing.Callable[[], typing.Generator]


@dataclasses.dataclass
class _Active:
    index: int
    job: Job
    steps: typing.Generator
    stream: typing.Any = None
    rng: dict | None = None


class RunFailed(RuntimeError):
    """Runs failed and at least one on an unexpected error (a bug): each printed its traceback."""


class RunErrors(ValueError):
    """Several runs failed on bad input or a diverged loss, each said why in one line (a one-line error)."""


FINISHED = object()   # what Scheduler.advance returns for a run that has ended


def default_concurrency(device: str, world: int) -> int:
    """All runs one after another on a CPU or under torchrun, up to ``GPU_CONCURRENCY`` at once on one GPU."""
    return GPU_CONCURRENCY if world == 1 and engine.check_device(device).startswith("cuda") else 1


class Scheduler:
    """Round robin over at most ``concurrent`` runs; a finished run's slot goes to the next job."""

    def __init__(self, jobs: list[Job], concurrent: int, device: torch.device) -> None:
        if concurrent < 1:
            raise engine.ConfigError(f"--concurrent must be at least 1, got {concurrent}")
        self.pending = list(enumerate(jobs))
        self.concurrent = concurrent
        self.device = device
        self.active: list[_Active] = []
        self.current: _Active | None = None   # whose random state the process holds now
        self.results: dict[int, typing.Any] = {}
        self.failures: list[tuple[Job, Exception]] = []
        self.stopped: list[tuple[Job, runfolder.Preempted]] = []
        self.tagged = concurrent > 1 and len(jobs) > 1   # interleaved console lines say whose they are

    def _fill(self) -> None:
        while self.pending and len(self.active) < self.concurrent and not runfolder.stop_requested():
            index, job = self.pending.pop(0)
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.concurrent > 1 else None
            self.active.append(_Active(index, job, job.start(), stream))

    def advance(self, run: _Active):
        """One step of ``run``: what it yielded, or ``FINISHED`` when it has ended (its result or error kept)."""
        if self.current is not run:
            if self.current is not None:
                self.current.rng = checkpoints.rng_state()
            if run.rng is not None:
                checkpoints.set_rng_state(run.rng)
            self.current = run
        stream = torch.cuda.stream(run.stream) if run.stream is not None else contextlib.nullcontext()
        try:
            with engine.console_tag(f"[{run.job.name}] " if self.tagged else ""), stream:
                return next(run.steps)
        except StopIteration as done:
            self.results[run.index] = done.value
        except runfolder.Preempted as err:   # it saved its checkpoint; the others stop at their next step
            print(f"[{run.job.name}] stopped: {err}", file=sys.stderr, flush=True)
            self.stopped.append((run.job, err))
        except Exception as err:   # the other runs go on; the failure is raised when they have finished
            if engine.peer_failure(err):
                raise   # the process group is gone: no run of this process can go on
            if not engine.expected_failure(err):   # a bug: its traceback now, while the others go on
                traceback.print_exc()
            print(f"[{run.job.name}] failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            self.failures.append((run.job, err))
        self.active.remove(run)
        if self.current is run:
            self.current = None
        self._fill()
        return FINISHED

    def run(self, until: typing.Any = FINISHED) -> None:
        """Advance the runs in turn until each has yielded ``until`` (then it waits) or ended."""
        self._fill()
        waiting: list[_Active] = []
        while self.active and len(waiting) < len(self.active):
            for run in [r for r in self.active if r not in waiting]:
                yielded = self.advance(run)
                if until is not FINISHED and yielded is until:
                    waiting.append(run)

    def finish(self) -> list:
        self.run()
        if self.stopped or (self.pending and runfolder.stop_requested()):
            signum = runfolder.stop_requested()
            total = len(self.results) + len(self.failures) + len(self.stopped) + len(self.pending)
            raise runfolder.Preempted(f"{signal.Signals(signum).name}: {len(self.results)} of {total} runs finished, "
                                      f"{len(self.stopped)} stopped, {len(self.pending)} not started"
                                      + (f", {len(self.failures)} failed" if self.failures else ""), signum)
        if self.failures:
            job, err = self.failures[0]
            names = ", ".join(j.name for j, _ in self.failures)
            message = (f"{len(self.failures)} of {len(self.results) + len(self.failures)} runs failed ({names}); "
                       f"the first: {type(err).__name__}: {err}")
            if any(not engine.expected_failure(e) for _, e in self.failures):
                raise RunFailed(message) from err
            if len(self.failures) == 1:
                raise err   # one bad run: its own one-line error, as when run alone
            raise RunErrors(message)
        return [self.results[i] for i in sorted(self.results)]


def run_all(jobs: list[Job], concurrent: int, device: torch.device) -> list:
    """Run ``jobs``, at most ``concurrent`` at a time; their results in job order. A run that fails is
    reported at once and the others go on; then the failure is raised."""
    return Scheduler(jobs, concurrent, device).finish()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(make_jobs: typing.Callable[[int], list[Job]], counts: typing.Iterable[int], device: torch.device,
              out: str | Path) -> list[dict]:
    """Aggregate throughput of N concurrent runs for each N in ``counts``: ``make_jobs(n)`` gives n runs of
    ``engine.time_steps``; the clock runs from the moment all have finished their warm-up steps until the
    last has finished its timed steps. Prints a table and writes ``<out>/benchmark_concurrent.json``."""
    rows = []
    for n in counts:
        scheduler = Scheduler(make_jobs(n), n, device)
        scheduler.run(until=engine.WARM)
        _sync(device)
        started = time.perf_counter()
        results = scheduler.finish()
        _sync(device)
        seconds = time.perf_counter() - started
        images = sum(r["batch_size"] * r["steps"] for r in results)
        rows.append({"runs": n, "images_per_s": images / seconds, "seconds": seconds, "images": images,
                     "method": results[0]["method"], "batch_size": results[0]["batch_size"],
                     "cuda_graph": results[0]["cuda_graph"], "amp": results[0]["amp"],
                     "device": results[0]["device"]})
    one = rows[0]["images_per_s"]
    print(f"\n{rows[0]['method']}, batch {rows[0]['batch_size']} per run, {rows[0]['amp']}, "
          f"graph={rows[0]['cuda_graph']}, {rows[0]['device']}\n"
          "| concurrent runs | aggregate images/s | vs. 1 run | ms per step of each run |\n|---|---|---|---|")
    for r in rows:
        r["speedup"] = r["images_per_s"] / one
        per_step_ms = 1000 * r["seconds"] / (r["images"] / r["runs"] / r["batch_size"])
        print(f"| {r['runs']} | {r['images_per_s']:.0f} | {r['speedup']:.2f}x | {per_step_ms:.2f} |")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "benchmark_concurrent.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def compare(jobs: list[Job], device: torch.device, out: str | Path, reference: str | None = None,
            extra: dict[str, dict] | None = None) -> list[dict]:
    """Step time of several configurations measured side by side: ``jobs`` are runs of ``engine.time_steps``
    (their names label the rows), advanced in turn one step each, every timed step waiting for its device
    work, so that each row is timed over the same minutes and under the same load as the others. Prints a
    table with each row's ratio to ``reference`` (a job name; default the first) and writes
    ``<out>/benchmark_side_by_side.json`` (each row with ``extra[name]``, e.g. its task and setting); these
    ratios, never those of separately timed runs, are the ones to compare."""
    with engine.timed_side_by_side():
        results = Scheduler(jobs, len(jobs), device).finish()
    rows = [{"run": job.name, **result, **(extra or {}).get(job.name, {})} for job, result in zip(jobs, results)]
    base = next((r for r in rows if r["run"] == reference), rows[0])
    for r in rows:
        r["vs_reference"] = r["step_ms"] / base["step_ms"]
    first = rows[0]
    print(f"\nstep time measured side by side (interleaved one step each, {first['steps']} timed steps per run, "
          f"batch {first['batch_size']}, amp {first['amp'].removeprefix('torch.').lower()}, device {first['device']})\n"
          f"| run | ms/step | samples/s | ÷ {base['run']} | updated params (M) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['step_ms']:.2f} | {r['images_per_s']:.0f} | {r['vs_reference']:.2f} | "
              f"{r['updated_params'] / 1e6:.3f} |")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "benchmark_side_by_side.json").write_text(json.dumps({"reference": base["run"], "rows": rows},
                                                                      indent=2) + "\n")
    return rows
