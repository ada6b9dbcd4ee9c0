"""AutoFreeze: the pure core on crafted gradient norms, the policy on crafted gradients, a tiny run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from freezebench.baselines.autofreeze import (
    AutoFreeze,
    AutoFreezeConfig,
    autofreeze_prefix,
    decide_prefix,
    eval_offsets,
    percentile_linear,
    relative_changes,
)
from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.policy import Plan, Signal, Signals
from freezebench.trainer import Trainer
from freezebench.units import Unit
from helpers import assert_state_equal

INF = math.inf


# --- pure core ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spe, m, expected", [
    (4, 4, [1, 2, 3, 4]),
    (8, 4, [2, 4, 6, 8]),
    (10, 4, [3, 5, 8, 10]),  # not divisible: ceil(k*S/M)
    (2, 4, [1, 2]),  # fewer steps than evaluations: every step
    (1, 4, [1]),
    (391, 4, [98, 196, 294, 391]),
    (7, 1, [7]),  # once per epoch, at its end
])
def test_eval_offsets(spe, m, expected):
    assert eval_offsets(spe, m) == expected


@pytest.mark.parametrize("spe, m", [(12, 4), (100, 4), (12, 3), (9, 9)])
def test_eval_offsets_divisible_is_modulo_rule(spe, m):
    assert eval_offsets(spe, m) == [s for s in range(1, spe + 1) if s % (spe // m) == 0]


def test_percentile_matches_numpy_and_torch():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8, 13):
        v = rng.random(n).tolist()
        for q in (0, 10, 25, 33.3, 50, 75, 90, 100):
            ours = percentile_linear(v, q)
            assert ours == pytest.approx(float(np.percentile(v, q)), abs=1e-12)
            assert ours == pytest.approx(torch.quantile(torch.tensor(v, dtype=torch.float64), q / 100).item(),
                                         abs=1e-12)


def test_percentile_exact_values_and_inf():
    assert percentile_linear([0.3, 0.01, 0.5, 0.02], 50) == pytest.approx(0.16)
    assert percentile_linear([4.0], 50) == 4.0
    assert percentile_linear([1.0, INF], 50) == INF
    assert percentile_linear([1.0, INF, INF], 50) == INF  # numpy would give nan (inf - inf)
    assert percentile_linear([1.0, 2.0, INF], 50) == 2.0
    with pytest.raises(ValueError):
        percentile_linear([], 50)


def test_relative_changes_edge_cases():
    r = relative_changes([10.0, 0.0, 0.0, 5.0, INF, 4.0], [12.0, 0.0, 3.0, 0.0, 1.0, float("nan")])
    assert r == [pytest.approx(0.2), 0.0, INF, 0.0, INF, INF]
    with pytest.raises(ValueError):
        relative_changes([1.0], [1.0, 2.0])


@pytest.mark.parametrize("g_prev, g_now, pct, k", [
    # r = .01 .02 .3 .5 -> median .16: the two converged front units freeze
    ([10, 10, 10, 10], [10.1, 10.2, 13, 15], 50, 2),
    # r = .01 .5 .02 .6 .03 -> median .03: a non-converged unit in the middle stops the run at 1,
    # although unit 2 (r = .02) is below the threshold too
    ([10, 10, 10, 10, 10], [10.1, 15, 10.2, 16, 10.3], 50, 1),
    # the front unit is the least converged: nothing freezes
    ([10, 10, 10], [20, 10.1, 10.2], 50, 0),
    # G_prev = 0 at the front: r = inf, nothing freezes
    ([0, 10, 10], [1, 10.1, 20], 50, 0),
    # G_prev = 0 later: r = .01 .02 inf 1 -> median (.02 + 1) / 2 = .51, the run stops at the inf
    ([10, 10, 0, 10], [10.1, 10.2, 5, 20], 50, 2),
    # G_prev = G_now = 0 (no gradient at all): r = 0, converged; thr = .01
    ([0, 10, 10], [0, 10.1, 20], 50, 1),
    # a unit whose gradient vanished (G_now = 0): r = 0
    ([10, 10, 10], [0, 12, 14], 50, 1),
    # one active unit: thr is its own r and r < r is false
    ([10], [10.1], 50, 0),
    ([10], [10.0], 50, 0),
    # ties at the threshold do not freeze
    ([10, 10, 10, 10], [11, 11, 11, 11], 50, 0),
    # percentile 100: thr = max r, everything before the maximum freezes; percentile 0: nothing
    ([10, 10, 10], [11, 12, 13], 100, 2),
    ([10, 10, 10], [11, 12, 13], 0, 0),
    # percentile 25 of r = .1 .2 .3 .4 -> .175: only the first
    ([10, 10, 10, 10], [11, 12, 13, 14], 25, 1),
    ([], [], 50, 0),
])
def test_decide_prefix(g_prev, g_now, pct, k):
    assert decide_prefix(g_prev, g_now, pct) == k


def test_autofreeze_prefix():
    assert autofreeze_prefix([0.1, 0.2, 0.9, 0.1], 0.5) == 2
    assert autofreeze_prefix([0.5, 0.1], 0.5) == 0
    assert autofreeze_prefix([INF, 0.0], INF) == 0
    assert autofreeze_prefix([], 1.0) == 0


def test_validate_config():
    AutoFreeze.validate_config(AutoFreezeConfig())
    with pytest.raises(ConfigError, match="evals_per_epoch"):
        AutoFreeze.validate_config(AutoFreezeConfig(evals_per_epoch=0))
    with pytest.raises(ConfigError, match="percentile"):
        AutoFreeze.validate_config(AutoFreezeConfig(percentile=101))


def test_class_attributes():
    assert AutoFreeze.name == "autofreeze"
    assert AutoFreeze.needs == frozenset({Signal.GRADS})
    assert AutoFreeze.granularity == "block"
    assert AutoFreeze.allows_unfreeze is False
    assert AutoFreezeConfig().evals_per_epoch == 4 and AutoFreezeConfig().percentile == 50.0


# --- the policy on crafted gradients ------------------------------------------------------------------
SHAPES = [[(2, 2), (2,)], [(3,)], [(5,)], [(2,)], [(2,)]]  # unit 0 has two tensors; the last is the head


def make_units() -> list[Unit]:
    units = []
    for i, shapes in enumerate(SHAPES):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        units.append(Unit(index=i, name=f"u{i}", module_names=[f"u{i}"], modules=[], param_names=[
            f"u{i}.p{j}" for j in range(len(params))], parameters=params, norm_modules=[],
            is_head=i == len(SHAPES) - 1))
    return units


NUMEL = [sum(math.prod(s) for s in shapes) for shapes in SHAPES]  # 6, 3, 5, 2, 2

# Per-step mean gradient (same value in every element) of each freezable unit in each evaluation interval
# (2 steps each). Expected: interval 2 r = .01 .5 .02 1 (median .26) -> freeze unit 0 after step 4;
# interval 3 (units 1..3) r = .001 .002 .5 (median .002, strict) -> freeze unit 1 after step 6;
# interval 4 (units 2, 3) r = .001 .5 -> freeze unit 2 after step 8; unit 3, alone, never freezes.
MEANS = [
    [1.0, 1.0, 1.0, 1.0],
    [1.01, 1.5, 1.02, 2.0],
    [1.01, 1.5 * 1.001, 1.02 * 1.002, 3.0],
    [1.01, 1.5, 1.02 * 1.002 * 1.001, 4.5],
    [1.01, 1.5, 1.02, 4.5 * 1.01],
]
EXPECTED = [(4, [0]), (6, [1]), (8, [2])]


def set_grads(units, frozen, step):
    """Gradients of step ``step``: mean + 5 on odd steps, mean - 5 on even ones, so the accumulated sum is
    2 * mean per element while the sum of per-step L1 norms would be about 10 per element."""
    mean = MEANS[(step - 1) // 2]
    for u in units:
        for p in u.parameters:
            if u.is_head or u.index in frozen:
                p.grad = None  # the trainer removes frozen units from the graph
            else:
                p.grad = torch.full_like(p, mean[u.index] + (5.0 if step % 2 else -5.0))


def drive(policy, units, steps, frozen=frozenset(), start=1):
    """Play the trainer's role for ``steps``; return the decisions [(step, units)] and the frozen set."""
    decisions = []
    for step in range(start, start + steps):
        set_grads(units, frozen, step)
        if policy.observe_at(step):
            policy.observe(step, Signals(step=step, epoch=step / policy.plan.steps_per_epoch, units=units))
        if policy.decide_at(step):
            d = policy.decide(step)
            if d:
                decisions.append((step, list(d.freeze)))
                frozen = frozen | set(d.freeze)
                policy.notify_frozen(frozenset(frozen))
    return decisions, frozen


