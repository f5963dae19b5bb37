"""The CIFAR and ImageNet models: parameter counts (SPEC §4), the published checkpoint layout of Tian et al.
(2020), refusal of a wrong architecture, features, and the adapter slots (SPEC §2)."""
import pytest
import torch
import torchvision
from torch import nn

from models import available_models, build_model, count_trainable, is_adapter_key, load_checkpoint

CNN_ADAPTERS = [("houlsby", "head"), ("lora", "head"), ("parallel", "head"), ("houlsby", "stages"),
                ("parallel", "stages")]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,millions", [("resnet20", 0.28), ("resnet32", 0.47), ("resnet56", 0.86),
                                           ("resnet110", 1.74)])
def test_cifar_resnet_parameter_counts(name, millions):
    assert round(_count(build_model(name, 100)) / 1e6, 2) == millions


@pytest.mark.parametrize("name,configs", [("resnet18", [(None, "head"), ("parallel", "stages")]),
                                          ("resnet34", [("houlsby", "head")]), ("resnet50", [("lora", "head")])])
def test_imagenet_models_are_torchvision(name, configs):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
    for adapter, slot in configs:
        model = build_model(name, 1000, adapter=adapter, slot=slot)
        assert _count(model) - sum(p.numel() for p in model.adapter_parameters()) == _count(ref)
        assert set(load_checkpoint(model, ref.state_dict())) == {k for k in model.state_dict() if is_adapter_key(k)}
        with torch.no_grad():
            logits, feats = model.eval()(x, features=True)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
        _check_features(model, feats, n=1)
        for pre, post in zip(feats["preact_stages"][1:], feats["stages"][1:]):
            if adapter is None:
                torch.testing.assert_close(pre.relu(), post)


def test_imagenet_weights_and_head_size():
    with pytest.raises(KeyError, match="NO_SUCH_WEIGHTS"):  # weights reach torchvision, which checks the name
        build_model("resnet18", 1000, weights="NO_SUCH_WEIGHTS")
    assert build_model("resnet18", 10).fc.out_features == 10


def _repdistiller_resnet(depth: int, widths: tuple[int, ...], classes: int) -> dict[str, torch.Tensor]:
    """A state dict written out from the published key layout (RepDistiller models/resnet.py)."""
    g = torch.Generator().manual_seed(depth)
    sd: dict[str, torch.Tensor] = {}

    def conv(key, cout, cin, k):
        sd[f"{key}.weight"] = torch.randn(cout, cin, k, k, generator=g)

    def bn(key, c):
        sd.update({f"{key}.weight": torch.rand(c, generator=g) + 0.5, f"{key}.bias": torch.randn(c, generator=g),
                   f"{key}.running_mean": torch.randn(c, generator=g), f"{key}.running_var": torch.rand(c, generator=g) + 0.5,
                   f"{key}.num_batches_tracked": torch.tensor(7)})

    conv("conv1", widths[0], 3, 3)
    bn("bn1", widths[0])
    cin = widths[0]
    for s, w in enumerate(widths[1:], start=1):
        for i in range((depth - 2) // 6):
            conv(f"layer{s}.{i}.conv1", w, cin, 3)
            bn(f"layer{s}.{i}.bn1", w)
            conv(f"layer{s}.{i}.conv2", w, w, 3)
            bn(f"layer{s}.{i}.bn2", w)
            if i == 0 and cin != w:
                conv(f"layer{s}.0.downsample.0", w, cin, 1)
                bn(f"layer{s}.0.downsample.1", w)
            cin = w
    sd["fc.weight"], sd["fc.bias"] = torch.randn(classes, cin, generator=g), torch.randn(classes, generator=g)
    return sd


def test_published_resnet_checkpoint_loads_and_round_trips(tmp_path):
    sd = _repdistiller_resnet(20, (16, 16, 32, 64), 100)
    for source in (sd, {"model": sd, "epoch": 240, "accuracy": 69.1}):
        model = build_model("resnet20", 100)
        assert load_checkpoint(model, source) == []
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    adapted = build_model("resnet20", 100, adapter="houlsby")
    assert load_checkpoint(adapted, tmp_path / "ckpt.pth") == ["adapter.down.weight", "adapter.down.bias",
                                                              "adapter.up.weight", "adapter.up.bias"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(x), model.eval()(x))
    wide = build_model("resnet8x4", 100)  # layer1.0 gets a downsample there (16 -> 32 -> 64 channels)
    assert load_checkpoint(wide, _repdistiller_resnet(8, (32, 64, 128, 256), 100)) == []


def test_wrn_and_vgg_use_the_published_layout():
    wrn = build_model("wrn_16_2", 100).state_dict()
    expected = {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,), "block1.layer.0.conv1.weight": (32, 16, 3, 3),
                "block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block1.layer.1.conv2.weight": (32, 32, 3, 3),
                "block3.layer.0.convShortcut.weight": (128, 64, 1, 1), "bn1.running_var": (128,), "fc.weight": (100, 128)}
    assert {k: tuple(wrn[k].shape) for k in expected} == expected
    assert "block1.layer.1.convShortcut.weight" not in wrn and len(wrn) == 83
    vgg = build_model("vgg13", 100).state_dict()
    expected = {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_mean": (64,),
                "block0.3.weight": (64, 64, 3, 3), "block0.4.weight": (64,), "block4.4.bias": (512,),
                "classifier.weight": (100, 512)}
    assert {k: tuple(vgg[k].shape) for k in expected} == expected
    assert "block0.5.weight" not in vgg and "block0.2.weight" not in vgg


