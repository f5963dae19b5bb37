"""Concurrent runs in one process (multirun, --concurrent): interleaved step by step, each run ends exactly
as the same run alone; failures stay in their run; --benchmark-steps with --seeds gives aggregate images/s."""
import json

import pytest
import torch
import yaml

import engine
import multirun
import train_cifar

TINY = ["--teacher", "resnet8", "--student", "resnet8", "--epochs", "2", "--batch-size", "16", "--limit-batches", "2",
        "--set", "eval_batch_size=50"]
TIMES = {"epoch_time_s", "batch_time_ms", "train_time_s"}   # wall-clock keys: the only ones allowed to differ


def draws(name: str, seed: int, steps: int, log: list):
    """A toy run: seeds the process, then one global-RNG draw per step (as CRD's negatives or dropout)."""
    engine.seed_everything(seed)
    out = []
    for _ in range(steps):
        out.append(torch.rand(2))
        log.append(name)
        yield
    return torch.stack(out)


def test_scheduler_interleaves_and_keeps_each_runs_random_state():
    log = []
    jobs = [multirun.Job(n, lambda n=n, s=s, k=k: draws(n, s, k, log)) for n, s, k in (("a", 1, 3), ("b", 2, 2),
                                                                                           ("c", 3, 2))]
    results = multirun.run_all(jobs, concurrent=2, device=torch.device("cpu"))
    assert log == ["a", "b", "a", "b", "a", "c", "c"]   # two at a time, turn by turn; c takes b's slot
    for (name, seed, steps), got in zip((("a", 1, 3), ("b", 2, 2), ("c", 3, 2)), results):
        torch.manual_seed(seed)
        assert torch.equal(got, torch.rand(steps, 2)), name   # the draws it makes alone


def test_a_failed_run_leaves_the_others_to_finish(capsys):
    def broken():
        yield
        raise ValueError("bad input in run b")

    log = []
    jobs = [multirun.Job("a", lambda: draws("a", 0, 3, log)), multirun.Job("b", broken)]
    scheduler = multirun.Scheduler(jobs, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="bad input in run b"):
        scheduler.finish()
    assert log == ["a"] * 3 and 0 in scheduler.results
    assert "[b] failed: ValueError: bad input in run b" in capsys.readouterr().err

    def bug():
        yield
        raise KeyError("a bug")

    jobs = [multirun.Job("b", broken), multirun.Job("c", bug), multirun.Job("a", lambda: draws("a", 0, 1, []))]
    with pytest.raises(multirun.RunFailed, match=r"2 of 3 runs failed \(b, c\)"):
        multirun.run_all(jobs, 3, torch.device("cpu"))
    assert "Traceback" in capsys.readouterr().err   # an unexpected error shows where it came from
    with pytest.raises(multirun.RunErrors, match=r"2 of 2 runs failed \(b, b2\)"):   # bad input: one line each
        multirun.run_all([multirun.Job("b", broken), multirun.Job("b2", broken)], 1, torch.device("cpu"))
    assert "Traceback" not in capsys.readouterr().err