PLAN = Plan(epochs=3, steps_per_epoch=4, batch_size=1, base_lr=0.1, seed=0)


def make_policy(units=None, **kw):
    units = units if units is not None else make_units()
    policy = AutoFreeze(AutoFreezeConfig(evals_per_epoch=2, **kw))
    policy.setup(units, PLAN)
    return policy, units


def test_policy_freezes_expected_prefix_at_expected_evaluations():
    policy, units = make_policy()
    assert not policy.decide_at(0)  # nothing before the first step
    assert [s for s in range(1, 13) if policy.decide_at(s)] == [2, 4, 6, 8, 10, 12]
    decisions, frozen = drive(policy, units, 10)
    assert decisions == EXPECTED
    assert frozen == {0, 1, 2}
    # unit 3 is alone now: it could never freeze, so the policy stops observing and evaluating
    assert policy._tracked == [] and policy._flat_acc == [] and policy._g_prev == {}
    assert not policy.observe_at(11) and not policy.decide_at(12)


def test_norms_are_of_accumulated_gradients_per_step_mean():
    policy, units = make_policy()
    drive(policy, units, 2)  # first evaluation: no decision, G stored
    assert policy._g_prev == pytest.approx({u: MEANS[0][u] * NUMEL[u] for u in range(4)})
    assert all(float(a.abs().sum()) == 0.0 for a in policy._flat_acc)  # reset after the evaluation
    drive(policy, units, 1, start=3)  # mid-interval: accumulators hold one step (mean + 5)
    assert float(policy._acc[1][0].sum()) == pytest.approx((MEANS[1][1] + 5) * NUMEL[1])