def test_wrong_architecture_is_refused_with_the_keys():
    with pytest.raises(ValueError) as err:
        load_checkpoint(build_model("resnet32", 100), _repdistiller_resnet(20, (16, 16, 32, 64), 100))
    assert "missing (" in str(err.value) and "layer1.3.conv1.weight" in str(err.value)
    sd = _repdistiller_resnet(20, (16, 16, 32, 64), 10)
    sd["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_checkpoint(build_model("resnet20", 100), sd)
    msg = str(err.value)
    assert "unexpected (1): head.weight" in msg and "fc.weight: checkpoint (10, 64) vs model (100, 64)" in msg


def test_registry_errors():
    assert {"resnet8", "resnet110", "resnet32x4", "wrn_40_2", "vgg19", "resnet50", "bert"} <= set(available_models())
    with pytest.raises(ValueError, match="valid: .*resnet20.*wrn_16_2.*resnet50.*bert"):
        build_model("resnet21", 100)
    with pytest.raises(ValueError, match="lora"):
        build_model("resnet20", 100, adapter="lora", slot="stages")
    with pytest.raises(ValueError, match="slot 'layers'"):
        build_model("vgg8", 100, adapter="houlsby", slot="layers")
    with pytest.raises(ValueError, match="unknown adapter"):
        build_model("resnet20", 100, adapter="prefix")


def _check_features(model, feats, n):
    assert feats["pooled"].shape == (n, model.feature_dim)
    assert [f.shape[1] for f in feats["stages"]] == model.stage_channels
    assert [f.shape for f in feats["preact_stages"]] == [f.shape for f in feats["stages"]]


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8"])
def test_features(name):
    model = build_model(name, 100).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32), features=True)
    _check_features(model, feats, n=2)
    torch.testing.assert_close(logits, model.classifier_layer(feats["pooled"]))
    if name == "wrn_16_2":  # pre-activation network: the next BatchNorm precedes each ReLU
        torch.testing.assert_close(feats["preact_stages"][1], model.block2.layer[0].bn1(feats["stages"][1]))
    else:
        for pre, post in zip(feats["preact_stages"], feats["stages"]):
            torch.testing.assert_close(pre.relu(), post)
        assert (feats["preact_stages"][-1] < 0).any()


@pytest.mark.parametrize("name,kind,slot", [("resnet8", k, s) for k, s in CNN_ADAPTERS] + [
    ("wrn_16_2", "parallel", "stages"), ("wrn_16_2", "houlsby", "head"), ("vgg8", "houlsby", "stages"),
    ("vgg8", "lora", "head")])
def test_adapters_start_as_identity_and_train_alone(name, kind, slot):
    torch.manual_seed(0)
    plain = build_model(name, 10).eval()
    model = build_model(name, 10, adapter=kind, slot=slot, bottleneck=8)
    load_checkpoint(model, plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (logits, feats), (ref, ref_feats) = model.eval()(x, features=True), plain(x, features=True)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=0)
    for a, b in zip(feats["stages"], ref_feats["stages"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # only the adapter keys are new: a plain checkpoint still loads strictly everywhere else
    assert [k for k in model.state_dict() if k not in plain.state_dict()] == \
           [k for k in model.state_dict() if is_adapter_key(k)]

    model.freeze_backbone().train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert count_trainable(model) == sum(p.numel() for p in model.adapter_parameters()) > 0
    logits, feats = model(x, features=True)
    (logits.logsumexp(1).sum() + feats["pooled"].sum()).backward()
    for pname, p in model.named_parameters():
        assert (p.grad is not None) == is_adapter_key(pname), pname
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.training for m in model.adapter.modules()) if model.adapter is not None else model.adapters.training
    with torch.no_grad():  # one SGD step by hand (torch.optim's first step imports torch._dynamo: seconds)
        for p in model.adapter_parameters():
            p -= 0.1 * p.grad
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)  # the adapters did learn something
