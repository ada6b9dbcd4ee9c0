"""Tests of the model zoo (:mod:`freezebench.zoo.models`)."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from freezebench.errors import FreezebenchError, UnknownNameError
from freezebench.zoo.models import build_model, deit_patch_size, list_models
from freezebench.registry import MODELS

ALL_MODELS = MODELS.names()  # every registered model is tested automatically
BUILTIN = {
    "deit_tiny", "mlp", "mobilenet_v2", "resnet18", "resnet20", "resnet32", "resnet50", "resnet56", "tiny",
    "vgg11_bn",
}  # fmt: skip
TORCHVISION_PRETRAINED = ["mobilenet_v2", "resnet18", "resnet50", "vgg11_bn"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_forward(name: str, in_channels: int, image_size: int, train: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size)
    model.train(train)
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_builtin_models_registered():
    assert BUILTIN <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_digits_size(name):
    """sklearn digits: 8x8, one channel (train mode: BN statistics over a batch of 2 must still work)."""
    check_forward(name, in_channels=1, image_size=8, train=True)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_cifar_size(name):
    check_forward(name, in_channels=3, image_size=32, train=False)


@pytest.mark.parametrize("name", ["resnet18", "tiny"])
def test_forward_imagenet_size(name):
    check_forward(name, in_channels=3, image_size=224, train=False)


@pytest.mark.parametrize(
    ("name", "expected"),
    # He et al. 2016, table 6: 0.27M, 0.46M, 0.85M
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet56", 853_018)],
)
def test_cifar_resnet_param_counts(name, expected):
    assert n_params(build_model(name, num_classes=10, in_channels=3, image_size=32)) == expected


def test_cifar_resnet_structure():
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    for stage in (model.layer1, model.layer2, model.layer3):
        assert isinstance(stage, nn.Sequential) and len(stage) == 3
    # option-A shortcuts have no parameters: only 3x3 convs, BN and the head
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)
    assert model.fc.in_features == 64


def test_small_input_stems():
    r18 = build_model("resnet18", num_classes=10, in_channels=1, image_size=32)
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and r18.conv1.in_channels == 1
    assert isinstance(r18.maxpool, nn.Identity)
    big = build_model("resnet18", num_classes=10, in_channels=1, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    assert isinstance(big.maxpool, nn.MaxPool2d)

    mnv2 = build_model("mobilenet_v2", num_classes=10, in_channels=1, image_size=32)
    assert mnv2.features[0][0].stride == (1, 1) and mnv2.features[0][0].in_channels == 1
    assert mnv2.classifier[-1].out_features == 10

    vgg8 = build_model("vgg11_bn", num_classes=10, in_channels=1, image_size=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg8.features) == 3  # 8 -> 4 -> 2 -> 1
    assert isinstance(vgg8.classifier, nn.Linear) and vgg8.classifier.in_features == 512
    vgg32 = build_model("vgg11_bn", num_classes=10, in_channels=3, image_size=32)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg32.features) == 5
    # meta-device construction: every tensor is initialised, BN statistics start at 0 / 1
    assert all(torch.isfinite(v.float()).all() for v in vgg32.state_dict().values())
    assert torch.equal(vgg32.features[1].running_var, torch.ones(64))


def test_deit_tiny():
    assert [deit_patch_size(s) for s in (8, 28, 32, 64, 224, 384)] == [1, 2, 4, 8, 16, 16]
    model = build_model("deit_tiny", num_classes=7, in_channels=1, image_size=32)
    assert model.patch_size == 4 and model.hidden_dim == 192 and len(model.encoder.layers) == 12
    assert model.conv_proj.in_channels == 1 and model.heads.head.out_features == 7


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet21", num_classes=10, in_channels=3, image_size=32)
    msg = str(info.value)
    assert "resnet21" in msg and "resnet20" in msg
    assert all(name in msg for name in BUILTIN)
    assert isinstance(info.value, FreezebenchError)


def test_bad_size_rejected():
    with pytest.raises(FreezebenchError, match="num_classes"):
        build_model("tiny", num_classes=0, in_channels=3, image_size=32)


@pytest.mark.parametrize("wrapped", [True, False])
def test_checkpoint_round_trip(tmp_path, wrapped):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, image_size=8).eval()
    with torch.no_grad():  # make the BN running statistics non-trivial
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "model.pt"
    state = model.state_dict()
    torch.save({"model_state": state, "model_name": "resnet20", "epoch": 3} if wrapped else state, path)

    torch.manual_seed(1)  # a different init, overwritten by the checkpoint
    loaded = build_model("resnet20", num_classes=10, in_channels=1, image_size=8, checkpoint=str(path)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_mismatch(tmp_path):
    path = tmp_path / "tiny.pt"
    tiny = build_model("tiny", num_classes=10, in_channels=1, image_size=8)
    torch.save({"model_state": tiny.state_dict(), "model_name": "tiny"}, path)
    with pytest.raises(FreezebenchError) as info:
        build_model("mlp", num_classes=10, in_channels=1, image_size=8, checkpoint=str(path))
    msg = str(info.value)
    assert str(path) in msg and "'tiny'" in msg and "'mlp'" in msg
    assert "missing keys: fc1.weight" in msg and "unexpected keys: block1.0.weight" in msg

    # same model, different head size: one line asking for a new head
    with pytest.raises(FreezebenchError, match=r"head of 10 outputs \(fc\.weight\), the model 5: set model.reinit_head=true"):
        build_model("tiny", num_classes=5, in_channels=1, image_size=8, checkpoint=str(path))


def test_checkpoint_missing_or_unreadable(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FreezebenchError, match="nope.pt"):
        build_model("tiny", num_classes=10, in_channels=1, image_size=8, checkpoint=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FreezebenchError, match="model checkpoint .*garbage.pt.* cannot be read"):
        build_model("tiny", num_classes=10, in_channels=1, image_size=8, checkpoint=str(garbage))
    not_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(FreezebenchError, match="neither a state dict"):
        build_model("tiny", num_classes=10, in_channels=1, image_size=8, checkpoint=str(not_state))


@pytest.mark.parametrize("name", TORCHVISION_PRETRAINED)
def test_pretrained_offline_error(tmp_path, monkeypatch, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FREEZEBENCH_ALLOW_DOWNLOAD", raising=False)
    start = time.monotonic()
    with pytest.raises(FreezebenchError) as info:
        build_model(name, num_classes=10, in_channels=3, image_size=32, pretrained=True)
    assert time.monotonic() - start < 10  # no network attempt
    msg = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints") in msg and "FREEZEBENCH_ALLOW_DOWNLOAD" in msg


@pytest.mark.parametrize("name", ["deit_tiny", "resnet20", "tiny", "mlp"])
def test_no_pretrained_weights(name):
    with pytest.raises(FreezebenchError, match="no pretrained weights"):
        build_model(name, num_classes=10, in_channels=3, image_size=32, pretrained=True)


def test_pretrained_partial_load_from_cache(tmp_path, monkeypatch, caplog):
    """A cached torchvision file is loaded whole but for the head: pretrained keeps the ImageNet stem."""
    import torchvision

    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)  # stands in for the ImageNet weights
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FREEZEBENCH_ALLOW_DOWNLOAD", raising=False)

    with caplog.at_level(logging.INFO, logger="freezebench.zoo.models"):
        model = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)
    assert not torch.equal(model.fc.bias, reference.fc.bias[:10])
    skipped = caplog.text
    assert torch.equal(model.conv1.weight, reference.conv1.weight)  # the 7x7 stem loads (not re-initialised)
    assert "left at their initial values: fc.bias, fc.weight" in skipped
