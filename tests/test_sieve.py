"""Data sieving (freezebench.features.sieve): partial set size, FIFO rotation, full coverage, trainer integration."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from freezebench.config import load_config
from freezebench.zoo.data import TensorLoader
from freezebench.errors import ConfigError
from freezebench.features.sieve import Sieve, SievedLoader
from freezebench.trainer import Trainer
from helpers import RecordSteps


def _loader(n=50, batch=8):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return TensorLoader(x, torch.zeros(n, dtype=torch.long), batch, shuffle=True, seed=3)


def test_update_moves_easiest_out_and_oldest_removed_in():
    s = Sieve(20, ratio=0.75, period=1, swap=0.4, seed=0)
    assert s.m == 15 and s.k == 2 and s.cycle_periods == math.ceil(5 / 2) + 1
    partial, removed = s.partial.clone(), s.removed.clone()
    losses = torch.arange(20, dtype=torch.float32).flip(0)  # sample i has loss 19 - i
    s.record(torch.arange(20), losses)
    s.update()
    easiest = sorted(partial.tolist(), key=lambda i: 19 - i)[:2]  # largest indices = lowest loss
    assert sorted(s.removed[-2:].tolist()) == sorted(easiest)  # appended at the queue's tail
    assert s.removed[:3].tolist() == removed[2:].tolist()  # the rest of the queue moved up
    assert sorted(s.partial[-2:].tolist()) == sorted(removed[:2].tolist())  # the head came back
    assert len(s.partial) == 15 and len(s.removed) == 5
    assert sorted(s.partial.tolist() + s.removed.tolist()) == list(range(20))
    assert torch.isinf(s.loss[removed[:2]]).all()  # returned samples have no recent loss yet


def test_unseen_samples_are_never_the_easiest():
    s = Sieve(10, ratio=0.5, period=1, swap=0.4, seed=1)
    assert s.k == 2
    seen = s.partial[:3]
    s.record(seen, torch.tensor([0.3, 0.1, 0.2]))  # the other two partial samples were not trained on
    s.update()
    assert s.removed[-2:].tolist() == [int(seen[1]), int(seen[2])]  # lowest losses, easiest first


@pytest.mark.parametrize("ratio,swap,period", [(0.8, 1.0, 1), (0.6, 0.3, 1), (0.7, 0.5, 2), (0.3, 1.0, 1)])
def test_every_sample_visited_within_a_cycle_and_size_kept(ratio, swap, period):
    n, batch = 50, 8
    base = _loader(n, batch)
    sieve = Sieve(n, ratio=ratio, period=period, swap=swap, seed=5)
    loader = SievedLoader(base, sieve)
    g = torch.Generator().manual_seed(0)
    assert len(loader) == math.ceil(sieve.m / batch)
    epochs = 6 * sieve.cycle_periods * period
    visited: list[set[int]] = []
    for e in range(epochs):
        loader.set_epoch(e)
        seen: list[int] = []
        steps = 0
        for x, y, idx in loader:
            assert torch.equal(x.view(-1), idx.float())  # the batch holds the samples it names
            sieve.record(idx, torch.rand(len(idx), generator=g))  # the trainer's per-sample losses
            seen += idx.tolist()
            steps += 1
        assert steps == len(loader)
        assert len(seen) == sieve.m == len(set(seen))  # one pass over the partial set, which keeps its size
        assert sorted(seen) == sorted(sieve.partial.tolist())
        visited.append(set(seen))
    window = sieve.cycle_periods * period
    for start in range(epochs - window + 1):
        assert set().union(*visited[start:start + window]) == set(range(n)), (start, window)
    assert sieve.updates == (epochs - 1) // period


def test_set_epoch_is_idempotent_and_updates_once_per_period():
    sieve = Sieve(30, ratio=0.5, period=2, swap=1.0, seed=0)
    loader = SievedLoader(_loader(30), sieve)
    for e in [0, 0, 1, 2, 2, 3, 4]:
        loader.set_epoch(e)
    assert sieve.updates == 2


def test_config_validation():
    with pytest.raises(ConfigError, match="data.sieve.ratio"):
        load_config(["data.sieve.ratio=0"])
    with pytest.raises(ConfigError, match="data.sieve.period"):
        load_config(["data.sieve.period=0"])


def test_trainer_epochs_are_shorter_and_plan_matches(mlflow_uri, tiny_overrides):
    over = [o for o in tiny_overrides if not o.startswith("trainer.max_steps_per_epoch")]
    cfg = load_config([*over, "policy=full", "data.sieve.enabled=true", "data.sieve.ratio=0.5"])
    seen = RecordSteps()
    trainer = Trainer(cfg, hooks=[seen])
    n = trainer.data.info.num_train  # 128 of the 160 synthetic samples
    m = round(0.5 * n)
    assert trainer.plan.steps_per_epoch == math.ceil(m / 16) == len(trainer.data.train)
    result = trainer.fit()
    assert len(seen.steps) == trainer.plan.total_steps  # the plan's steps are the real steps
    assert [h["data/samples_per_epoch"] for h in result.history] == [m] * 3
    assert trainer.sieve.updates == 2  # at the starts of epochs 1 and 2
    full = result.history[-1]["cost/tflops_full"]
    assert result.metrics["cost/tflops"] == pytest.approx(trainer.cost.full_step_flops * 3 * m / 1e12, rel=1e-12)
    assert full == pytest.approx(result.metrics["cost/tflops"], rel=1e-12)  # nothing frozen, dense
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.data.metrics["data/samples_per_epoch"] == m
