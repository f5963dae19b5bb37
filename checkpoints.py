"""Files a run leaves that must survive a crash: checkpoints written atomically and checked by a checksum
on loading, the exact random state to continue bit-identically, and RCO's teacher anchors.

Independent of the training loop (``engine``), which writes and reads them.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    """Every RNG state as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def payload_digest(obj) -> str:
    """SHA-256 of a checkpoint's content (tensor bytes, dtypes, shapes, keys and plain values), independent
    of how torch.save lays it out, so that it can be checked after loading."""
    digest = hashlib.sha256()

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                digest.update(repr(key).encode())
                walk(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode())

    walk(obj)
    return digest.hexdigest()


def save_atomic(obj, path: str | Path) -> None:
    """torch.save through a temporary file and a rename; a dict gets a ``checksum`` of its content."""
    path = Path(path)
    if isinstance(obj, dict):
        obj = {**obj, "checksum": payload_digest(obj)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        # Through a Python file, so that a full disk is an OSError naming its cause (torch's own writer
        # reports it as an unexplained RuntimeError).
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        err.filename = str(path)   # the checkpoint, not its temporary
        raise
    finally:
        tmp.unlink(missing_ok=True)


def load_file(path: str | Path, what: str) -> dict:
    """A checkpoint dict, checked: a missing, unreadable, truncated or altered file (``checksum``
    mismatch) or one that holds no dict is a one-line error naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # zip, pickle and EOF errors of any kind: a damaged or foreign file
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, corrupt or "
                              f"another format: {reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a dict of tensors")
    if "checksum" in obj:
        saved = obj.pop("checksum")
        if saved != payload_digest(obj):
            raise CheckpointError(f"{what} {path} is corrupt: its content does not match its checksum")
    return obj


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.tmp<pid>`` files that a killed checkpoint write left (their process is gone)."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# What a run's last.pt holds (a teacher.pt, outputs.pt or another code version's checkpoint lacks some).
RESUME_KEYS = ("model", "distiller", "optimizer", "epoch", "best_top1", "history", "rng", "config")


def load_resume_checkpoint(path: Path) -> dict:
    """``load_file`` for resuming; when the checkpoint is damaged, the message says whether ``best.pt``
    beside it is intact (and from which epoch), since that one can be copied over it."""
    try:
        ckpt = load_file(path, "checkpoint to resume from")
    except CheckpointError as err:
        best = path.with_name("best.pt")
        try:
            hint = f"; {best} is intact (epoch {load_file(best, 'best')['epoch']}): copy it over {path.name} " \
                   f"to continue from there"
        except (CheckpointError, FileNotFoundError, KeyError):
            hint = ""
        raise CheckpointError(f"{err}{hint}") from None
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a run checkpoint this version can continue (no {', '.join(missing)}): "
                              f"--resume takes a run's last.pt or its folder")
    return ckpt


# Teacher anchors (RCO): the model alone, at the epochs listed in ``anchor_epochs``
def save_anchor(model_state: dict, epoch: int, out: Path) -> Path:
    """``<out>/anchors/epoch_XXXX.pt``: ``{"model": state_dict, "epoch": epoch}``, no optimiser state."""
    path = out / "anchors" / f"epoch_{epoch:04d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": model_state, "epoch": epoch}, path)
    return path


def load_anchors(folder: str | Path) -> list[dict]:
    """The anchors a teacher run saved, in epoch order; a clear error when there are none."""
    paths = sorted(Path(folder).glob("epoch_*.pt"))
    if not paths:
        raise FileNotFoundError(f"no teacher anchors (epoch_*.pt) in {folder}: train the teacher with "
                                f"--set anchor_epochs=[...] (method ce) to keep its route")
    return [load_file(p, "teacher anchor")["model"] for p in paths]
