"""fp32 adapter heads under autocast: a small adapter change must reach the logits under bf16 autocast as it
does in fp32 (in bf16 an offset below ~4e-3 of O(1) features is rounded away). References are float64
computations of the change the adapter's parameters make, written here from the adapter equations."""
import pytest
import torch

import models
from kd_core import Adapter, LoRALinear, ParallelAdapter

OFFSET = 1e-3


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want).norm() / want.norm())


@pytest.mark.parametrize("family,name,kind", [("cifar", "resnet8", "houlsby"), ("cifar", "resnet8", "lora"),
                                              ("cifar", "resnet8", "parallel"), ("imagenet", "resnet18", "houlsby")])
def test_head_adapter_change_reaches_the_logits_under_bf16_autocast(family, name, kind):
    torch.manual_seed(0)
    classes = 100 if family == "cifar" else 10
    model = models.build_model(name, classes, adapter=kind, slot="head").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), bf16_autocast():
        before, feats = model(x, features=True)
        adapter = model.adapter
        classifier = model.classifier_layer if family == "cifar" else model.fc
        g = torch.Generator().manual_seed(1)
        if kind == "houlsby":    # h + up(relu(down(h))) with up.weight = 0: the output moves by up.bias
            delta = OFFSET * torch.randn(adapter.up.bias.shape, generator=g).sign()
            adapter.up.bias.copy_(delta)
            want = (delta.double() @ classifier.weight.double().T).expand(len(x), -1)
        elif kind == "parallel":  # h + scale * up(relu(down(h))): the feature moves by scale * up.bias
            delta = OFFSET * torch.randn(adapter.up.bias.shape, generator=g).sign()
            adapter.up.bias.copy_(delta)
            want = (adapter.scale * delta.double() @ classifier.weight.double().T).expand(len(x), -1)
        else:                    # base(x) + (alpha/r) x A^T B^T: the logits move by (alpha/r) x A^T dB^T
            d_b = 1e-2 * OFFSET * torch.randn(adapter.lora_b.shape, generator=g)
            adapter.lora_b.copy_(d_b)
            pooled = feats["pooled"].double()
            want = adapter.scaling * pooled @ adapter.lora_a.double().T @ d_b.double().T
        after = model(x)
    assert after.dtype == torch.float32
    # fp32 head: the change arrives within a few percent (bf16 head: none or a rounding-sized fraction of it).
    assert relative_error(after.float() - before.float(), want) < 0.05


@pytest.mark.parametrize("kind", ["houlsby_conv", "parallel", "lora"])
def test_adapter_residual_sum_keeps_a_small_offset_under_autocast(kind):
    torch.manual_seed(0)
    if kind == "houlsby_conv":
        # h in bf16, as a convolution's output under autocast
        module, h = Adapter(16, 4, conv=True), (torch.randn(4, 16, 5, 5) + 3.0).bfloat16()
        module.up.bias.data.fill_(OFFSET)
        want = torch.full(h.shape, OFFSET, dtype=torch.float64)
    elif kind == "parallel":
        module, h = ParallelAdapter(16, bottleneck=4, scale=1.0), (torch.randn(4, 16) + 3.0).bfloat16()
        module.up.bias.data.fill_(OFFSET)
        want = torch.full(h.shape, OFFSET, dtype=torch.float64)
    else:
        module, h = LoRALinear(torch.nn.Linear(16, 16), rank=4), torch.randn(4, 16) + 3.0
        module.lora_b.data.normal_(0, OFFSET)
        # the reference sees the input as autocast hands it to the matmuls (rounded to bf16)
        want = module.scaling * h.bfloat16().double() @ module.lora_a.bfloat16().double().T \
            @ module.lora_b.bfloat16().double().T
    with torch.no_grad(), bf16_autocast():
        base = h if kind != "lora" else module.base(h)
        out = module(h)
    assert out.dtype == torch.float32
    assert relative_error(out.double() - base.double(), want) < 0.02
