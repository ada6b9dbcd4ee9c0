"""A passed model keeps its identity (name, tags, checkpoint; the CKA oracle copies its architecture);
model.checkpoint / pretrained / reinit_head; data.classes and data.image_size; their bad input."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freezebench.cli import main
from freezebench.config import load_config
from freezebench.errors import ConfigError, FreezebenchError
from freezebench.trainer.hooks import TrackingHook
from freezebench.zoo.data import build_data
from freezebench.zoo.models import build_model

from conftest import TINY

BASE = [o for o in TINY if not o.startswith("model.name")]  # the model is passed in


class SmallNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _train(overrides, model, policy="full"):
    from freezebench.trainer import Trainer

    torch.manual_seed(0)
    return Trainer(load_config([*BASE, f"policy={policy}", *overrides]), model=model)


def test_passed_model_is_named_tagged_and_checkpointed_as_itself(mlflow_uri, tmp_path):
    t = _train(["trainer.epochs=1"], SmallNet())
    res = t.fit()
    run = mlflow.tracking.MlflowClient(mlflow_uri).get_run(res.run_id)
    assert run.info.run_name == "full-SmallNet-synthetic-s0"
    assert run.data.tags["model"] == "SmallNet" and run.data.params["model.name"] == "SmallNet"
    payload = torch.load(res.checkpoint, weights_only=True)
    assert payload["model_name"] == "SmallNet" and payload["custom_model"] is True
    # a name the user gives: free text, no registry needed
    t2 = _train(["trainer.epochs=1", "model.name='my net v2'", "tracking.enabled=false"], SmallNet())
    assert t2.run_name == "full-my net v2-synthetic-s0" and TrackingHook.tags(t2)["model"] == "my net v2"


def test_checkpoint_applied_to_a_passed_model_and_pretrained_refused(tmp_path):
    src = SmallNet()
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    m = SmallNet()
    _train([f"model.checkpoint={path}", "tracking.enabled=false"], m)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ConfigError, match="pretrained=true cannot apply to a model passed in"):
        _train(["model.pretrained=true", "tracking.enabled=false"], SmallNet())


def test_cka_oracle_builds_its_reference_from_a_passed_model(mlflow_uri, tmp_path):
    from freezebench.baselines.cka_oracle import build_reference

    ref = _train(["trainer.epochs=2"], SmallNet()).fit()
    ref_state = torch.load(ref.checkpoint, weights_only=True)["model_state"]
    template = SmallNet()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    t = _train([f"policy.reference={ref.checkpoint}", "policy.window_epochs=0.5", "policy.checks_per_epoch=2",
                "trainer.epochs=2"], template, policy="cka_oracle")
    model, units = build_reference(ref.checkpoint, t.units, "cpu", template=template)
    assert type(model) is SmallNet and model is not template
    assert all(torch.equal(ref_state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())  # a copy, not the original
    assert [u.name for u in units] == [u.name for u in t.units]
    res = t.fit()
    run = mlflow.tracking.MlflowClient(mlflow_uri).get_run(res.run_id)
    assert run.data.tags["model"] == "SmallNet"
    # the oracle compared against that reference: unit 0 froze on its CKA rule, the CKA in (0, 1]
    import re

    assert [e.unit for e in res.events] == [0] and res.events[0].reason.startswith("CKA to reference stable")
    cka = float(re.search(r"0: CKA ([0-9.]+)", res.events[0].reason).group(1))
    assert 0.3 < cka <= 1.0


def test_head_of_another_size_needs_reinit_head(tmp_path):
    src = build_model("tiny", num_classes=4, in_channels=3, image_size=8)
    path = tmp_path / "src.pt"
    torch.save({"model_state": src.state_dict(), "model_name": "tiny"}, path)
    with pytest.raises(FreezebenchError, match="set model.reinit_head=true") as e:
        build_model("tiny", num_classes=3, in_channels=3, image_size=8, checkpoint=str(path))
    assert "\n" not in str(e.value)
    torch.manual_seed(1)
    m = build_model("tiny", num_classes=3, in_channels=3, image_size=8, checkpoint=str(path), reinit_head=True)
    own, saved = m.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in own if not k.startswith("fc."))
    assert own["fc.weight"].shape == (3, 16)
    # same class count, reinit_head=true: the head is still new (fine-tuning on other classes)
    m4 = build_model("tiny", num_classes=4, in_channels=3, image_size=8, checkpoint=str(path), reinit_head=True)
    assert not torch.equal(m4.state_dict()["fc.weight"], saved["fc.weight"])


def test_data_classes_subset_and_relabel():
    full = build_data(load_config(BASE).data, seed=0, device="cpu")
    sub = build_data(load_config([*BASE, "data.classes=[3,1]"]).data, seed=0, device="cpu")
    assert sub.info.num_classes == 2
    y_full, y_sub = full.train.y, sub.train.y
    assert int((y_sub == 0).sum()) == int((y_full == 3).sum()) and int((y_sub == 1).sum()) == int((y_full == 1).sum())
    assert torch.equal(sub.train.x[y_sub == 0], full.train.x[y_full == 3])  # class 3 became label 0, in order
    with pytest.raises(ConfigError, match="data.classes names class 9 but synthetic has classes 0..3"):
        build_data(load_config([*BASE, "data.classes=[0,9]"]).data, seed=0, device="cpu")


def test_image_size_resizes_on_the_device():
    native = build_data(load_config(BASE).data, seed=0, device="cpu")
    big = build_data(load_config([*BASE, "data.image_size=16"]).data, seed=0, device="cpu")
    assert big.info.image_size == 16 and native.info.image_size == 8
    x8, _ = native.train.unaugmented(torch.arange(4))
    x16, _ = big.train.unaugmented(torch.arange(4))
    assert x16.shape == (4, 3, 16, 16)
    assert torch.equal(x16, F.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False))


def test_model_that_cannot_take_the_image_size_is_one_line():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ConfigError, match=r"cannot take inputs of shape \(3, 16, 16\).*data.image_size") as e:
        _train(["data.image_size=16", "tracking.enabled=false"], flat)
    assert "\n" not in str(e.value)


def test_bad_input_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = build_model("tiny", num_classes=4, in_channels=3, image_size=8)
    torch.save({"model_state": src.state_dict(), "model_name": "tiny"}, tmp_path / "src.pt")
    for bad, msg in ((["data.classes=[0,9]"], "data.classes names class 9"),
                     (["data.image_size=0"], "data.image_size must be a positive"),
                     (["data.classes=[0,1,2]", f"model.checkpoint={tmp_path / 'src.pt'}"], "model.reinit_head=true")):
        assert main(["train", *TINY, "tracking.enabled=false", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert not any(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} == {"src.pt"}  # nothing written


def test_pretrained_keeps_the_imagenet_stem_and_loads_whole(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    torch.manual_seed(0)
    fake = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the ImageNet file (offline)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake, tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    m = build_model("resnet18", num_classes=10, in_channels=3, image_size=32, pretrained=True)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2) and not isinstance(m.maxpool, nn.Identity)
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in fake.items() if not k.startswith("fc."))
    with pytest.raises(ConfigError, match="needs 3-channel images") as e:
        build_model("resnet18", num_classes=10, in_channels=1, image_size=8, pretrained=True)
    assert "\n" not in str(e.value)
