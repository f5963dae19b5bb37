"""Run folders that cannot be lost or mixed (issue 21): one writer per folder (a lock, checked across real
processes), no overwrite without --resume or --overwrite, SIGTERM/SIGUSR1 saving a checkpoint that resumes
bit-identically (one process, --seeds --concurrent, torchrun with 2 gloo ranks), metrics.jsonl torn by a crash."""
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import runfolder
import train_cifar
from conftest import ROOT, torchrun

TINY = ["--method", "ce", "--teacher", "resnet8", "--student", "resnet8", "--batch-size", "16", "--set",
        "eval_batch_size=50", "--set", "log_every=1"]
TIMES = {"epoch_time_s", "batch_time_ms"}   # wall-clock values: the only ones allowed to differ


pytestmark = pytest.mark.usefixtures("one_thread")


def folder_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cifar_main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = train_cifar.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def metrics(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, rng: bool = True) -> None:
    """The same models, RNG state (with ``rng``) and metrics (wall-clock values aside)."""
    ca, cb = (torch.load(p / "last.pt", weights_only=True) for p in (a, b))
    assert (ca["epoch"], ca.get("step")) == (cb["epoch"], cb.get("step"))
    for part, state in ca["distiller"].items():
        for key, value in state.items():
            assert torch.equal(value, cb["distiller"][part][key]), (part, key)
    assert not rng or torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    assert metrics(a) == metrics(b) and len(metrics(a)) == ca["epoch"]


