"""Sparse training (freezebench.features.sparsity): densities, masks that stay zero, prune-and-regrow, cost scaling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlflow
import pytest
import torch
from torch import nn

from freezebench.config import SparsityConfig, load_config
from freezebench.cost import CostModel
from freezebench.errors import ConfigError
from freezebench.trainer.freezer import Freezer, param_groups
from freezebench.features.sparsity import Sparsity, erk_densities, keep_count, uniform_densities
from freezebench.trainer import Trainer
from freezebench.units import partition


def test_erk_densities_reference_values():
    # raw sum(shape)/prod(shape): 1/6, 1/16, 0.225; eps = 220/48 puts the linear layer over 1 -> dense;
    # then eps = 140/30: 7/9 and 7/24 (worked by hand)
    d = erk_densities([(4, 2, 3, 3), (8, 4, 3, 3), (10, 8)], 0.5)
    assert d == pytest.approx([7 / 9, 7 / 24, 1.0], abs=1e-12)
    kept = sum(x * n for x, n in zip(d, (72, 288, 80)))
    assert kept == pytest.approx(220)
    assert uniform_densities([(3, 3), (2, 2)], 0.25) == [0.25, 0.25]
    assert keep_count(10, 0.01) == 1 and keep_count(10, 0.55) == 6 and keep_count(10, 1.0) == 10


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _setup(cfg_kw, momentum=0.9, model=None):
    model = model or _mlp()
    part = partition(model, torch.randn(2, 8), "layer")
    opt = torch.optim.SGD(param_groups(part.units), lr=0.1, momentum=momentum, weight_decay=5e-4)
    cfg = SparsityConfig(enabled=True, **cfg_kw)
    sp = Sparsity(cfg, model, part.units, opt, total_steps=100, seed=0)
    return model, part, opt, sp


def _train(model, opt, sp, steps, start=0):
    g = torch.Generator().manual_seed(1)
    for s in range(start, start + steps):
        x = torch.randn(16, 8, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.after_step(s + 1)


def test_masks_keep_zeros_through_momentum_and_density_holds():
    model, part, opt, sp = _setup({"sparsity": 0.75, "distribution": "uniform", "mask_every": 0})
    assert [n for n in sp.names] == ["0", "2"]  # the head (last linear) stays dense
    kept = [int(m.sum()) for m in sp.masks]
    assert kept == [32, 64]  # round(0.25 * 128), round(0.25 * 256)
    _train(model, opt, sp, 5)
    for p, m in zip(sp.params, sp.masks):
        assert torch.equal(p.detach()[m == 0], torch.zeros(int((m == 0).sum())))
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(buf[m == 0], torch.zeros(int((m == 0).sum())))
        assert (p.detach()[m == 1] != 0).all()  # kept weights train
    assert [int(m.sum()) for m in sp.masks] == kept
    assert sp.density() == 96 / 384


def test_prune_regrow_keeps_count_zeros_new_weights_and_prunes_smallest():
    model, part, opt, sp = _setup({"sparsity": 0.5, "distribution": "uniform", "mask_every": 3,
                                   "update_fraction": 0.25, "update_until": 1.0})
    _train(model, opt, sp, 2)
    before = [m.clone() for m in sp.masks]
    w_before = [p.detach().clone() for p in sp.params]
    kept = [int(m.sum()) for m in before]
    sp.update()
    for mb, ma, w, k in zip(before, sp.masks, w_before, kept):
        assert int(ma.sum()) == k  # density holds exactly
        pruned = (mb == 1) & (ma == 0)
        grown = (mb == 0) & (ma == 1)
        n = round(0.25 * k)
        assert int(pruned.sum()) == n and int(grown.sum()) == n
        # the pruned ones are the smallest-magnitude kept weights
        survivors = w.abs()[(mb == 1) & (ma == 1)]
        assert w.abs()[pruned].max() <= survivors.min()
    sp.apply()
    for p, m, mb in zip(sp.params, sp.masks, before):
        grown = (mb == 0) & (m == 1)
        assert torch.equal(p.detach()[grown], torch.zeros(int(grown.sum())))  # regrown start at zero
        assert torch.equal(p.detach()[m == 0], torch.zeros(int((m == 0).sum())))
    # keep training across a scheduled update (step 3, 6): zeros stay zero, counts hold
    _train(model, opt, sp, 5, start=2)
    assert sp.updates == 3  # the manual one and steps 3 and 6
    for p, m, k in zip(sp.params, sp.masks, kept):
        assert int(m.sum()) == k
        assert torch.equal(p.detach()[m == 0], torch.zeros(int((m == 0).sum())))


def test_frozen_units_keep_their_masks_at_updates():
    model, part, opt, sp = _setup({"sparsity": 0.5, "distribution": "uniform", "mask_every": 1,
                                   "update_fraction": 0.5, "update_until": 1.0})
    freezer = Freezer(model, part.units, opt)
    freezer.freeze([0], step=0, epoch=0.0)
    m0 = sp.masks[0].clone()
    w0 = sp.params[0].detach().clone()
    m1 = sp.masks[1].clone()
    _train(model, opt, sp, 2)
    assert torch.equal(sp.masks[0], m0) and torch.equal(sp.params[0].detach(), w0)
    assert not torch.equal(sp.masks[1], m1)


def test_unit_flops_scale_by_density():
    model, part, opt, sp = _setup({"sparsity": 0.5, "distribution": "uniform", "mask_every": 0})
    scaled = sp.unit_flops(part)
    # linear FLOPs 2 * in * out per sample: 256 and 512 halved; the dense head 2 * 16 * 4 = 128
    assert [u.flops for u in part.units] == [256.0, 512.0, 128.0]
    assert scaled == [128.0, 256.0, 128.0]


def test_config_validation():
    with pytest.raises(ConfigError, match="sparsity.sparsity"):
        load_config(["sparsity.sparsity=1.0"])
    with pytest.raises(ConfigError, match="sparsity.distribution"):
        load_config(["sparsity.distribution=random"])


def test_trainer_trains_sparse_and_counts_density(mlflow_uri, tiny_overrides):
    cfg = load_config([*tiny_overrides, "policy=full", "sparsity.enabled=true", "sparsity.sparsity=0.5",
                       "sparsity.distribution=uniform", "sparsity.mask_every=2", "sparsity.dense_head=false"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    sp = trainer.sparsity
    assert sp.updates > 0
    for p, m in zip(sp.params, sp.masks):
        assert torch.equal(p.detach()[m == 0], torch.zeros(int((m == 0).sum())))
    exact = sum(int(m.sum()) for m in sp.masks) / sum(m.numel() for m in sp.masks)
    assert result.metrics["sparsity/density"] == exact
    assert abs(exact - 0.5) < 0.01
    # cost/tflops: the density-scaled cost model times the samples; tflops_full: the dense one
    samples = result.history[0]["data/samples_per_epoch"]
    scaled = CostModel(sp.unit_flops(trainer.partition),
                       trainer.partition.other_flops).full_step_flops
    assert result.history[0]["cost/tflops_epoch"] == pytest.approx(scaled * samples / 1e12, rel=1e-12)
    assert result.history[0]["cost/tflops_full"] == pytest.approx(trainer.dense_full_step_flops * samples / 1e12,
                                                                  rel=1e-12)
    assert result.metrics["cost/tflops"] < result.metrics["cost/tflops_full"]
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["sparsity/density"] == exact
    assert run.data.params["sparsity.enabled"] == "True"