def files(folder) -> dict:
    """Everything a run folder holds, with wall-clock values dropped."""
    ckpt = torch.load(folder / "last.pt", weights_only=False)
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMES}
               for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in TIMES}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.pop("out")
    ckpt["config"].pop("out")
    ckpt.pop("checksum")   # over the whole payload, times and folder included
    ckpt["history"].pop("train_time_s")
    for key in TIMES:
        ckpt["history"]["last_metrics"].pop(key, None)
    return {"ckpt": ckpt, "outputs": torch.load(folder / "outputs.pt", weights_only=False), "metrics": metrics,
            "summary": summary, "config": config}


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("method", ["crd", "pesf"])
def test_concurrent_seeds_end_bit_identical_to_each_run_alone(method, fake_cifar, teacher_ckpt, tmp_path, capsys):
    """crd draws its negatives from the global RNG at every step, pesf trains a teacher adapter too."""
    common = [*TINY, "--method", method, "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar)]
    assert train_cifar.main([*common, "--out", str(tmp_path / "many"), "--seeds", "3,4,5", "--concurrent", "2"]) == 0
    out = capsys.readouterr().out
    first = [line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[")]
    assert {"[many_s3]", "[many_s4]", "[many_s5]"} <= set(first)
    assert first.index("[many_s4]") < max(i for i, tag in enumerate(first) if tag == "[many_s3]")   # interleaved
    assert f"| {method} | 3 |" in out
    for seed in (3, 4, 5):
        assert train_cifar.main([*common, "--out", str(tmp_path / f"alone_s{seed}"), "--seed", str(seed)]) == 0
        assert_same(files(tmp_path / f"alone_s{seed}"), files(tmp_path / f"many_s{seed}"), f"seed {seed}")


def test_concurrent_sweep_with_seeds(fake_cifar, teacher_ckpt, tmp_path, capsys):
    common = [*TINY, "--method", "kd", "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar),
              "--out", str(tmp_path / "sw")]
    assert train_cifar.main([*common, "--sweep", "tau=2,8", "--seeds", "0,1", "--concurrent", "4"]) == 0
    out = capsys.readouterr().out
    assert "| tau=2 | 2 |" in out and "| tau=8 | 2 |" in out
    assert train_cifar.main([*TINY, "--method", "kd", "--teacher-ckpt", str(teacher_ckpt), "--data-dir",
                             str(fake_cifar), "--out", str(tmp_path / "alone"), "--set", "tau=8", "--seed", "1"]) == 0
    assert_same(files(tmp_path / "alone"), files(tmp_path / "sw" / "sweep" / "tau=8_s1"))


def test_benchmark_with_seeds_prints_aggregate_images_per_second(fake_cifar, tmp_path, capsys):
    args = ["--method", "ce", "--student", "resnet8", "--batch-size", "8", "--benchmark-steps", "2",
            "--out", str(tmp_path / "b"), "--seeds", "0,1", "--concurrent", "2"]
    assert train_cifar.main(args) == 0
    out = capsys.readouterr().out
    assert "| concurrent runs | aggregate images/s |" in out and "| 1 |" in out and "| 2 |" in out
    rows = json.loads((tmp_path / "b" / "concurrent" / "benchmark_concurrent.json").read_text())
    assert [r["runs"] for r in rows] == [1, 2]
    for r in rows:   # images counted from the batch and steps of every run; rate = images / seconds
        assert r["images"] == r["runs"] * 8 * 2
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    made = sorted(p.name for p in (tmp_path / "b" / "concurrent").iterdir() if p.is_dir())
    assert made == ["n1_0", "n2_0", "n2_1"]
    seeds = [json.loads((tmp_path / "b" / "concurrent" / n / "benchmark.json").read_text()) for n in made]
    assert all(s["steps"] == 2 and s["batch_size"] == 8 for s in seeds)
    assert not any((tmp_path / "b" / "concurrent" / n / "last.pt").exists() for n in made)


def test_concurrent_bad_input(fake_cifar, tmp_path, capsys):
    common = [*TINY, "--method", "ce", "--data-dir", str(fake_cifar), "--out", str(tmp_path / "x")]
    for extra, message in ((["--concurrent", "2"], "--concurrent N runs the runs of --seeds or --sweep"),
                           (["--seeds", "0,1", "--concurrent", "0"], "--concurrent must be at least 1"),
                           (["--sweep", "tau=2,2", "--concurrent", "2"], "two runs would write the same folder"),
                           (["--sweep", "deterministic=true,false", "--concurrent", "2"],
                            "deterministic is one setting of the whole process"),
                           (["--sweep", "tau=2", "--seeds", "0,1", "--benchmark-steps", "2"],
                            "--benchmark-steps with --sweep compares the sweep's configs side by side")):
        assert train_cifar.main([*common, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()