def test_frozen_units_are_dropped_from_accumulation():
    policy, units = make_policy()
    assert len(policy._flat_acc) == 5  # units 0..3 (head excluded): 2 + 1 + 1 + 1 tensors
    drive(policy, units, 4)
    assert set(policy._acc) == {1, 2, 3} and len(policy._flat_acc) == 3
    assert 0 not in policy._g_prev


def test_unused_parameters_are_skipped():
    policy, units = make_policy()
    set_grads(units, frozenset(), 1)
    units[2].parameters[0].grad = None
    policy.observe(1, Signals(step=1, epoch=0.25, units=units))
    assert float(policy._acc[2][0].abs().sum()) == 0.0
    assert float(policy._acc[1][0].sum()) == pytest.approx(6.0 * NUMEL[1])


def test_percentile_config_changes_decisions():
    policy, units = make_policy(percentile=100)  # thr = max r: everything before the largest r freezes
    decisions, _ = drive(policy, units, 4)
    assert decisions == [(4, [0, 1, 2])]


def test_state_round_trip_mid_interval():
    policy, units = make_policy()
    decisions, frozen = drive(policy, units, 5)  # unit 0 frozen at step 4, one step into interval 3
    assert decisions == EXPECTED[:1]
    state = policy.state_dict()
    assert state["tracked"] == [1, 2, 3] and state["steps"] == 1 and state["evals"] == 2
    assert set(state["g_prev"]) == {1, 2, 3}
    assert float(state["acc"][1][0].sum()) == pytest.approx((MEANS[2][1] + 5) * NUMEL[1])

    clone = AutoFreeze(policy.cfg)
    clone.setup(units, PLAN)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)
    clone.notify_frozen(frozenset(frozen))  # the trainer restores the frozen set on resume

    # the saved state is a copy: training on does not change it
    before = copy.deepcopy(state)
    rest, _ = drive(policy, units, 5, frozen, start=6)
    assert_state_equal(state, before)
    rest_clone, _ = drive(clone, units, 5, frozen, start=6)
    assert rest == rest_clone == EXPECTED[1:]


def test_load_state_rejects_mismatched_units():
    policy, units = make_policy()
    state = policy.state_dict()
    state["acc"][0] = state["acc"][0][:1]
    with pytest.raises(ValueError, match="unit 0"):
        make_policy(units)[0].load_state_dict(state)


# --- end to end ---------------------------------------------------------------------------------------
def test_tiny_run_freezes_a_prefix_at_evaluation_steps(tiny_overrides, tmp_path):
    # granularity auto -> the policy's "block" (on the tiny model the same two units as "layer")
    cfg = load_config([*tiny_overrides, "tracking.enabled=false", "trainer.save_checkpoint=false",
                       f"trainer.output_dir={tmp_path}"])
    policy = AutoFreeze(AutoFreezeConfig(evals_per_epoch=2))
    trainer = Trainer(cfg, policy=policy)
    assert trainer.partition.granularity == "block"
    result = trainer.fit()
    frozen = sorted(trainer.freezer.frozen)
    freezable = policy.freezable
    assert frozen, "expected the tiny model's first unit to freeze"
    assert frozen == freezable[: len(frozen)]  # a prefix
    assert freezable[-1] not in frozen  # the last freezable unit is never frozen by this rule
    assert all(e.action == "freeze" and e.step % 2 == 0 and e.step >= 4 for e in result.events)
    for i in frozen:
        assert all(p.grad is None and not p.requires_grad for p in trainer.units[i].parameters)
    active = policy.active_units()
    assert set(policy._acc) == (set(active) if len(active) >= 2 else set())  # a lone unit is not tracked
    assert math.isfinite(result.metrics["time/policy_total_s"])
