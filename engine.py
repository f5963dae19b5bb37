"""Plumbing shared by the training scripts: config, torchrun/DDP, RNG, checkpoints, logs, progress.

Everything here is method- and data-agnostic; the scripts read top to bottom and call into it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import random
import signal
import sys
import time
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

import checkpoints
import runfolder


# ----------------------------------------------------------------------------------------------
# Config: one dataclass per script; YAML file, then --set key=value, then dedicated flags.
# ----------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    pass


def _coerce(name: str, value, hint):
    """Check ``value`` against the dataclass field type ``hint`` (int -> float widening allowed)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, item) for v in value]
    if hint is float:
        # PyYAML reads "1e-4" (no dot) as a string: accept any spelling float() accepts.
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def build_config(cls, path: str | None = None, sets: list[str] | None = None, overrides: dict | None = None):
    """Make a ``cls`` dataclass from a YAML file, ``key=value`` strings and explicit overrides.

    Unknown keys are an error that lists the valid ones; values are type-checked.
    """
    hints = typing.get_type_hints(cls)
    values: dict = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(err)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of key: value, got {type(loaded).__name__}")
        values.update(loaded)
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: not a YAML value ({_yaml_problem(err)})") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.pop("git_commit", None)   # provenance in a run folder's config.yaml, so that it loads back as a config
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(hints))}")
    cfg = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    check_values(cfg)
    return cfg


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(err, "problem", None) or err).strip().splitlines()[0]


# Ranges of the config keys the scripts share (a key a script lacks is skipped), checked before anything
# is written, so that a rejected value leaves a run folder as it was.
AT_LEAST_ONE = ("epochs", "batch_size", "eval_batch_size", "log_every", "eval_every", "grad_accum", "bottleneck",
                "image_size")
NOT_NEGATIVE = {"save_every": "a number of steps (0: only at epoch ends)", "limit_batches": "a number of batches "
                "(0: all)", "train_subset": "a number of training rows (0: all)", "eval_subset": "a number of "
                "dev rows (0: all)", "benchmark_steps": "a number of steps (0: train)", "workers": "a number of "
                "processes", "warmup_epochs": "a number of epochs", "lr": "a learning rate", "teacher_lr":
                "a learning rate", "adapter_lr": "a learning rate", "weight_decay": "a weight", "w_tce": "a loss "
                "weight", "w_tkl": "a loss weight", "w_ce": "a loss weight", "feat_weight": "a loss weight"}
UNIT_INTERVAL = {"alpha": "the KL weight; the student's CE weight defaults to 1 - alpha", "momentum": "SGD momentum"}
POSITIVE = {"tau": "a temperature", "lr_decay": "the lr factor at each milestone"}
GRAD_ACCUM_RESETS = ("run", "epoch")   # how grad_accum counts batches: across epochs, or within each
CHOICES = {"lr_schedule": ("step", "cosine", "linear"), "amp": ("auto", "bf16", "none"),
           "backend": ("auto", "torch", "triton"), "teacher_bn": ("eval", "train"),
           "student_target": ("adapted", "unadapted"), "teacher_kl": ("paper", "official"),
           "crd_negatives": ("other_class", "uniform"), "teacher_params": ("adapters", "all"),
           "grad_accum_reset": GRAD_ACCUM_RESETS}


def check_values(cfg) -> None:
    """Every range and name ``cfg`` must satisfy (a one-line ConfigError naming the key and the value)."""
    values = config_dict(cfg)

    def given(key: str) -> bool:
        return values.get(key) is not None
    for key in AT_LEAST_ONE:
        if given(key) and values[key] < 1:
            raise ConfigError(f"{key} must be at least 1, got {values[key]}")
    for key, what in NOT_NEGATIVE.items():
        if given(key) and values[key] < 0:
            raise ConfigError(f"{key} must be {what} >= 0, got {values[key]}")
    for key, what in UNIT_INTERVAL.items():
        if given(key) and not 0 <= values[key] <= 1:
            raise ConfigError(f"{key} must lie in [0, 1] ({what}), got {values[key]}")
    for key, what in POSITIVE.items():
        if given(key) and not values[key] > 0:
            raise ConfigError(f"{key} must be {what} > 0, got {values[key]}")
    for key, names in CHOICES.items():
        if given(key) and values[key] not in names:
            raise ConfigError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {values[key]!r}")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Flags that are not config keys; every other flag is a config override.
_RUN_FLAGS = ("config", "set", "resume", "overwrite")


