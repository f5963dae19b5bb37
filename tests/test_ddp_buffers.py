"""The same model on every rank: with 2 gloo ranks (DDP with broadcast_buffers=False, each rank's BatchNorm
statistics following its own data shard) every rank evaluates identical buffers, for the student and the
trained teacher, and the reported metrics equal a single-process evaluation of the saved checkpoint."""
import json
import textwrap

import torch

import models
import train_cifar
from conftest import ROOT, torchrun

RECORDING_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    import engine
    import train_cifar

    evaluate, calls = engine.evaluate, []

    def recording_evaluate(distiller, *args, **kwargs):
        # What this rank evaluates: the buffers of every trained child, saved per call.
        buffers = {{f"{{name}}.{{k}}": v.clone() for name in distiller.trainable_module_names()
                   for k, v in engine.unwrap(getattr(distiller, name)).named_buffers()}}
        torch.save(buffers, f"{{sys.argv[1]}}/buffers_rank{{torch.distributed.get_rank()}}_call{{len(calls)}}.pt")
        calls.append(1)
        return evaluate(distiller, *args, **kwargs)

    engine.evaluate = recording_evaluate
    sys.exit(train_cifar.main(sys.argv[2:]))
""")


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    batches = train_cifar.DeviceBatches(images, labels, len(labels), torch.device("cpu"), train=False)
    (x, y, _), = list(batches.epoch(0))
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).sum()) / len(y)


def test_two_ranks_evaluate_and_save_the_same_buffers(fake_cifar, teacher_ckpt, tmp_path):
    script = tmp_path / "record.py"
    script.write_text(RECORDING_SCRIPT.format(root=str(ROOT)))
    out = tmp_path / "run"
    # dml trains the teacher too; two steps with per-rank halves of each batch make the statistics differ.
    torchrun([str(script), str(tmp_path), "--method", "dml", "--teacher", "resnet8", "--student", "resnet8",
              "--teacher-ckpt", str(teacher_ckpt), "--data-dir", str(fake_cifar), "--epochs", "1",
              "--batch-size", "32", "--limit-batches", "2", "--device", "cpu", "--set", "eval_batch_size=50",
              "--out", str(out)])
    final = max(int(p.stem.split("call")[1]) for p in tmp_path.glob("buffers_rank0_call*.pt"))
    rank0 = torch.load(tmp_path / f"buffers_rank0_call{final}.pt")
    rank1 = torch.load(tmp_path / f"buffers_rank1_call{final}.pt")
    running = [k for k in rank0 if "running_mean" in k]
    assert any(k.startswith("student.") for k in running) and any(k.startswith("teacher.") for k in running)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between the ranks at evaluation"

    ckpt = torch.load(out / "last.pt", weights_only=False)
    summary = json.loads((out / "summary.json").read_text())
    student, teacher = models.build_model("resnet8", 100), models.build_model("resnet8", 100)
    student.load_state_dict(ckpt["model"])
    teacher.load_state_dict(ckpt["distiller"]["teacher"])
    for k, v in student.named_buffers():   # the saved model is the one the ranks evaluated
        assert torch.equal(v, rank0[f"student.{k}"]), k
    images, labels = train_cifar.load_cifar100(fake_cifar)["test"]
    assert summary["top1"] == top1(student, images, labels)
    assert summary["teacher_top1"] == top1(teacher, images, labels)


def test_a_frozen_teacher_on_batch_statistics_is_averaged_too(monkeypatch):
    """teacher_bn: train updates a frozen teacher's running statistics on each rank's shard, so they are averaged
    like a trained network's; with teacher_bn: eval they never change and are left alone. The other rank is
    simulated as holding zeros: the all-reduce adds nothing, the average halves."""
    import engine
    from distillers import DistillConfig, build_distiller
    monkeypatch.setattr(engine.dist, "all_reduce", lambda tensor: None)
    for teacher_bn, factor in (("train", 0.5), ("eval", 1.0)):
        teacher = models.build_model("resnet8", 100)
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(2.0)
        distiller = build_distiller("kd", models.build_model("resnet8", 100), teacher,
                                    DistillConfig(teacher_bn=teacher_bn, backend="torch"))
        engine.average_buffers(distiller, engine.Dist(rank=0, world=2))
        assert float(teacher.bn1.running_mean[0]) == 2.0 * factor, teacher_bn
