"""The frozen-prefix cache: exact training equality, cuts inside residual blocks, refusals, cost accounting."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from freezebench.features.cache import ModelSplit, PrefixCache
from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.zoo.models import build_model
from freezebench.trainer import Trainer
from freezebench.units import example_batch, partition

OFF = ["tracking.enabled=false", "trainer.save_checkpoint=false"]


def _fit(overrides: list[str], **kw) -> tuple[Trainer, dict[str, torch.Tensor], list[dict[str, float]]]:
    t = Trainer(load_config(overrides + OFF), **kw)
    r = t.fit()
    return t, {k: v.clone() for k, v in t.model.state_dict().items()}, r.history


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_static_prefix_fp32_cache_trains_identically_and_skips_the_prefix_forward(tiny_overrides):
    base = tiny_overrides + ["policy=static", "policy.at_step=0", "policy.fraction=0.5",
                             "trainer.max_steps_per_epoch=null"]  # whole epochs: every sample cached in epoch 1
    _, ref, hist_ref = _fit(base)
    t, got, hist = _fit(base + ["trainer.cache_frozen_prefix=true", "trainer.cache_dtype=fp32"])
    assert _max_diff(ref, got) == 0.0
    assert [h["train/loss"] for h in hist] == [h["train/loss"] for h in hist_ref]
    k = t.freezer.frozen_prefix()
    assert k >= 1
    samples = hist[0]["data/samples_per_epoch"]
    frozen = t.freezer.frozen
    # epoch 1 fills the cache (pays the prefix forward), later epochs skip it
    assert hist[0]["cost/tflops_epoch"] == pytest.approx(t.cost.step_flops(frozen) * samples / 1e12, rel=1e-9)
    for h in hist[1:]:
        assert h["cost/tflops_epoch"] == pytest.approx(t.cost.step_flops(frozen, k) * samples / 1e12, rel=1e-9)
    assert hist[1]["cost/tflops_epoch"] < hist_ref[1]["cost/tflops_epoch"]
    assert t.cache.stats["computed_from_input"] == samples
    assert t.cache.stats["served"] == 2 * samples
    assert hist[-1]["cache/served_samples"] == 2 * samples
    assert hist[-1]["cache/mb"] == pytest.approx(t.cache.nbytes / 2**20) and t.cache.nbytes > 0


def test_growing_prefix_is_pushed_through_new_units_exactly(tiny_overrides):
    base = tiny_overrides + ["policy=freezeout_linear", "policy.t0=0.1", "trainer.epochs=4"]
    _, ref, _ = _fit(base)
    t, got, hist = _fit(base + ["trainer.cache_frozen_prefix=true", "trainer.cache_dtype=fp32"])
    # batches mixing samples from the input and from an earlier cut run the prefix on sub-batches, whose
    # kernels may round differently from the full batch's: equal to float32 rounding, not bit for bit
    assert _max_diff(ref, got) < 1e-5
    assert t.cache.stats["pushed"] > 0  # samples moved from an earlier cut through newly frozen units
    assert hist[-1]["freeze/frozen_units"] > hist[0]["freeze/frozen_units"]


@pytest.mark.parametrize("location", ["cpu", "disk"])
def test_host_and_disk_storage_hold_reduced_precision_prefix_outputs(tiny_overrides, tmp_path, location):
    base = tiny_overrides + ["policy=static", "policy.at_step=0", "policy.fraction=0.5", "trainer.epochs=2"]
    _, ref, _ = _fit(base)
    t, got, _ = _fit(base + ["trainer.cache_frozen_prefix=true", f"trainer.cache_location={location}",
                             "trainer.cache_dtype=bf16", f"trainer.cache_dir={tmp_path}"])
    assert 0 < _max_diff(ref, got) < 0.05  # bf16 inputs to the suffix: close, not identical
    k = t.freezer.frozen_prefix()
    lv = t.cache.levels[k]
    assert all(b.dtype == torch.bfloat16 for b in lv.buffers)
    if location == "disk":
        assert sorted(p.name for p in tmp_path.glob("*.npy")) == [f"cut{k}_value{j}.npy" for j in range(len(lv.buffers))]
    # the stored rows are the prefix's outputs of those samples, rounded to bf16
    idx = torch.nonzero(torch.from_numpy(t.cache.level == k)).flatten()[:5]
    x, _ = t.data.train.unaugmented(idx)
    t.model.eval()
    expect = t.cache.split.segment(0, k)(x)
    for buf, e in zip(lv.buffers, expect):
        assert torch.equal(buf[idx], e.to(torch.bfloat16))


def test_cut_inside_a_residual_block_stores_the_skip_input_too():
    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    x = example_batch(3, 32, batch=4)
    units = partition(model, x, "layer").units
    split = ModelSplit(model, units)
    # unit 1 is layer1.0's first conv+bn: a cut after it lies inside the block, before the residual add
    assert units[1].name == "layer1.0.conv1"
    assert len(split.live(split.position(2))) == 2
    assert len(split.live(split.position(3))) == 1  # after the block: only its output crosses the cut
    with torch.no_grad():
        full = model(x)
        for k in (1, 2, 3, 5, len(units) - 1):
            assert torch.equal(split.segment(k, None)(*split.segment(0, k)(x)), full)
        mid = split.segment(2, 5)(*split.segment(0, 2)(x))
        assert torch.equal(split.segment(5, None)(*mid), full)


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.a(self.b(self.a(x))).mean((2, 3)))


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.b(self.drop(self.a(x))).mean((2, 3)))


class _Untraceable(_Dropout):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return super().forward(x)


def _static(tiny_overrides, k: float):
    return tiny_overrides + ["data.synthetic_channels=3", "policy=static", "policy.at_step=0", f"policy.fraction={k}",
                             "trainer.cache_frozen_prefix=true"] + OFF


def test_a_prefix_that_runs_a_trainable_unit_is_refused(tiny_overrides):
    model = _Reused()
    units = partition(model, example_batch(3, 8), "layer").units
    assert [u.name for u in units] == ["a", "b", "head"]
    for p in units[0].parameters:
        p.requires_grad_(False)
    split = ModelSplit(model, units)
    with pytest.raises(ConfigError, match="cannot be split after unit 0"):
        split.check_cut(1)


def test_dropout_in_the_prefix_is_refused(tiny_overrides):
    # a cut after unit a stops before the dropout: allowed, and training runs
    Trainer(load_config(_static(tiny_overrides, 0.5)), model=_Dropout()).fit()
    # a cut after unit b would store the dropout's random output
    t = Trainer(load_config(_static(tiny_overrides, 1.0)), model=_Dropout())
    with pytest.raises(ConfigError, match="dropout 'drop'"):
        t.fit()


def test_untraceable_model_is_refused_at_construction(tiny_overrides):
    with pytest.raises(ConfigError, match="cannot be traced by torch.fx.*cache_frozen_prefix=false"):
        Trainer(load_config(_static(tiny_overrides, 0.5)), model=_Untraceable())


def test_random_augmentation_is_refused(tiny_overrides):
    from freezebench.zoo.data import build_data

    cfg = load_config(_static(tiny_overrides, 0.5))
    data = build_data(cfg.data, seed=0, device="cpu")
    data = dataclasses.replace(data, info=dataclasses.replace(data.info, random_augmentation=True))
    with pytest.raises(ConfigError, match="random augmentation; set data.augment=false"):
        Trainer(cfg, data=data)


def test_unfreezing_drops_values_past_the_new_prefix():
    model = build_model("tiny", num_classes=4, in_channels=3, image_size=8)
    units = partition(model, example_batch(3, 8), "layer").units
    for u in units[:2]:
        for p in u.parameters:
            p.requires_grad_(False)
    cache = PrefixCache(model, units, num_samples=6, dtype="fp32")
    x, idx = example_batch(3, 8, batch=6), torch.arange(6)
    cache.forward(x, idx, {0, 1})
    assert cache.stats["computed_from_input"] == 6 and (cache.level == 2).all()
    cache.forward(x, idx, {0, 1})
    assert cache.stats["served"] == 6
    cache.forward(x[:3], idx[:3], {0})  # unit 1 unfrozen: its stored outputs are stale
    assert sorted(cache.levels) == [1] and cache.level.tolist() == [1, 1, 1, 0, 0, 0]


def test_cache_config_choices_are_validated():
    with pytest.raises(ConfigError, match="trainer.cache_dtype='int8' is not one of bf16, fp16, fp32"):
        load_config(["trainer.cache_dtype=int8"])
    with pytest.raises(ConfigError, match="trainer.cache_location"):
        load_config(["trainer.cache_location=nvme"])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["pipetransformer", "autofreeze", "svcca"])
def test_any_policy_trains_the_same_with_an_fp32_cache(tiny_overrides, policy):
    from test_contract import SETTINGS

    base = tiny_overrides + [f"policy={policy}", *SETTINGS[policy]["overrides"]]
    _, ref, hist_ref = _fit(base)
    t, got, hist = _fit(base + ["trainer.cache_frozen_prefix=true", "trainer.cache_dtype=fp32"])
    assert _max_diff(ref, got) < 1e-5
    assert [h["freeze/frozen_units"] for h in hist] == [h["freeze/frozen_units"] for h in hist_ref]
    assert t.freezer.frozen_prefix() > 0 and t.cache.stats["computed_from_input"] > 0  # the cache was used
    assert hist[-1]["cost/tflops"] <= hist_ref[-1]["cost/tflops"]
