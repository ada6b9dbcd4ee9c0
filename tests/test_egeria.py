"""Egeria: plasticity against the reference, reference refresh timing, the background worker, decisions."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from freezebench.baselines.egeria import (Egeria, EgeriaConfig, quantize_int8_, reference_grams, slope,
                                          within_tolerance)
from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.policy import Plan, Signals
from freezebench.analysis.similarity import sp_gram, sp_loss, sp_loss_from_grams
from freezebench.trainer import Trainer
from freezebench.units import capture_outputs, partition


def test_slope_reference_values():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    # x mean 1.5, y mean 0.001: num 0.003, den 5
    assert slope([0.0, 0.001, 0.001, 0.002]) == pytest.approx(6e-4)
    assert slope([5.0]) == 0.0
    assert within_tolerance([9.0, 0.0, 0.001, 0.001, 0.002], 4, 6e-4 + 1e-12)
    assert not within_tolerance([0.0, 0.001, 0.001, 0.002], 4, 5e-4)
    assert not within_tolerance([0.0, 0.0], 3, 1.0)  # window not full
    assert not within_tolerance([0.0, float("nan"), 0.0], 3, 1.0)


def test_sp_grams_match_sp_loss():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, 3, generator=g), torch.randn(12, 7, generator=g)
    assert sp_loss_from_grams(sp_gram(a), sp_gram(b)) == pytest.approx(sp_loss(a, b), rel=1e-12)
    assert sp_loss_from_grams(sp_gram(a), sp_gram(a.clone())) == 0.0


def test_int8_quantisation_is_per_channel_int8():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    w = m[0].weight.detach().clone()
    bn = m[1].weight.detach().clone()
    quantize_int8_(m)
    q = m[0].weight.detach()
    scale = w.abs().reshape(4, -1).amax(1).view(4, 1, 1, 1) / 127
    codes = q / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-7
    assert torch.equal(m[1].weight.detach(), bn)  # norm layers stay float32
    lq = m[3].weight.detach()
    assert len(torch.unique(lq[0])) <= 255


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    probe = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    units = partition(model, probe[:2], "layer").units
    return model, units, probe


def _signals(step, model, units, probe, policy):
    acts = capture_outputs(model, units, policy.probe_units(), probe)
    return Signals(step=step, epoch=0.0, units=units, activations=acts, probe_inputs=probe, model=model)


def _policy(units, epochs=6, spe=4, **kw):
    cfg = EgeriaConfig(**{"checks_per_epoch": 2, "bootstrap_epochs": 1, "refresh_every": 2, "window": 2,
                          "patience": 1, "asynchronous": False, **kw})
    pol = Egeria(cfg)
    pol.setup(units, Plan(epochs=epochs, steps_per_epoch=spe, batch_size=4, base_lr=0.1, seed=0))
    return pol


def test_plasticity_against_an_identical_copy_is_zero():
    model, units, probe = _tiny()
    pol = _policy(units, precision="fp32")
    assert pol.refreshes == {4, 12, 20}
    pol.observe(4, _signals(4, model, units, probe, pol))  # the reference is made from these weights
    assert pol.probe_units() == [0, 1]
    pol.observe(6, _signals(6, model, units, probe, pol))  # the model did not change
    assert pol.ref_version == 1 and pol.ref_step == 4
    assert pol.histories == {0: [0.0], 1: [0.0]}
    # int8: the reference differs by the quantisation error only (small, not zero)
    pol8 = _policy(units, precision="int8")
    pol8.observe(4, _signals(4, model, units, probe, pol8))
    pol8.observe(6, _signals(6, model, units, probe, pol8))
    assert all(0.0 < h[0] < 1e-3 for h in pol8.histories.values())


def test_reference_refreshed_when_due_in_a_run(tiny_overrides):
    cfg = load_config([*tiny_overrides, "policy=egeria", "trainer.epochs=5", "policy.asynchronous=false",
                       "policy.refresh_every=2", "policy.checks_per_epoch=2", "policy.tolerance=0",
                       "tracking.enabled=false", "model.granularity=layer"])
    trainer = Trainer(cfg)
    pol = trainer.policy
    refs = []
    observe = pol.observe

    def spy(step, signals):
        observe(step, signals)
        refs.append((step, pol.ref_version, pol.ref_step))

    pol.observe = spy
    trainer.fit()
    assert pol.refreshes == {4, 12}  # after the bootstrap epoch, then every 2 epochs (4 steps per epoch)
    assert pol.submitted == 2
    # consumed at the first check after each refresh (inline mode: ready at once)
    assert [r for r in refs if r[0] in (4, 6, 12, 14)] == [(4, 0, None), (6, 1, 4), (12, 1, 4), (14, 2, 12)]


def test_background_reference_never_blocks_a_step(monkeypatch):
    model, units, probe = _tiny()
    release = threading.Event()
    started = threading.Event()

    def slow_job(*args):
        started.set()
        release.wait(30)
        return reference_grams(*args)

    monkeypatch.setattr(Egeria, "_job", staticmethod(slow_job))
    pol = _policy(units, precision="int8", asynchronous=True)
    try:
        t0 = time.perf_counter()
        pol.observe(4, _signals(4, model, units, probe, pol))  # submits and returns
        assert started.wait(10)
        pol.observe(6, _signals(6, model, units, probe, pol))  # not ready: skipped, not awaited
        assert pol.decide(6) is None
        assert time.perf_counter() - t0 < 10 and not release.is_set()
        assert pol.ref is None and pol.ref_version == 0 and pol.pending_checks == 1 and pol.probe_units() == []
        release.set()
        pol.pending.result(timeout=30)
        pol.observe(8, _signals(8, model, units, probe, pol))
        assert pol.ref_version == 1 and pol.ref_step == 4 and set(pol.histories) == {0, 1}
    finally:
        release.set()
        pol.close()


def test_front_most_unit_freezes_after_patience_and_lr_drops_unfreeze():
    model, units, probe = _tiny()
    cfg = EgeriaConfig(checks_per_epoch=2, window=2, patience=2, tolerance=1e-3, asynchronous=False)
    pol = Egeria(cfg)
    pol.setup(units, Plan(epochs=6, steps_per_epoch=4, batch_size=4, base_lr=0.1, seed=0, lr_drops=(13,)))
    pol.ref = {0: torch.zeros(1), 1: torch.zeros(1)}
    pol.histories = {0: [0.1, 0.1], 1: [0.2, 0.2]}
    pol.within = {0: 1, 1: 5}
    assert pol.decide(6) is None  # unit 1 is ready but unit 0 (front) is not: prefix only
    pol.within[0] = 2
    d = pol.decide(8)
    assert list(d.freeze) == [0] and not d.unfreeze
    pol.notify_frozen(frozenset({0}))
    d = pol.decide(10)
    assert list(d.freeze) == [1]  # one unit per check
    pol.notify_frozen(frozenset({0, 1}))
    assert pol.decide(12) is None
    d = pol.decide(14)  # the drop after step 13 falls between the checks at 12 and 14
    assert sorted(d.unfreeze) == [0, 1] and not d.freeze and pol.histories == {}
    pol.notify_frozen(frozenset())
    assert pol.decide(16) is None and pol.unfreezes == 1


def test_step_schedule_run_unfreezes(tiny_overrides):
    cfg = load_config([*tiny_overrides, "policy=egeria", "trainer.epochs=4", "policy.asynchronous=false",
                       "policy.refresh_every=1", "policy.checks_per_epoch=4", "policy.window=2",
                       "policy.patience=1", "policy.tolerance=1.0", "schedule.name=step", "schedule.milestones=[3]",
                       "tracking.enabled=false", "model.granularity=layer"])
    trainer = Trainer(cfg)
    assert trainer.plan.lr_drops == (12,)
    trainer.fit()
    actions = [(e.action, e.unit, e.step) for e in trainer.freezer.events]
    # units froze before the drop, all were unfrozen at the check right before the first low-lr step
    assert ("freeze", 0, 6) in actions and ("unfreeze", 0, 12) in actions


def test_config_validation():
    with pytest.raises(ConfigError, match="policy.window"):
        load_config(["policy=egeria", "policy.window=1"])
    with pytest.raises(ConfigError, match="policy.precision"):
        load_config(["policy=egeria", "policy.precision=int4"])
