"""A run folder has one writer and is never overwritten by accident; a preempted run saves and says how
to continue.

- ``claim(out, ...)``: refuses a folder that already holds results unless the run resumes (or
  ``--overwrite`` deletes them deliberately), then holds an exclusive ``fcntl`` lock on ``<out>/.lock``
  for the whole run (rank 0 under torchrun). The OS releases the lock when the process dies, so a
  crashed run never leaves a stale lock; a second process is refused with the holder's pid and host.
- ``preemption_handlers()``: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before killing a job)
  only set a flag while a training loop runs (``graceful_stop``); the loop asks ``stop_agreed`` after each
  step, saves a checkpoint and raises ``Preempted``, which the command line turns into one line with the
  resume command. Outside a training loop (data loading, writing results) the run stops at once, with
  the same line.

Independent of the training loop (``engine``), which calls it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoints

LOCK_FILE = ".lock"
# What a run leaves in its folder; a folder holding any of the first ones has results to lose.
RESULT_FILES = ("last.pt", "best.pt", "summary.json", "stages.json", "metrics.jsonl")
OTHER_OUTPUTS = ("config.yaml", "outputs.pt", "teacher.pt")
OUTPUT_FOLDERS = ("anchors", "student", "teacher")   # RCO's anchors; GLUE's saved models
# Under torchrun the ranks agree on a stop every this many steps (one 1-element all-reduce), and at epoch ends.
STOP_CHECK_EVERY = 10
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class FolderBusy(ValueError):
    pass


class FolderHasResults(ValueError):
    pass


class Preempted(Exception):
    """The run stopped on a signal after saving its checkpoint; ``signum`` sets the exit status (128 + it)."""

    def __init__(self, message: str, signum: int, agreed: bool = True) -> None:
        super().__init__(message)
        self.signum = signum
        self.agreed = agreed   # every rank stops here (stop_agreed); False: only the rank the signal reached


# ----------------------------------------------------------------------------------------------
# One writer per folder
# ----------------------------------------------------------------------------------------------
_held: dict[Path, list] = {}   # folder -> [fd, claims]: this process's locks (a stage's folder may be its run's)


def existing_results(out: str | Path) -> list[str]:
    return [name for name in RESULT_FILES if (Path(out) / name).is_file()]


def check_fresh(out: str | Path, resume: bool | str, overwrite: bool) -> None:
    """A fresh start (no ``resume``) into a folder with results is refused unless ``overwrite``."""
    if resume and overwrite:
        raise FolderHasResults("--resume continues a run and --overwrite deletes it: give one of them")
    found = existing_results(out)
    if found and not resume and not overwrite:
        raise FolderHasResults(f"{out} already holds a run ({', '.join(found)}): add --resume to continue it, "
                               f"--overwrite to delete it and start afresh, or choose another --out")


def _lock(folder: Path) -> int:
    """An exclusive lock on ``folder/.lock`` (the file is removed on release, so the locked file must be the
    one at the path: a process that opened it just before its removal tries again)."""
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusy(f"{folder} is in use by {holder}: one run writes a run folder at a time (a second "
                             f"process would mix its results in); wait for it, or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            return fd
        os.close(fd)


def _release(folder: Path) -> None:
    entry = _held[folder]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        with contextlib.suppress(FileNotFoundError):
            (folder / LOCK_FILE).unlink()   # while still locked: see _lock
        os.close(entry[0])


@contextlib.contextmanager
def claim(out: str | Path, resume: bool | str = False, overwrite: bool = False, main: bool = True):
    """Hold ``out`` for a run: refuse it when it has results and the run neither resumes nor overwrites,
    or when another process holds it; with ``overwrite`` delete the previous run's outputs first. Only
    ``main`` (rank 0) takes the lock; under torchrun every rank raises rank 0's refusal. Claims of one
    process nest (a multi-stage run's last stage runs in the run's own folder)."""
    folder = Path(out).absolute()
    error = None
    if main:
        try:
            if folder in _held:   # the outer claim checked it (the last stage runs in its run's folder)
                _held[folder][1] += 1
            else:
                check_fresh(folder, resume, overwrite)
                folder.mkdir(parents=True, exist_ok=True)
                _held[folder] = [_lock(folder), 1]
                try:
                    check_fresh(folder, resume, overwrite)   # results a run finished between the check and the lock
                except FolderHasResults:
                    _release(folder)
                    raise
        except (FolderBusy, FolderHasResults, OSError) as err:   # raised on every rank, not on rank 0 alone
            error = err
    error = broadcast_object(error)
    if error is not None:
        raise error
    try:
        if main and overwrite and _held[folder][1] == 1:
            delete_outputs(folder)
        yield folder
    finally:
        if main:
            _release(folder)


def delete_outputs(folder: Path) -> None:
    """``--overwrite``: the files and folders a run writes, nothing else (a sweep's runs live below it)."""
    for name in (*RESULT_FILES, *OTHER_OUTPUTS):
        (folder / name).unlink(missing_ok=True)
    for name in OUTPUT_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (itself without a process group)."""
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]
    return obj


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------
_stop_signal: int | None = None
_training_loops = 0   # training loops of this process inside graceful_stop(): a signal waits for their next step
_stops_at_once = False   # inside stop_at_once(): a signal outside a training loop stops the run there


def request_stop(signum: int) -> None:
    """Remember the first stop signal (what the handler does inside a training loop; the seam tests drive)."""
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signum


def _on_signal(signum: int, frame) -> None:
    request_stop(signum)
    if _stops_at_once and not _training_loops:   # loading data, writing results: nothing to save yet
        raise Preempted(f"{signal.Signals(signum).name} outside the training loop: no new checkpoint", signum,
                        agreed=False)


@contextlib.contextmanager
def stop_at_once():
    """The run itself: inside, a stop signal outside a training loop raises ``Preempted`` at once; outside it
    (the command line reporting how the run ended) a signal is only recorded."""
    global _stops_at_once
    _stops_at_once = True
    try:
        yield
    finally:
        _stops_at_once = False


@contextlib.contextmanager
def graceful_stop():
    """Inside the block (a training loop), a stop signal only sets the flag that ``stop_agreed`` reads."""
    global _training_loops
    _training_loops += 1
    try:
        yield
    finally:
        _training_loops -= 1


def stop_requested() -> int | None:
    return _stop_signal


@contextlib.contextmanager
def preemption_handlers():
    """SIGTERM and SIGUSR1 set the stop flag inside the block (main thread only), instead of killing."""
    global _stop_signal
    _stop_signal = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_signal = None


def stop_agreed(world: int, device: torch.device, step: int | None = None) -> int | None:
    """The stop signal every rank acts on, or None. One process: the flag itself, at every step. Under
    torchrun, at every ``STOP_CHECK_EVERY``-th ``step`` (and ``step=None``: an epoch end) all ranks share
    their flags, so that they stop at the same step even when the signal reached only some of them."""
    if world == 1:
        return _stop_signal
    if step is not None and (step + 1) % STOP_CHECK_EVERY:
        return None
    flag = torch.tensor([_stop_signal or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = int(flag.item())   # one device-to-host read
    if agreed:
        request_stop(agreed)   # a rank the signal did not reach stops as well (and starts no further run)
    return _stop_signal if agreed else None


def resume_command() -> str:
    """This process's command line with ``--resume`` (and without ``--overwrite``)."""
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    if "--resume" not in args and not any(a.startswith("--resume=") for a in args):
        args.append("--resume")
    launcher = "torchrun ... " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python "
    return launcher + shlex.join([sys.argv[0], *args])


def write_failure(err: OSError, out: Path | None) -> str:
    """One line for a write that failed on the disk (full, read-only, no permission): the file, the reason
    and whether the run's previous checkpoint is intact."""
    where = err.filename or (out if out is not None else "the run folder")
    reason = err.strerror or os.strerror(err.errno or errno.EIO)
    if out is None or not (out / "last.pt").is_file():
        state = "no checkpoint was written yet"
    else:
        try:
            state = f"the previous checkpoint {out / 'last.pt'} is intact (epoch " \
                    f"{checkpoints.load_file(out / 'last.pt', 'checkpoint')['epoch']})"
        except (ValueError, OSError, KeyError):
            state = f"the previous checkpoint {out / 'last.pt'} is damaged too"
    return f"cannot write {where} ({reason}); {state}"