def arg_parser(doc: str, configs: str, flags: list[tuple[str, type, str]]) -> argparse.ArgumentParser:
    """The command line every script shares: --config, --set, --resume, --no-label-adjust, and one
    ``--name`` flag (with its one-line help) per entry of ``flags`` for the most used config keys."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML file of config keys (see {configs})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable); unknown keys are an error")
    for flag, kind, text in flags:
        p.add_argument(f"--{flag}", type=kind, help=text)
    p.add_argument("--no-label-adjust", dest="label_adjust", action="store_false", default=None,
                   help="no label adjustment (the paper's dagger rows)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from <out>/last.pt, or from PATH (a checkpoint or a run folder, which "
                        "then becomes the output folder); a run without a checkpoint yet starts afresh")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the results of an earlier run in the output folder and start afresh (without it, "
                        "a folder with results is refused unless --resume continues it)")
    return p


def parse_config(cls, parser: argparse.ArgumentParser, argv=None, actions: tuple[str, ...] = ()):
    """Parse the command line into a ``cls`` config; ``actions`` are the script's own non-config flags.

    Returns ``(cfg, args)``; ``args.overrides`` holds the flags given as config values. With
    ``--resume PATH`` and no ``--out``, the outputs go to PATH's run folder (a moved run continues there).
    """
    args = parser.parse_args(argv)
    args.overrides = {k: v for k, v in vars(args).items() if k not in (*_RUN_FLAGS, *actions) and v is not None}
    if isinstance(args.resume, str) and "out" not in args.overrides:
        folder = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        args.overrides["out"] = str(folder)
    return build_config(cls, args.config, args.set, args.overrides), args


# The run folder of the run in progress, named when the run is interrupted (Ctrl-C).
_current_run: Path | None = None


# Write failures that are the disk's or the folder's, not the code's: one line, not a traceback.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
               errno.EEXIST)


def expected_failure(err: BaseException) -> bool:
    """A failure of the input, the data, the disk or the training (not of the code): what ``cli`` reports in
    one line, and what ``multirun`` lets the other runs go on after without a traceback."""
    return isinstance(err, (ValueError, FileNotFoundError, IsADirectoryError, NonFiniteLoss, FloatingPointError)) \
        or (isinstance(err, OSError) and err.errno in DISK_ERRORS)


def cli(body) -> int:
    """Run ``body()``; bad input of any kind is one line on stderr and exit status 2, never a traceback.
    Ctrl-C is one line naming the last checkpoint and how to continue (exit status 130); SIGTERM or SIGUSR1
    (preemption) one line with the command that continues from the checkpoint saved on it (128 + signal)."""
    # The handlers stay until the outcome's line is printed: a signal while a failure is being reported (torchrun
    # stopping the survivors of a dead rank) is only recorded, so that the failure's line comes first.
    with runfolder.preemption_handlers():
        finished = False
        try:
            with runfolder.stop_at_once():
                body()
            finished = True
        except runfolder.Preempted as err:
            # Ranks that agreed on the stop close the process group together; a rank stopped alone (a signal
            # outside the training loop) must not wait in a barrier the others never reach.
            finished = err.agreed
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"stopped: {err}; continue with: {runfolder.resume_command()}", file=sys.stderr)
            return 128 + err.signum
        except (ValueError, FileNotFoundError, IsADirectoryError, NonFiniteLoss, FloatingPointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:
            if err.errno not in DISK_ERRORS:
                raise
            print(f"error: {runfolder.write_failure(err, _current_run)}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            if not peer_failure(err):
                raise
            reason = str(err).strip().splitlines()[0]
            print(f"error: another process of this torchrun job stopped ({reason[:160]}); "
                  f"{_resume_hint(_current_run)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted: {_resume_hint(_current_run)}", file=sys.stderr)
            return 130
        finally:
            shutdown_distributed(synchronize=finished)
    return 0


def peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank died (its node lost, killed): the run, not the code."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "gloo/transport",
                                  "NCCL communicator was aborted", "ProcessGroupNCCL"))


def _resume_hint(out: Path | None) -> str:
    if out is None:
        return "no run had started"
    if (out / "last.pt").is_file():
        return f"the last checkpoint is {out / 'last.pt'}; the same command plus --resume continues from it"
    return f"no checkpoint in {out} yet; the same command plus --resume starts afresh"


def _checkpoint_state(out: Path) -> str:
    """What a failed run leaves to continue from, for its one-line error."""
    if (out / "last.pt").is_file():
        return f"the last checkpoint {out / 'last.pt'} is left intact"
    return "no checkpoint was written yet (the run starts afresh under --resume)"


# ----------------------------------------------------------------------------------------------
# Data: one search for every script
# ----------------------------------------------------------------------------------------------
class DataNotFound(FileNotFoundError):
    pass


SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"   # beside the checkout


def data_places(subfolder: str, legacy_env: str | None = None) -> list[Path]:
    """Where a script looks for its data set, in order: ``$<legacy_env>`` (the folder itself, as before the
    search was shared), ``$PESF_DATA/<subfolder>``, ``./data/<subfolder>``, then ``shared/data/<subfolder>``
    beside the checkout (where the project's development machines keep the real data)."""
    places = [Path(os.environ[legacy_env])] if legacy_env and os.environ.get(legacy_env) else []
    if os.environ.get("PESF_DATA"):
        places.append(Path(os.environ["PESF_DATA"]) / subfolder)
    places += [Path("data") / subfolder, SHARED_DATA / subfolder]
    return list(dict.fromkeys(places))


def find_data(given: str | None, places: list[Path], required: list[str], what: str, how_to_get: str,
              download: bool = False) -> Path:
    """The first of ``places`` (only ``given`` when the user named a folder) that holds every path of
    ``required``. When none does: with ``download`` the first place (to download into), otherwise a
    ``DataNotFound`` whose one line lists every place looked and ``how_to_get``."""
    places = [Path(given)] if given else places
    for place in places:
        if all((place / name).exists() for name in required):
            return place
    if download:
        return places[0]
    looked = ", ".join(str(place) if place.is_absolute() else f"./{place}" for place in places)
    raise DataNotFound(f"{what} not found: looked for {' and '.join(required)} in {looked}; {how_to_get}")


# ----------------------------------------------------------------------------------------------
# torchrun / DDP
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_device(device: str) -> str:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or CUDA without a
    usable GPU, is a one-line ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no usable CUDA GPU (no driver or no device); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_cuda_graph(cuda_graph: bool | None, dist_info: Dist) -> None:
    """A graphed step needs one process on a CUDA device: a captured DDP step would capture NCCL's all-reduce
    (with the loader's pin-memory thread running), and one rank falling back to eager could hang the others."""
    if cuda_graph and (dist_info.device.type != "cuda" or dist_info.world > 1):
        raise ConfigError("cuda_graph needs one process on a CUDA device (DDP's all-reduce is not captured)")


def init_distributed(device: str = "auto") -> Dist:
    """Set up the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    device = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank if device == "cuda" else int(device.split(":")[1]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` stacked in rank order (``t[None]`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, t)
        return torch.stack(rows)
    return t[None]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def resolve_amp(amp: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """``amp`` config value -> (resolved name, autocast dtype): ``auto`` is bf16 on CUDA, none elsewhere."""
    if amp not in ("auto", "bf16", "none"):
        raise ConfigError(f"amp must be auto, bf16 or none, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return amp, (torch.bfloat16 if amp == "bf16" else None)


def shutdown_distributed(synchronize: bool = True) -> None:
    """Tear the process group down. ``synchronize`` first waits for every rank: a gloo rank that closes
    its connections while rank 0 is still writing results can abort the peer (SIGABRT). After an error
    there is no barrier, since the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Start of a run: seeding, and the checkpoint to continue from (the files themselves: checkpoints.py)
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator; ``deterministic`` (config key) also makes a GPU run repeat itself bit for bit on the
    same card and versions: deterministic algorithms (an op without one warns once and stays as it is) and a
    fixed cuBLAS workspace, which cuBLAS reads when it starts (before the first matrix product)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def claim_run_folder(cfg, resume: bool | str, overwrite: bool, dist_info: Dist):
    """The run folder, held for the run (``runfolder.claim``: refused when another process writes it, or
    when it holds results and the run neither resumes nor overwrites); a benchmark writes only
    ``benchmark.json`` and claims nothing."""
    global _current_run
    if cfg.benchmark_steps:
        return contextlib.nullcontext()
    _current_run = Path(cfg.out)
    return runfolder.claim(cfg.out, resume, overwrite, dist_info.main)


def open_run(resume: bool | str, log: "RunLog") -> Path | None:
    """Start of a run in ``log.out``: remove temporaries of killed checkpoint writes, then find the
    checkpoint to continue from: ``resume`` True means ``<out>/last.pt`` (none yet: a fresh start, with
    a note), a string a checkpoint file or run folder (which must exist). None: start afresh."""
    global _current_run
    _current_run = log.out
    if log.enabled:
        for tmp in checkpoints.remove_stale_temporaries(log.out):
            log.print(f"removed {tmp}, left by an interrupted checkpoint write")
    if not resume:
        return None
    if isinstance(resume, str):
        path = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        return path
    path = log.out / "last.pt"
    if not path.is_file():
        log.print(f"note: --resume, but {log.out} has no checkpoint yet: starting afresh")
        log.truncate_metrics(0)   # rows of an epoch whose checkpoint was never written
        return None
    return path


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule: base lr per parameter group, all scaled by one factor
# ----------------------------------------------------------------------------------------------
def lr_factor(epoch: float, epochs: int, schedule: str, milestones: list[int], decay: float,
              warmup_epochs: float = 0.0, step_size: float = 1.0) -> float:
    """Factor applied to every group's base lr for the step that starts at (fractional) ``epoch``.

    ``step_size`` is the length of one lr update in epochs (1 when the lr is set once per epoch);
    the linear warm-up reaches 1 on the last update inside ``warmup_epochs`` and never gives 0.
    """
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return min(1.0, (epoch + step_size) / warmup_epochs)
    if schedule == "step":
        return decay ** sum(epoch >= m for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
    if schedule == "linear":   # BERT fine-tuning: linear decay to 0 after the warm-up
        return max(0.0, (epochs - epoch) / max(epochs - warmup_epochs, 1e-9))
    raise ConfigError(f"lr_schedule must be 'step', 'cosine' or 'linear', got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, factor: float, overwrite: bool = False) -> None:
    """Every group's base lr times ``factor``; with ``overwrite``, once the schedule has decayed (factor < 1),
    every group gets the student's scheduled lr instead (the authors' ``adjust_learning_rate``, cv/helper/util.py)."""
    student = next((g["base_lr"] for g in optimizer.param_groups if g.get("name") == "student"), None)
    for group in optimizer.param_groups:
        base = student if overwrite and factor < 1 and student is not None else group["base_lr"]
        group["lr"] = base * factor


# ----------------------------------------------------------------------------------------------
# Logs: config.yaml, metrics.jsonl, summary.json in the run folder; console on rank 0
# ----------------------------------------------------------------------------------------------
@functools.cache   # the first call's answer: later runs of one process (quickstart, sweeps) run the code it loaded
def git_commit() -> str:
    """The commit of this checkout, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    import subprocess
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


_console_tag = ""   # "[run] " while multirun interleaves several runs' console lines


@contextlib.contextmanager
def console_tag(tag: str):
    """Prefix this process's run console lines (logs, progress) with ``tag`` inside the block."""
    global _console_tag
    previous, _console_tag = _console_tag, tag
    try:
        yield
    finally:
        _console_tag = previous


class RunLog:
    def __init__(self, out: str | Path, enabled: bool = True) -> None:
        self.out = Path(out)
        self.enabled = enabled
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)

    def print(self, *args) -> None:
        if self.enabled:
            print(_console_tag + " ".join(map(str, args)), flush=True)

    def write_config(self, cfg: dict) -> None:
        if self.enabled:
            (self.out / "config.yaml").write_text(yaml.safe_dump({**cfg, "git_commit": git_commit()}, sort_keys=False))

    def append_metrics(self, row: dict) -> None:
        """One whole line per record, on the disk before the epoch's checkpoint (a crash tears at most it)."""
        if self.enabled:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, drop rows of epochs after the checkpoint (they are trained again) and a torn last line
        (a crash while appending), with a note; any other unreadable line is an error naming it."""
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                epoch = json.loads(line)["epoch"]
            except (ValueError, KeyError, TypeError):
                if number < len(lines):
                    raise ConfigError(f"{path}, line {number}: not a metrics record ({line[:60]!r}); "
                                      f"remove the line to resume") from None
                self.print(f"note: dropped the torn last line of {path} (a crash while it was written)")
                continue
            if epoch <= epochs_done:
                rows.append(line)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, path)

    def write_summary(self, summary: dict, name: str = "summary.json") -> None:
        if self.enabled:
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.out / name)


# Runs of about the same size that follow the current one in this process (the quickstart's students),
# so that the ETA covers them too.
_runs_to_follow = 0


def expect_more_runs(count: int) -> None:
    global _runs_to_follow
    _runs_to_follow = count


class Progress:
    """One console line per ``every`` steps with rate and ETA for the whole run and for the ``runs_after``
    runs of its size that follow it; the rate is wall time, so evaluation is counted in."""

    def __init__(self, total_steps: int, log: RunLog, every: int = 50, runs_after: int = 0) -> None:
        self.total = total_steps
        self.log = log
        self.every = max(1, every)
        self.runs_after = runs_after
        self.start = time.perf_counter()
        self.done = 0

    def step(self, epoch: int, epochs: int, i: int, n: int, loss: float | None = None) -> None:
        self.done += 1
        if not self.log.enabled or (i + 1) % self.every and i + 1 != n:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done + self.runs_after * self.total) / max(rate, 1e-9)
        msg = f"epoch {epoch + 1}/{epochs} [{i + 1}/{n}] {1000 / rate:.1f} ms/step, ETA {_hms(eta)}"
        if self.runs_after:
            msg += f" (this and {self.runs_after} more run{'s' if self.runs_after > 1 else ''})"
        if loss is not None:
            msg += f", loss {loss:.4f}"
        print(_console_tag + msg, file=sys.stdout, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# The training step: eager, or the whole step (forward, backward, optimiser) in one CUDA graph
# ----------------------------------------------------------------------------------------------
class CudaGraphs:
    """What a graphed step needs from CUDA: a side stream for the warm-up steps and the capture, and the
    capture itself. The capture waits for this run's stream only (never the whole device, which would
    stall the other runs of this process) and leaves the caching allocator alone (``torch.cuda.graph``
    empties it, giving back every concurrent run's cached blocks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def on_side_stream(self):
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            yield
        main.wait_stream(self.side)

    def used_on_current_stream(self, tensor: torch.Tensor) -> None:
        """``tensor`` was made on the side stream and is read (and freed) on the run's stream."""
        tensor.record_stream(torch.cuda.current_stream(self.device))

    def capture(self, step: typing.Callable[[], torch.Tensor]) -> typing.Callable[[], torch.Tensor]:
        """Capture ``step`` once; the returned function replays it and returns the captured output."""
        graph = torch.cuda.CUDAGraph()
        with self.on_side_stream():
            graph.capture_begin()
            try:
                out = step()
            finally:
                graph.capture_end()
        return lambda: (graph.replay(), out)[1]


class EagerGraphs:
    """Stands in for ``CudaGraphs`` without a GPU (tests patch ``engine.graph_backend``): the graphed step's
    own bookkeeping (static inputs, the optimiser reading its lr from tensors, capture once per shape)
    runs on a CPU, with "replay" running the captured function again eagerly."""

    def __init__(self) -> None:
        self.captures = 0

    def on_side_stream(self):
        return contextlib.nullcontext()

    def used_on_current_stream(self, tensor: torch.Tensor) -> None:
        pass

    def capture(self, step: typing.Callable[[], torch.Tensor]) -> typing.Callable[[], torch.Tensor]:
        self.captures += 1
        return step


def graph_backend(device: torch.device) -> CudaGraphs | None:
    """How this device captures a step; None: it cannot (the step runs eagerly)."""
    return CudaGraphs(device) if device.type == "cuda" else None


class TrainStep:
    """Runs ``loss_fn(x, y, index) -> (logits, {name: loss})``, backward and the optimiser step.

    Returns the detached losses stacked as ``[total, *terms]`` (names in ``self.names``), left on
    the device so that the caller decides when to synchronise. With ``cuda_graph`` the first
    ``warmup`` calls run eagerly on a side stream, then the whole step is captured once per input
    shape and replayed. A graph replays fixed kernels with fixed arguments, so the captured optimiser
    step reads each group's lr from a device tensor (SGD's fused step takes a tensor lr), written in
    place before a replay when the schedule changed it: a graphed run follows the same per-step
    schedule as an eager one. At batch 64 the eager step is bound by kernel launches on the CPU; one
    graph replay removes that (SPEC sec. 6).
    """

    def __init__(self, loss_fn, optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None,
                 device: torch.device, cuda_graph: bool = False, warmup: int = 3, grad_accum: int = 1,
                 grad_accum_reset: str = "run") -> None:
        self.graphs = graph_backend(device) if cuda_graph else None
        if grad_accum < 1 or (grad_accum > 1 and self.graphs is not None):
            raise ConfigError(f"grad_accum must be >= 1 and needs cuda_graph off when > 1, got {grad_accum}")
        if grad_accum_reset not in GRAD_ACCUM_RESETS:
            raise ConfigError(f"grad_accum_reset must be {' or '.join(GRAD_ACCUM_RESETS)}, got {grad_accum_reset!r}")
        if self.graphs is not None and not isinstance(optimizer, torch.optim.SGD):
            raise ConfigError(f"cuda_graph needs SGD (its fused step reads the lr from a tensor), "
                              f"got {type(optimizer).__name__}")
        self.loss_fn = loss_fn
        self.grad_accum = grad_accum
        self.grad_accum_reset = grad_accum_reset
        self.pending = 0    # batches whose gradients are summed but not yet applied
        self.optimizer = optimizer
        self.amp_dtype = amp_dtype
        self.device = device
        self.warmup = warmup
        self.names: list[str] | None = None
        self.calls = 0
        self.replays: dict[tuple, tuple] = {}   # input shapes -> (static inputs, replay)
        self.lr_tensors: list[torch.Tensor] = []
        self.lr_written: list[float] = []

    @property
    def cuda_graph(self) -> bool:
        return self.graphs is not None

    def _step(self, x, y, index, update: bool = True) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=not self.cuda_graph):
            _, losses = self.loss_fn(x, y, index)
        if self.names is None:
            self.names = ["loss", *losses]
        total = sum(losses.values())
        total.backward()
        if update:
            self.optimizer.step()
        return torch.stack([total.detach(), *(v.detach().float() for v in losses.values())])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """``batch``: the batch's position in its epoch (``grad_accum_reset: epoch`` counts by it)."""
        self.calls += 1
        if self.graphs is None:
            # grad_accum: the gradients of N calls are summed before a step. "run" counts calls across epochs;
            # "epoch" steps after batches N, 2N, ... of each epoch, as the authors' ``(idx + 1) % 4`` with idx
            # from the epoch's enumerate: an epoch's remainder joins the next epoch's first step.
            if self.pending == 0:
                self.optimizer.zero_grad(set_to_none=True)
            count = batch + 1 if self.grad_accum_reset == "epoch" and batch is not None else self.calls
            update = count % self.grad_accum == 0
            self.pending = 0 if update else self.pending + 1
            return self._step(x, y, index, update=update)
        if self.calls <= self.warmup:
            with self.graphs.on_side_stream():
                self.optimizer.zero_grad(set_to_none=True)
                out = self._step(x, y, index)
            self.graphs.used_on_current_stream(out)
            return out
        shapes = (x.shape, y.shape, index.shape)
        if shapes not in self.replays:
            try:
                self.replays[shapes] = self._capture(x, y, index)
            except Exception as exc:  # an op, GPU or driver that cannot be captured: eager beats a crash
                self._capture_failed(exc)
                self.optimizer.zero_grad(set_to_none=True)
                return self._step(x, y, index)
        static, replay = self.replays[shapes]
        for buffer, value in zip(static, (x, y, index)):
            buffer.copy_(value)
        self._write_lr()
        return replay().clone()

    def _write_lr(self) -> None:
        """Copy each group's scheduled lr into the tensor the captured step reads, when it changed (a fill
        on the device: no host-to-device copy, no synchronisation)."""
        for i, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.lr_written[i]:
                self.lr_tensors[i].fill_(group["lr"])
                self.lr_written[i] = group["lr"]

    @contextlib.contextmanager
    def _tensor_lr(self):
        """Inside: the optimiser reads its lr from ``lr_tensors`` (SGD's fused step); outside, the groups keep
        plain floats, so the schedule, the logs and the checkpoints see what an eager run's do."""
        groups = self.optimizer.param_groups
        saved = [(g["lr"], g["fused"], g["foreach"]) for g in groups]
        for group, lr in zip(groups, self.lr_tensors):
            group.update(lr=lr, fused=True, foreach=False)
        try:
            yield
        finally:
            for group, (lr, fused, foreach) in zip(groups, saved):
                group.update(lr=lr, fused=fused, foreach=foreach)

    def _captured_step(self, x, y, index) -> torch.Tensor:
        # A replay overwrites the gradients the capture allocated, as a step from no gradients would.
        self.optimizer.zero_grad(set_to_none=True)
        with self._tensor_lr():
            return self._step(x, y, index)

    def _capture_failed(self, exc: Exception) -> None:
        # A failed capture executes nothing on the device, so the run continues eagerly from here.
        self.graphs, self.replays = None, {}
        lines = str(exc).strip().splitlines()
        warnings.warn(f"CUDA-graph capture of the training step failed ({type(exc).__name__}: "
                      f"{lines[0] if lines else ''}); running the step eagerly", RuntimeWarning, stacklevel=3)

    def _capture(self, x, y, index) -> tuple:
        if not self.lr_tensors:
            groups = self.optimizer.param_groups
            self.lr_tensors = [torch.full((), g["lr"], dtype=torch.float32, device=self.device) for g in groups]
            self.lr_written = [g["lr"] for g in groups]
        static = (x.clone(), y.clone(), index.clone())
        return static, self.graphs.capture(lambda: self._captured_step(*static))


# ----------------------------------------------------------------------------------------------
# Distiller plumbing: optimiser groups, DDP wrapping, state
# ----------------------------------------------------------------------------------------------
def param_groups(distiller) -> list[dict]:
    """The distiller's groups, each remembering its base lr (the schedule scales it, never replaces it)."""
    groups = distiller.param_groups()
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def wrap_ddp(distiller, dist_info: Dist) -> None:
    """Wrap only the trained children (student, trained teacher, extra heads) in DDP."""
    ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    for name in distiller.trainable_module_names():
        module = getattr(distiller, name)
        setattr(distiller, name, torch.nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                                           broadcast_buffers=False))


