"""SpFDE: the FLOPs-targeted progressive schedule and its combination with sparsity and sieving."""

from __future__ import annotations

import random

import mlflow
import pytest

from freezebench.baselines.spfde import SpFDE, freeze_schedule, freeze_steps, freezing_saving
from freezebench.config import load_config
from freezebench.cost import CostModel
from freezebench.errors import ConfigError
from freezebench.trainer import Trainer


def test_freezing_saving_reference_value():
    cost = CostModel([1, 1, 1, 1])  # full step: 3 * 4 - 1 = 11 per sample
    # unit 0 frozen after step 5 of 10: steps 6..10 cost 4 + 3 + 2 = 9 -> 55 + 45 = 100 of 110
    assert freezing_saving(cost, 10, [5]) == pytest.approx(1 / 11)
    assert freezing_saving(cost, 10, []) == 0.0
    # units 0, 1 frozen after steps 0 and 5: 10 * 9 ... steps 1..5 at 9, 6..10 at 4 + 2 + 1 = 7 -> 80
    assert freezing_saving(cost, 10, [0, 5]) == pytest.approx(30 / 110)
    assert freeze_steps(3, 4, 5, 12) == [3, 7, 11]


def test_schedule_start_is_the_latest_meeting_the_target():
    rng = random.Random(0)
    for _ in range(20):
        cost = CostModel([rng.uniform(1, 10) for _ in range(6)], rng.uniform(0, 3))
        T, interval, count = rng.randint(20, 80), rng.randint(1, 6), rng.randint(1, 5)
        target = rng.uniform(0.0, 0.4)
        steps, saving = freeze_schedule(cost, T, interval, count, target)
        feasible = [t0 for t0 in range(T + 1)
                    if freezing_saving(cost, T, freeze_steps(t0, interval, count, T)) >= target]
        start = max(feasible) if feasible else 0
        assert steps == freeze_steps(start, interval, count, T)
        assert saving == pytest.approx(freezing_saving(cost, T, steps))
        if feasible:
            assert saving >= target


def test_policy_declares_sparsity_and_sieving():
    cfg = load_config(["policy=spfde"])
    assert cfg.sparsity.enabled is True and cfg.data.sieve.enabled is True
    off = load_config(["policy=spfde", "sparsity.enabled=false", "data.sieve.enabled=false"])
    assert off.sparsity.enabled is False and off.data.sieve.enabled is False
    assert load_config(["policy=full"]).sparsity.enabled is False
    with pytest.raises(ConfigError, match="policy.target_flops_reduction"):
        load_config(["policy=spfde", "policy.target_flops_reduction=1.0"])


def test_run_is_sparse_sieved_and_freezes_on_schedule(mlflow_uri, tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("trainer.max_steps_per_epoch")]
    cfg = load_config([*over, "policy=spfde", "trainer.epochs=4", "policy.interval_epochs=0.25",
                       "policy.target_flops_reduction=0.1", "model.granularity=layer", "sparsity.mask_every=2"])
    trainer = Trainer(cfg)
    pol: SpFDE = trainer.policy
    assert trainer.sparsity is not None and trainer.sieve is not None
    S = trainer.plan.steps_per_epoch
    assert S == 7  # the partial set: round(0.8 * 128) = 102 samples in batches of 16
    result = trainer.fit()
    events = trainer.freezer.events
    assert [e.unit for e in events] == pol.freezable[: len(events)]  # front first, in order
    assert [e.step for e in events] == [pol.start + k * pol.interval for k in range(len(events))]
    assert pol.interval == 2 and len(events) == 2 and result.metrics["policy/planned_saving"] >= 0.1
    assert result.metrics["data/samples_per_epoch"] == trainer.sieve.m
    assert result.metrics["sparsity/density"] == pytest.approx(0.2, abs=0.01)
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.data.params["sparsity.enabled"] == "True" and run.data.params["data.sieve.enabled"] == "True"
    assert run.data.metrics["cost/tflops"] < run.data.metrics["cost/tflops_full"]
