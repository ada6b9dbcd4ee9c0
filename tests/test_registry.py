"""Registries: names, clear errors, third-party policies through the entry-point group."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types

import pytest

from freezebench.errors import FreezebenchError, UnknownNameError
from freezebench.policy import FreezePolicy, PolicyConfig
from freezebench.registry import DATASETS, MODELS, POLICIES, Registry


def test_builtin_names():
    assert {"full", "static"} <= set(POLICIES.names())
    assert {"resnet20", "resnet18", "vgg11_bn", "mobilenet_v2", "deit_tiny", "tiny"} <= set(MODELS.names())
    assert {"digits", "cifar10", "cifar100", "imagefolder", "synthetic"} <= set(DATASETS.names())


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownNameError) as e:
        MODELS.get("resnet21")
    msg = str(e.value)
    assert "unknown model 'resnet21'" in msg and "Did you mean" in msg and "resnet20" in msg and "mlp" in msg


def test_third_party_policy_through_entry_points(monkeypatch):
    mod = types.ModuleType("thirdparty_policy")

    class Mine(FreezePolicy):
        name = "mine"
        Config = PolicyConfig

    mod.Mine = Mine
    monkeypatch.setitem(sys.modules, "thirdparty_policy", mod)
    ep = md.EntryPoint(name="mine", value="thirdparty_policy:Mine", group="freezebench.policies")
    broken = md.EntryPoint(name="broken", value="thirdparty_policy:Missing", group="freezebench.policies")
    reg = Registry("policy", group="freezebench.policies")
    real = md.entry_points

    def fake(group=None, **kw):
        found = list(real(group=group, **kw))
        return found + [ep, broken] if group == "freezebench.policies" else found

    monkeypatch.setattr("freezebench.registry.entry_points", fake)
    assert "mine" in reg.names() and "static" in reg.names()
    assert reg.get("mine") is Mine
    with pytest.raises(FreezebenchError, match="failed to load"):
        reg.get("broken")


def test_double_registration_is_an_error():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(FreezebenchError, match="twice"):
        reg.register("a", 2)


def test_check_schedule_shared_by_policies():
    from freezebench.policy import Plan, epoch_check_offsets

    assert epoch_check_offsets(10, 4) == [3, 5, 8, 10]
    assert epoch_check_offsets(4, 4) == [1, 2, 3, 4]
    assert epoch_check_offsets(3, 8) == [1, 2, 3]  # more checks than steps: after every step
    plan = Plan(epochs=2, steps_per_epoch=10, batch_size=1, base_lr=0.1, seed=0)
    assert sorted(plan.check_steps(2)) == [5, 10, 15, 20]