def stop_at(monkeypatch, call: int, signum: int) -> None:
    """Deliver ``signum`` (through the signal handler's own function) during the ``call``-th training step."""
    calls = {"n": 0}
    original = engine.TrainStep.__call__

    def step(self, x, y, index, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            runfolder.request_stop(signum)
        return original(self, x, y, index, **kwargs)
    monkeypatch.setattr(engine.TrainStep, "__call__", step)


# ----------------------------------------------------------------------------------------------
# One writer per folder; never overwrite by accident
# ----------------------------------------------------------------------------------------------
def test_a_second_process_is_refused_and_sigterm_saves_a_checkpoint_that_resumes_bit_identically(
        fake_cifar, tmp_path, capsys):
    """A real training process holds the folder: a second one (this test's process) is refused with its pid;
    SIGTERM makes it finish its step, save mid-epoch, print the resume command and exit 143."""
    out = tmp_path / "run"
    # 6 epochs of 10 steps: the run is still training when the signal comes, however loaded the machine
    argv = [*TINY, "--epochs", "6", "--data-dir", str(fake_cifar), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "train_cifar.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in first.stdout:   # wait until it trains
        if line.startswith("epoch 1/6 [2/10]"):
            break
    rc, _, err = cifar_main(capsys, *argv)
    assert rc == 2 and one_line(err) == (f"error: {out} is in use by pid {first.pid} on {socket.gethostname()}: one "
                                         f"run writes a run folder at a time (a second process would mix its results "
                                         f"in); wait for it, or choose another --out")
    first.send_signal(signal.SIGTERM)
    rest, err = first.communicate()
    line = one_line(err)
    assert first.returncode == 143 and line.startswith("stopped: SIGTERM in epoch 1 after step "), (rest, err)
    assert line.endswith(f"saved {out / 'last.pt'}; continue with: python train_cifar.py {' '.join(argv)} --resume")
    saved = torch.load(out / "last.pt", weights_only=True)
    # one process stops after the step it is in, wherever a loaded machine let the signal land
    assert line.startswith(f"stopped: SIGTERM in epoch {saved['epoch'] + 1} after step {saved['step']} of 10")
    assert saved["step"] >= 2 and not (out / ".lock").exists()
    rc, printed, _ = cifar_main(capsys, *argv, "--resume")
    assert rc == 0 and f"at epoch 0, step {saved['step']}" in printed
    rc, _, _ = cifar_main(capsys, *[a if a != str(out) else str(tmp_path / "straight") for a in argv])
    assert rc == 0
    assert_same_run(tmp_path / "straight", out)


def test_the_lock_is_held_for_every_stage_and_released_after_the_run(fake_cifar, teacher_ckpt, tmp_path,
                                                                       monkeypatch, capsys):
    """takd: while stage 1 trains, both the run folder and the stage's sub-folder are locked (a lock taken
    through another open file fails, as in another process); in stage 2 the run folder only; afterwards no
    lock file remains."""
    out = tmp_path / "takd"
    seen = []
    original = engine.TrainStep.__call__

    def locked(folder: Path) -> bool:
        try:
            fd = os.open(folder / runfolder.LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def step(self, x, y, index, **kwargs):
        seen.append((locked(out), locked(out / "assistant")))
        return original(self, x, y, index, **kwargs)
    monkeypatch.setattr(engine.TrainStep, "__call__", step)
    rc, _, err = cifar_main(capsys, "--method", "takd", "--teacher", "resnet8", "--student", "resnet8", "--set",
                            "assistant=resnet8", "--teacher-ckpt", str(teacher_ckpt), "--epochs", "1",
                            "--batch-size", "16", "--limit-batches", "1", "--set", "eval_batch_size=50",
                            "--data-dir", str(fake_cifar), "--out", str(out))
    assert rc == 0 and seen == [(True, True), (True, False)], err
    assert not list(out.rglob(runfolder.LOCK_FILE))


def test_a_stale_lock_of_a_killed_process_does_not_block(fake_cifar, tmp_path, capsys):
    """kill -9 leaves the lock file; the OS released its lock, so the next run takes the folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / runfolder.LOCK_FILE).write_text("pid 1 on elsewhere")
    rc, _, err = cifar_main(capsys, *TINY, "--epochs", "1", "--limit-batches", "1", "--data-dir", str(fake_cifar),
                            "--out", str(out))
    assert rc == 0, err


def test_the_same_command_again_is_refused_and_overwrite_starts_afresh(fake_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--limit-batches", "2", "--data-dir", str(fake_cifar), "--out", str(out)]
    assert cifar_main(capsys, *argv)[0] == 0
    before = folder_digest(out)
    rc, _, err = cifar_main(capsys, *argv)
    assert rc == 2 and one_line(err) == (f"error: {out} already holds a run (last.pt, best.pt, summary.json, "
                                         f"metrics.jsonl): add --resume to continue it, --overwrite to delete it and "
                                         f"start afresh, or choose another --out")
    assert folder_digest(out) == before
    rc, _, err = cifar_main(capsys, *argv, "--resume", "--overwrite")
    assert rc == 2 and "give one of them" in one_line(err) and folder_digest(out) == before
    (out / "anchors").mkdir()
    (out / "anchors" / "epoch_0001.pt").write_bytes(b"an old anchor")
    (out / "sweep").mkdir()
    (out / "sweep" / "keep.txt").write_text("a sweep's run lives below its base folder")
    rc, _, err = cifar_main(capsys, *argv, "--overwrite")
    assert rc == 0, err
    assert [m["epoch"] for m in metrics(out)] == [1] and not (out / "anchors").exists()
    assert (out / "sweep" / "keep.txt").is_file()


def test_seeds_check_every_folder_before_the_first_run(fake_cifar, tmp_path, capsys):
    base = tmp_path / "kd"
    argv = [*TINY, "--epochs", "1", "--limit-batches", "1", "--data-dir", str(fake_cifar), "--out", str(base)]
    assert cifar_main(capsys, *argv, "--seed", "1", "--out", str(tmp_path / "kd_s1"))[0] == 0
    rc, _, err = cifar_main(capsys, *argv, "--seeds", "0,1")
    assert rc == 2 and f"{tmp_path / 'kd_s1'} already holds a run" in one_line(err)
    assert not (tmp_path / "kd_s0").exists()


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------
def test_sigusr1_in_one_process_saves_mid_epoch_and_resumes_bit_identically(fake_cifar, tmp_path, monkeypatch,
                                                                             capsys):
    argv = [*TINY, "--epochs", "2", "--limit-batches", "4", "--set", "lr_schedule=cosine", "--data-dir",
            str(fake_cifar)]
    assert cifar_main(capsys, *argv, "--out", str(tmp_path / "straight"))[0] == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, 6, signal.SIGUSR1)   # the second step of epoch 2
        rc, _, err = cifar_main(capsys, *argv, "--out", str(out))
    assert rc == 128 + signal.SIGUSR1 and one_line(err).startswith(
        f"stopped: SIGUSR1 in epoch 2 after step 2 of 4: saved {out / 'last.pt'}; continue with: ")
    assert runfolder.stop_requested() is None   # the handlers and the flag are the process's again
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)   # the step it stopped after, not the epoch before
    assert cifar_main(capsys, *argv, "--out", str(out), "--resume")[0] == 0
    assert_same_run(tmp_path / "straight", out)


def test_sigterm_stops_every_concurrent_run_and_each_resumes_bit_identically(fake_cifar, tmp_path, monkeypatch,
                                                                            capsys):
    argv = [*TINY, "--epochs", "2", "--limit-batches", "3", "--data-dir", str(fake_cifar), "--seeds", "0,1",
            "--concurrent", "2"]
    assert cifar_main(capsys, *argv, "--out", str(tmp_path / "straight"))[0] == 0
    with monkeypatch.context() as m:
        stop_at(m, 3, signal.SIGTERM)   # run s0's second step (the runs take turns)
        rc, _, err = cifar_main(capsys, *argv, "--out", str(tmp_path / "run"))
    assert rc == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("[run_s0] stopped: SIGTERM in epoch 1 after step 2") and \
        lines[1].startswith("[run_s1] stopped: SIGTERM in epoch 1 after step 2") and \
        lines[2].startswith("stopped: SIGTERM: 0 of 2 runs finished, 2 stopped, 0 not started") and len(lines) == 3
    for seed in (0, 1):
        saved = torch.load(tmp_path / f"run_s{seed}" / "last.pt", weights_only=True)
        assert (saved["epoch"], saved["step"]) == (0, 2)
    assert cifar_main(capsys, *argv, "--out", str(tmp_path / "run"), "--resume")[0] == 0
    for seed in (0, 1):
        assert_same_run(tmp_path / f"straight_s{seed}", tmp_path / f"run_s{seed}")


def launch_torchrun(argv: list[str], logs: Path) -> subprocess.Popen:
    """2 CPU ranks; each rank's stdout and stderr go to ``logs/*/attempt_0/<rank>/`` (torchrun's own lines
    stay apart, on the job's stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--log-dir", str(logs), "--redirects", "3", "train_cifar.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_rank0(job: subprocess.Popen, logs: Path, text: str) -> dict[int, int]:
    """Wait until rank 0 has printed ``text``; the workers' pids by rank."""
    pids = {}
    while len(pids) < 2 or text not in stdout_of(logs, 0):
        assert job.poll() is None, job.stderr.read()
        pids = worker_pids(job.pid)
        time.sleep(0.2)
    return pids


def test_imagenet_sigterm_saves_mid_epoch_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    """The same loop in train_imagenet.py (workers' sampler resumed at the saved batch)."""
    import numpy as np
    from PIL import Image
    import train_imagenet
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 1)):
        for c in ("a", "b", "c"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    argv = ["--method", "ce", "--student", "resnet18", "--set", "teacher_weights=null", "--epochs", "2", "--batch-size",
            "4", "--set", "eval_batch_size=3", "--set", "image_size=16", "--workers", "0", "--set", "log_every=1",
            "--data-dir", str(tmp_path / "data")]   # 3 steps per epoch
    assert train_imagenet.main([*argv, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, 5, signal.SIGTERM)
        capsys.readouterr()
        assert train_imagenet.main([*argv, "--out", str(out)]) == 143
    assert one_line(capsys.readouterr().err).startswith(f"stopped: SIGTERM in epoch 2 after step 2 of 3: saved {out}")
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    assert train_imagenet.main([*argv, "--out", str(out), "--resume"]) == 0
    assert_same_run(tmp_path / "straight", out, rng=False)   # DataLoader draws its base seeds per iterator


def test_torchrun_sigterm_all_ranks_stop_at_one_step_without_a_traceback(fake_cifar, tmp_path):
    """2 gloo ranks; SIGTERM reaches only rank 1 (as when one node is preempted first): both ranks agree to
    stop at the next check, rank 0 saves and prints the one line. The continued run equals an unbroken one."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    argv = [*TINY, "--batch-size", "8", "--epochs", "2", "--data-dir", str(fake_cifar)]
    job = launch_torchrun([*argv, "--out", str(out)], logs)
    os.kill(wait_for_rank0(job, logs, "epoch 1/2 [2/20]")[1], signal.SIGTERM)
    job.communicate()
    errs = {rank: stderr_of(logs, rank) for rank in (0, 1)}
    assert job.returncode != 0 and not any("Traceback" in e for e in errs.values()), errs
    stopped = [ln for ln in errs[0].splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1 and "stopped:" not in errs[1], errs
    saved = torch.load(out / "last.pt", weights_only=True)
    # Where the ranks stop depends on when the signal lands (a loaded machine delays this test's poll): at a
    # shared check, every STOP_CHECK_EVERY steps, or at an epoch's end; never anywhere else.
    if "step" in saved:
        assert stopped[0].startswith(f"stopped: SIGTERM in epoch {saved['epoch'] + 1} after step {saved['step']} "
                                     f"of 20"), stopped
        assert saved["step"] % runfolder.STOP_CHECK_EVERY == 0 and len(saved["loss_sums"]) == 2
    else:
        assert stopped[0].startswith(f"stopped: SIGTERM in epoch {saved['epoch']}: saved "), stopped   # completed epochs
    torchrun(["train_cifar.py", *argv, "--out", str(out), "--resume"], cwd=ROOT)
    torchrun(["train_cifar.py", *argv, "--out", str(tmp_path / "straight")], cwd=ROOT)
    # The weights and losses are bit-identical; BatchNorm's running statistics, averaged over the ranks at the
    # stop (as at every --save-every checkpoint), equal the unbroken run's up to float rounding.
    straight, resumed = (torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "straight", out))
    for key, value in straight["model"].items():
        if "running_" in key:
            torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(metrics(tmp_path / "straight"), metrics(out)):
        assert {k: v for k, v in a.items() if k.startswith("train_")} == \
               {k: v for k, v in b.items() if k.startswith("train_")}


def test_torchrun_dead_peer_is_one_line_naming_the_checkpoint(fake_cifar, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    job = launch_torchrun([*TINY, "--batch-size", "8", "--epochs", "2", "--data-dir", str(fake_cifar), "--out",
                           str(out)], logs)
    os.kill(wait_for_rank0(job, logs, "epoch 2/2 [2/20]")[1], signal.SIGKILL)
    job.communicate()
    err = stderr_of(logs, 0)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert job.returncode != 0 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("error: another process of this torchrun job stopped (")
    assert errors[0].endswith(f"the last checkpoint is {out / 'last.pt'}; the same command plus --resume continues "
                              f"from it")


def worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the workers the torchrun agent ``agent`` started (its child processes, from /proc)."""
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            rank = [e for e in (proc / "environ").read_bytes().split(b"\0") if e.startswith(b"RANK=")]
        except (OSError, ValueError, IndexError):   # a process that ended meanwhile
            continue
        if rank:
            pids[int(rank[0][5:])] = int(proc.name)
    return pids


def stdout_of(logs: Path, rank: int) -> str:
    return "".join(p.read_text() for p in logs.glob(f"*/attempt_0/{rank}/stdout.log"))


def stderr_of(logs: Path, rank: int) -> str:
    return "".join(p.read_text() for p in logs.glob(f"*/attempt_0/{rank}/stderr.log"))


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_broken_one_named(fake_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--limit-batches", "1", "--data-dir", str(fake_cifar), "--out", str(out)]
    assert cifar_main(capsys, *argv, "--epochs", "1")[0] == 0
    whole = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(whole + whole[:25])   # epoch 2's record, cut by a crash
    rc, printed, err = cifar_main(capsys, *argv, "--epochs", "2", "--resume")
    assert rc == 0, err
    assert f"note: dropped the torn last line of {out / 'metrics.jsonl'}" in printed
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0][:25], *lines[1:]]) + "\n")
    before = folder_digest(out)
    rc, _, err = cifar_main(capsys, *argv, "--epochs", "3", "--resume")
    assert rc == 2 and f"{out / 'metrics.jsonl'}, line 1: not a metrics record" in one_line(err)
    assert folder_digest(out) == before


def test_a_restart_under_resume_drops_the_rows_of_an_unsaved_epoch(fake_cifar, tmp_path, capsys):
    """A crash between an epoch's metrics row and its checkpoint: --resume starts afresh, without that row."""
    out = tmp_path / "run"
    argv = [*TINY, "--epochs", "1", "--limit-batches", "1", "--data-dir", str(fake_cifar), "--out", str(out)]
    assert cifar_main(capsys, *argv)[0] == 0
    for name in ("last.pt", "best.pt", "summary.json", "outputs.pt"):
        (out / name).unlink()
    rc, printed, err = cifar_main(capsys, *argv, "--resume")
    assert rc == 0 and "has no checkpoint yet: starting afresh" in printed, err
    assert [m["epoch"] for m in metrics(out)] == [1]