def average_buffers(distiller, dist_info: Dist) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of the trained children over ranks.

    DDP runs with ``broadcast_buffers=False``, so each rank's running statistics follow its own data
    shard; averaged before evaluation and checkpoints, every rank evaluates, and rank 0 saves, one model."""
    if dist_info.world <= 1:
        return
    names = list(distiller.trainable_module_names())
    if distiller.teacher is not None and "teacher" not in names and getattr(distiller.cfg, "teacher_bn", "") == "train":
        names.append("teacher")   # a frozen teacher on batch statistics updates its running statistics too
    buffers = [b for name in names for b in unwrap(getattr(distiller, name)).buffers() if b.is_floating_point()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):   # the same order on every rank
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        dist.all_reduce(flat)
        flat /= dist_info.world
        for b, avg in zip(same, flat.split([b.numel() for b in same])):
            b.copy_(avg.view_as(b))


def distiller_state(distiller) -> dict:
    return {name: unwrap(child).state_dict() for name, child in distiller.named_children()}


def load_distiller_state(distiller, state: dict) -> None:
    for name, child in distiller.named_children():
        unwrap(child).load_state_dict(state[name])


# ----------------------------------------------------------------------------------------------
# Evaluation: student and teacher accuracy (and F1 for two classes), consistency metrics
# ----------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


class EvalOutputs:
    """The last evaluation's outputs, saved as ``outputs.pt`` in the run folder for report.py's figures.

    A dict: ``index`` (int64 [R], the rows' positions in the test/dev set, sorted), ``labels`` (int64 [R]),
    ``student_logits`` / ``teacher_logits`` (float16 [R, K]) and ``student_features`` / ``teacher_features``
    (float16 [R, D], the pooled penultimate features; teacher entries only when there is a teacher) and
    ``rows_total``. When all rows would exceed ``OUTPUTS_BYTES``, every k-th row (by index) is kept.
    """

    OUTPUTS_BYTES = 8 * 2**20

    def __init__(self) -> None:
        self.parts: list[dict[str, torch.Tensor]] = []

    def add(self, index: torch.Tensor, labels: torch.Tensor, student_logits: torch.Tensor,
            student_features: torch.Tensor, teacher_logits: torch.Tensor | None,
            teacher_features: torch.Tensor | None) -> None:
        part = {"index": index, "labels": labels, "student_logits": student_logits,
                "student_features": student_features, "teacher_logits": teacher_logits,
                "teacher_features": teacher_features}
        self.parts.append({k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
                           for k, v in part.items() if v is not None})

    def save(self, path: str | Path, dist_info: Dist) -> None:
        """Gather every rank's rows (collective: call on all ranks); rank 0 writes ``path``."""
        parts = self.parts
        if dist_info.world > 1:
            gathered: list = [None] * dist_info.world
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        if not dist_info.main or not parts:
            return
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        # DDP may pad a shard with repeated rows: keep each index once, in set order.
        index, first = np.unique(out["index"].numpy(), return_index=True)
        keep = torch.from_numpy(first)
        row_bytes = sum(v[0].numel() * v.element_size() for v in out.values())
        stride = max(1, math.ceil(len(keep) * row_bytes / self.OUTPUTS_BYTES))
        keep = keep[::stride]
        out = {k: v[keep].contiguous() for k, v in out.items()}
        out["rows_total"] = len(index)
        checkpoints.save_atomic(out, path)


@torch.no_grad()
def evaluate(distiller, batches, amp_dtype: torch.dtype | None, device: torch.device,
             outputs: EvalOutputs | None = None) -> dict[str, float]:
    """``top1`` (for two-class tasks also ``f1`` of class 1 and ``mcc``, Matthews' correlation) of the
    student, the teacher's, and the consistency metrics of SPEC sec. 1 between them, over ``batches``;
    ``outputs`` collects the logits and pooled features of every row."""
    import kd_core
    distiller.eval()
    student = unwrap(distiller.student)
    teacher = unwrap(distiller.teacher) if distiller.teacher is not None else None
    # rows; then per network: correct, true positives, predicted positives, actual positives
    counts = torch.zeros(9, dtype=torch.float64, device=device)
    meter = kd_core.ConsistencyMeter()
    two_class = False
    for x, y, index in batches.epoch(0):
        with _autocast(device, amp_dtype):
            s, s_feats = student(x, features=True)
            t, t_feats = teacher(x, features=True) if teacher is not None else (None, None)
        if outputs is not None:
            outputs.add(index, y, s, s_feats["pooled"], t, t_feats["pooled"] if t_feats is not None else None)
        two_class = s.shape[1] == 2
        counts[0] += len(y)
        for offset, logits in ((1, s), (5, t)):
            if logits is None:
                continue
            pred = logits.argmax(1)
            counts[offset] += (pred == y).sum()
            counts[offset + 1] += ((pred == 1) & (y == 1)).sum()
            counts[offset + 2] += (pred == 1).sum()
            counts[offset + 3] += (y == 1).sum()
        if t is not None:
            meter.update(s.float(), t.float(), s_feats["pooled"].float(), t_feats["pooled"].float())
    all_reduce_sum(counts)
    c = counts.tolist()
    rows = max(c[0], 1.0)

    def scores(prefix: str, ok: float, tp: float, pp: float, ap: float) -> dict:
        out = {f"{prefix}top1": 100.0 * ok / rows}
        if two_class:
            out[f"{prefix}f1"] = 100.0 * 2 * tp / max(pp + ap, 1.0)
            # From the 2x2 confusion table; 0 when a row or column of it is empty (sklearn's convention).
            fp, fn = pp - tp, ap - tp
            tn = rows - tp - fp - fn
            denom = math.sqrt(pp * ap * (tn + fp) * (tn + fn))
            out[f"{prefix}mcc"] = 100.0 * (tp * tn - fp * fn) / denom if denom > 0 else 0.0
        return out

    out = scores("", *c[1:5])
    if teacher is not None:
        out.update(scores("teacher_", *c[5:9]))
        out.update(meter.compute())
    return out


# ----------------------------------------------------------------------------------------------
# fit: train, evaluate, checkpoint, resume; the loop every script shares
# ----------------------------------------------------------------------------------------------
RESUME_MAY_CHANGE = {"epochs", "log_every", "eval_every", "device", "data_dir", "download", "eval_batch_size", "out",
                     "save_every"}
# Always in summary.json (None where there is no teacher); the two-class scores only for two-class tasks.
SUMMARY_KEYS = ("top1", "teacher_top1", "kl", "gap", "agreement", "pl", "cka_logits", "cka_features", "batch_time_ms")
TWO_CLASS_KEYS = ("f1", "mcc", "teacher_f1", "teacher_mcc")


def check_finite(sums: torch.Tensor, names: list[str], epoch: int, step: int, out: Path) -> None:
    if not bool(torch.isfinite(sums).all()):
        bad = [n for n, v in zip(names, sums.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(f"non-finite loss ({', '.join(bad)}) in epoch {epoch + 1} by step {step + 1}; "
                            f"{_checkpoint_state(out)}")


def check_resumable(saved: dict, now: dict) -> None:
    """The config may change only in ``RESUME_MAY_CHANGE``; a path inside the run's own folder (a later
    stage's teacher, made by an earlier stage) compares relative to it, since it moves with the folder."""
    def local(cfg: dict) -> dict:
        inside = str(cfg.get("out")).rstrip("/") + "/"
        return {k: "<out>/" + v[len(inside):] if isinstance(v, str) and v.startswith(inside) else v
                for k, v in cfg.items()}
    saved, now = local(saved), local(now)
    changed = [k for k in saved if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume: the config differs from the checkpoint's ({diffs})")


def format_epoch(m: dict) -> str:
    parts = [f"epoch {m['epoch']}"] + ([f"top1 {m['top1']:.2f}"] if "top1" in m else [])
    if "teacher_top1" in m:
        parts += [f"teacher {m['teacher_top1']:.2f}", f"gap {m['gap']:.3f}", f"kl {m['kl']:.3f}",
                  f"agree {m['agreement']:.1f}"]
    parts += [f"loss {m['train_loss']:.4f}", f"{m['batch_time_ms']:.1f} ms/step", f"{m['epoch_time_s']:.1f} s"]
    return " | ".join(parts)



def drain(steps: typing.Generator):
    """Run a generator of training steps (``fit_steps``, a script's ``run_steps``) to its end and return
    what it returns; ``multirun`` interleaves several of them instead."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def fit(cfg, dist_info: Dist, distiller, optimizer: torch.optim.Optimizer, train, test,
        amp_dtype: torch.dtype | None, log: RunLog, resume: Path | None = None) -> dict:
    """``fit_steps`` run to its end: the summary."""
    return drain(fit_steps(cfg, dist_info, distiller, optimizer, train, test, amp_dtype, log, resume))


def fit_steps(cfg, dist_info: Dist, distiller, optimizer: torch.optim.Optimizer, train, test,
              amp_dtype: torch.dtype | None, log: RunLog, resume: Path | None = None):
    """Train ``distiller`` for ``cfg.epochs``, yielding after every training step; returns the summary.

    ``train`` / ``test``: ``len()`` batches and ``epoch(e)`` yielding ``(x, y, index)`` on the device.
    ``cfg`` supplies epochs, lr_schedule, lr_milestones, lr_decay, warmup_epochs, log_every,
    eval_every, cuda_graph, out and (optionally) save_every. Writes config.yaml, metrics.jsonl, last.pt
    and best.pt (atomically, at the end of every epoch, and last.pt also every ``save_every`` steps
    inside an epoch) and, after the last epoch, outputs.pt (``EvalOutputs``); ``resume`` is the
    checkpoint to continue from (``open_run``). A stop signal while it runs (SIGTERM, SIGUSR1) saves a
    checkpoint after the current step and raises ``runfolder.Preempted``.
    """
    with runfolder.graceful_stop():
        return (yield from _train_epochs(cfg, dist_info, distiller, optimizer, train, test, amp_dtype, log, resume))


def _train_epochs(cfg, dist_info: Dist, distiller, optimizer: torch.optim.Optimizer, train, test,
                  amp_dtype: torch.dtype | None, log: RunLog, resume: Path | None):
    device = dist_info.device
    updated_params = distiller.updated_params()
    if dist_info.world > 1:
        wrap_ddp(distiller, dist_info)
    if getattr(cfg, "lr_overwrite", False) and (cfg.lr_schedule != "step" or cfg.warmup_epochs):
        raise ConfigError("lr_overwrite mirrors the authors' step decays: it needs lr_schedule=step and no warm-up")
    step = TrainStep(distiller, optimizer, amp_dtype, device, cuda_graph=cfg.cuda_graph,
                     grad_accum=getattr(cfg, "grad_accum", 1), grad_accum_reset=getattr(cfg, "grad_accum_reset", "run"))
    save_every = getattr(cfg, "save_every", 0)

    start_epoch, start_step, saved_sums, best, history = 0, 0, None, -math.inf, {}
    last_path, best_path = Path(cfg.out) / "last.pt", Path(cfg.out) / "best.pt"
    if resume is not None:
        ckpt = checkpoints.load_resume_checkpoint(Path(resume))
        check_resumable(ckpt["config"], config_dict(cfg))
        if ckpt["epoch"] > cfg.epochs:
            raise ConfigError(f"cannot resume: {resume} has trained {ckpt['epoch']} epochs, more than epochs="
                              f"{cfg.epochs}; give --epochs {ckpt['epoch']} or more")
        try:
            load_distiller_state(distiller, ckpt["distiller"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as err:   # another code version's models or groups
            reason = str(err).strip().splitlines()[0][:120]
            raise checkpoints.CheckpointError(f"cannot resume from {resume}: its models or optimiser do not match "
                                              f"this run's ({type(err).__name__}: {reason})") from None
        start_epoch, best, history = ckpt["epoch"], ckpt["best_top1"], ckpt["history"]
        start_step, saved_sums = ckpt.get("step", 0), ckpt.get("loss_sums")
        if "accum" in ckpt:
            step.calls = ckpt["accum"]["calls"]
            step.pending = ckpt["accum"].get("pending", step.calls % step.grad_accum)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for p, grad in zip(params, ckpt["accum"]["grads"]):
                p.grad = None if grad is None else grad.to(p.device)
        checkpoints.set_rng_state(ckpt["rng"])
        log.truncate_metrics(start_epoch)
        log.print(f"resumed from {resume} at epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))
    log.write_config(config_dict(cfg))
    if "teacher_top1_initial" not in history and distiller.teacher is not None:
        history["teacher_top1_initial"] = evaluate(distiller, test, amp_dtype, device)["teacher_top1"]
        log.print(f"teacher top-1 before training: {history['teacher_top1_initial']:.2f}")

    def checkpoint(epochs_done: int, steps_done: int = 0, sums: torch.Tensor | None = None) -> dict:
        """Everything to continue bit-identically; mid-epoch also the step and each rank's loss sums so far."""
        ckpt = {"model": unwrap(distiller.student).state_dict(), "distiller": distiller_state(distiller),
                "optimizer": optimizer.state_dict(), "epoch": epochs_done, "best_top1": best,
                "history": history, "rng": checkpoints.rng_state(), "config": config_dict(cfg),
                "top1": metrics.get("top1")}
        if steps_done:
            ckpt.update(step=steps_done, loss_sums=sums.cpu())
        if step.grad_accum > 1:   # the accumulation's position and the gradients summed so far
            grads = [None if p.grad is None else p.grad.detach().cpu().clone()
                     for g in optimizer.param_groups for p in g["params"]]
            ckpt["accum"] = {"calls": step.calls, "pending": step.pending, "grads": grads}
        return ckpt

    progress = Progress((cfg.epochs - start_epoch) * len(train) - start_step, log, cfg.log_every, _runs_to_follow)
    metrics: dict = history.get("last_metrics", {})
    per_step_lr = cfg.lr_schedule != "step"
    lr_now = None
    for epoch in range(start_epoch, cfg.epochs):
        distiller.begin_epoch(epoch, cfg.epochs)
        distiller.train()
        sums, started = None, time.perf_counter()
        skip = start_step if epoch == start_epoch else 0
        if skip:   # each rank continues its own sums (so that the epoch's all-reduce adds the same numbers)
            own = saved_sums[dist_info.rank] if len(saved_sums) == dist_info.world else \
                saved_sums.sum(0) * dist_info.main   # another world size: the total, counted once
            sums = own.to(device)
        # epoch(e, start=k) yields the batches from the k-th on, ordered and augmented as in a whole epoch.
        batches = train.epoch(epoch, start=skip) if skip else train.epoch(epoch)
        for i, (x, y, index) in enumerate(batches, start=skip):
            at, size = (epoch + i / len(train), 1 / len(train)) if per_step_lr else (epoch, 1.0)
            factor = lr_factor(at, cfg.epochs, cfg.lr_schedule, cfg.lr_milestones, cfg.lr_decay, cfg.warmup_epochs,
                               size)
            if factor != lr_now:
                set_lr(optimizer, factor, overwrite=getattr(cfg, "lr_overwrite", False))
                lr_now = factor
            losses = step(x, y, index, batch=i)
            sums = losses if sums is None else sums + losses
            last = i + 1 == len(train)
            if (i + 1) % cfg.log_every == 0 or last:
                check_finite(sums, step.names, epoch, i, last_path.parent)
            progress.step(epoch, cfg.epochs, i, len(train),
                          float(sums[0]) / (i + 1) if (i + 1) % cfg.log_every == 0 or last else None)
            stop = None if last else runfolder.stop_agreed(dist_info.world, device, i)
            if not last and (stop or save_every and (i + 1) % save_every == 0):
                check_finite(sums, step.names, epoch, i, last_path.parent)     # never a checkpoint of a diverged run
                # The running statistics are linear in the batches, so averaging here changes nothing
                # later but makes the saved model the ranks' common one (as at the epoch's end).
                average_buffers(distiller, dist_info)
                rank_sums = gather_rows(sums)
                if dist_info.main:
                    checkpoints.save_atomic(checkpoint(epoch, i + 1, rank_sums), last_path)
            if stop:
                raise runfolder.Preempted(f"{signal.Signals(stop).name} in epoch {epoch + 1} after step {i + 1} of "
                                          f"{len(train)}: saved {last_path}", stop)
            yield   # between steps, other runs of this process may take theirs (multirun)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()   # this run's stream: concurrent runs keep going
        train_time = time.perf_counter() - started
        all_reduce_sum(sums)
        average_buffers(distiller, dist_info)
        metrics = {"epoch": epoch + 1, **{f"train_{n}": float(v) / (len(train) * dist_info.world)
                                           for n, v in zip(step.names, sums)}}
        final = EvalOutputs() if epoch + 1 == cfg.epochs else None
        if (epoch + 1) % cfg.eval_every == 0 or final is not None:
            metrics.update(evaluate(distiller, test, amp_dtype, device, final))
            if final is not None:
                final.save(Path(cfg.out) / "outputs.pt", dist_info)
        metrics.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
        metrics.update(epoch_time_s=time.perf_counter() - started,
                       batch_time_ms=1000 * train_time / max(len(train) - skip, 1))
        log.append_metrics(metrics)
        log.print(format_epoch(metrics))
        history["last_metrics"] = metrics
        history["train_time_s"] = history.get("train_time_s", 0.0) + train_time   # training steps, not evaluation
        is_best = metrics.get("top1", -math.inf) > best
        best = max(best, metrics.get("top1", -math.inf))
        if dist_info.main:
            ckpt = checkpoint(epoch + 1)
            checkpoints.save_atomic(ckpt, last_path)
            if is_best:
                checkpoints.save_atomic(ckpt, best_path)
            if epoch + 1 in getattr(cfg, "anchor_epochs", ()):
                checkpoints.save_anchor(ckpt["model"], epoch + 1, Path(cfg.out))
        stop = runfolder.stop_agreed(dist_info.world, device) if epoch + 1 < cfg.epochs else None
        if stop:
            raise runfolder.Preempted(f"{signal.Signals(stop).name} in epoch {epoch + 1}: saved {last_path} at its "
                                      f"end", stop)
    return {**{k: metrics.get(k) for k in SUMMARY_KEYS}, **{k: metrics[k] for k in TWO_CLASS_KEYS if k in metrics},
            "best_top1": best, "teacher_top1_initial": history.get("teacher_top1_initial"),
            "updated_params": updated_params, "train_time_s": history.get("train_time_s", 0.0)}



WARM = "warm"   # what time_steps yields once its warm-up steps have finished on the device
_side_by_side = False   # inside timed_side_by_side()


@contextlib.contextmanager
def timed_side_by_side():
    """Inside the block every timed step of ``time_steps`` waits for its device work before the process turns
    to another run, so that runs interleaved step by step (``multirun.compare``) each time exactly their own
    steps, under the same load."""
    global _side_by_side
    previous, _side_by_side = _side_by_side, True
    try:
        yield
    finally:
        _side_by_side = previous


def benchmark(cfg, dist_info: Dist, distiller, optimizer: torch.optim.Optimizer, batches,
              amp_dtype: torch.dtype | None, log: RunLog) -> dict:
    """``time_steps`` run to its end: the result."""
    return drain(time_steps(cfg, dist_info, distiller, optimizer, batches, amp_dtype, log))


def time_steps(cfg, dist_info: Dist, distiller, optimizer: torch.optim.Optimizer, batches,
               amp_dtype: torch.dtype | None, log: RunLog):
    """Time ``cfg.benchmark_steps`` training steps after 10 warm-up steps, yielding after every step (and
    ``WARM`` between the two); print the result and save it as ``<out>/benchmark.json`` (never a run's
    summary.json, config.yaml or checkpoints)."""
    device = dist_info.device
    updated_params = distiller.updated_params()
    if dist_info.world > 1:
        wrap_ddp(distiller, dist_info)
    step = TrainStep(distiller, optimizer, amp_dtype, device, cuda_graph=cfg.cuda_graph,
                     grad_accum=getattr(cfg, "grad_accum", 1))
    distiller.train()
    sync = torch.cuda.current_stream(device).synchronize if device.type == "cuda" else (lambda: None)
    prepared = []
    while len(prepared) < cfg.benchmark_steps + 10:
        prepared.extend(batches.epoch(len(prepared)))
    for x, y, index in prepared[:10]:
        step(x, y, index)
        yield
    sync()
    yield WARM
    started, away = time.perf_counter(), 0.0
    for x, y, index in prepared[10:10 + cfg.benchmark_steps]:
        step(x, y, index)
        if _side_by_side:   # this step's device work belongs to its own time, not to the next run's turn
            sync()
        paused = time.perf_counter()
        yield
        away += time.perf_counter() - paused   # other runs' turns (multirun) are not this run's time
    sync()
    ms = 1000 * (time.perf_counter() - started - away) / cfg.benchmark_steps
    batch = cfg.batch_size
    result = {"method": cfg.method, "batch_size": batch, "steps": cfg.benchmark_steps, "amp": str(amp_dtype),
              "cuda_graph": step.cuda_graph,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world": dist_info.world, "step_ms": ms, "images_per_s": batch / ms * 1000,
              "updated_params": updated_params}
    amp = "none" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    log.print(f"benchmark {cfg.method}: batch {batch}, amp {amp}, cuda_graph {step.cuda_graph}, device "
              f"{result['device']}, processes {dist_info.world}, {cfg.benchmark_steps} timed steps: {ms:.2f} ms/step, "
              f"{result['images_per_s']:.0f} samples/s, {updated_params / 1e6:.3f}M updated params")
    log.write_summary(result, "benchmark.json")
    return result
