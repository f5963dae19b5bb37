"""engine.py: config parsing, the lr schedule, evaluation counts and atomic checkpoints."""
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoints
import engine
from conftest import Pair, RowBatches


@dataclass
class Cfg:
    lr: float = 0.1
    epochs: int = 3
    flag: bool = False
    name: str | None = None
    milestones: list[int] = field(default_factory=lambda: [1, 2])


def test_build_config_types_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nepochs: 5\nname: a\n")          # PyYAML reads 1e-4 as a string
    cfg = engine.build_config(Cfg, str(path), ["epochs=7", "milestones=[3, 4]"], {"name": "b", "flag": None})
    assert cfg == Cfg(lr=1e-4, epochs=7, flag=False, name="b", milestones=[3, 4])
    for bad, match in [("lr=fast", "lr must be a number"), ("flag=1", "flag must be true or false"),
                       ("epochs=2.5", "epochs must be an integer"), ("milestones=3", "must be a list"),
                       ("speed=3", "unknown config key.*valid keys: epochs, flag, lr, milestones, name"),
                       ("novalue", "key=value")]:
        with pytest.raises(engine.ConfigError, match=match):
            engine.build_config(Cfg, None, [bad])
    with pytest.raises(engine.ConfigError, match="not found"):
        engine.build_config(Cfg, str(tmp_path / "missing.yaml"))


def test_lr_factor_by_hand():
    step = [engine.lr_factor(e, 240, "step", [150, 180, 210], 0.1) for e in (0, 149, 150, 179, 180, 210, 239)]
    assert step == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])
    assert engine.lr_factor(60, 240, "cosine", [], 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # warm-up over 2 epochs, set per epoch: 1/2 then 1, never 0
    assert [engine.lr_factor(e, 10, "step", [], 0.1, 2) for e in (0, 1, 2)] == pytest.approx([0.5, 1, 1])
    # linear (BERT): per step of 0.5 epoch, warm-up 1 epoch of 4, then down to 0 at the end
    lin = [engine.lr_factor(e / 2, 4, "linear", [], 0.1, 1, 0.5) for e in range(8)]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


class FixedNet(nn.Module):
    """Returns pre-set logits for each input row id (x holds row ids)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x, features=False):
        z = self.logits[x]
        return (z, {"pooled": z * 2}) if features else z


def test_evaluate_accuracy_f1_and_consistency_by_hand():
    y = torch.tensor([1, 0, 1, 1, 0])
    s = torch.tensor([[0., 1], [0, 1], [1, 0], [0, 1], [1, 0]])     # predicts 1, 1, 0, 1, 0
    t = torch.tensor([[0., 2], [3, 0], [0, 1], [0, 5], [2, 0]])     # predicts 1, 0, 1, 1, 0
    out = engine.evaluate(Pair(FixedNet(s), FixedNet(t)), RowBatches(y, 2), None, torch.device("cpu"))
    assert out["top1"] == pytest.approx(60.0)              # rows 0, 3, 4
    assert out["f1"] == pytest.approx(100 * 2 * 2 / (3 + 3))  # tp 2, predicted 3, actual 3
    assert out["teacher_top1"] == pytest.approx(100.0) and out["teacher_f1"] == pytest.approx(100.0)
    assert out["agreement"] == pytest.approx(60.0)
    lse = lambda z: torch.logsumexp(z.double(), 1)
    assert out["gap"] == pytest.approx(float((lse(t) - lse(s)).mean()), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_mcc_is_the_pearson_correlation_of_predictions_and_labels(seed):
    g = torch.Generator().manual_seed(seed)
    n = 37
    y = torch.randint(0, 2, (n,), generator=g)
    s = torch.randn(n, 2, generator=g) + 1.5 * seed / 5 * nn.functional.one_hot(y, 2)
    out = engine.evaluate(Pair(FixedNet(s), FixedNet(s.flip(1))), RowBatches(y, 8), None, torch.device("cpu"))
    pred = s.argmax(1).numpy().astype(float)
    expected = 100 * np.corrcoef(pred, y.numpy().astype(float))[0, 1]
    assert out["mcc"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert out["teacher_mcc"] == pytest.approx(-expected, rel=1e-9, abs=1e-9)   # flipped logits: flipped predictions


def test_evaluate_mcc_is_zero_when_one_class_is_never_predicted():
    y = torch.tensor([1, 0, 1, 0])
    always_one = torch.tensor([[0., 1]] * 4)
    out = engine.evaluate(Pair(FixedNet(always_one), FixedNet(always_one)), RowBatches(y, 2), None,
                          torch.device("cpu"))
    assert out["mcc"] == 0.0 and out["top1"] == pytest.approx(50.0)


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
