"""FreezeOut (linear, cubic) and PipeTransformer's geometric schedule: exact schedules and tiny runs."""

from __future__ import annotations

import math

import pytest

from freezebench.baselines.freezeout import (
    FreezeOutCubic,
    FreezeOutCubicConfig,
    FreezeOutLinear,
    FreezeOutLinearConfig,
    cosine_scale,
    freeze_fraction,
    freeze_fractions,
    freeze_iterations,
    lr_scale,
)
from freezebench.baselines.pipetransformer import PipeTransformerConfig, PipeTransformerFreezing, frozen_prefix
from freezebench.config import load_config, reference_rows
from freezebench.errors import ConfigError
from freezebench.policy import Plan
from freezebench.trainer import Trainer, lr_factor
from helpers import assert_state_equal

LR0 = 0.05  # optim.lr default
T = 12  # tiny runs: 3 epochs x 4 steps


# --- FreezeOut: the pure schedule ----------------------------------------------------------------------


def test_freeze_fractions_reference_indexing():
    # the first unit stops at s(t0), the head (i = L) at 1
    assert freeze_fractions(4, 0.5, "linear") == [0.5, 0.625, 0.75, 0.875]
    assert freeze_fraction(4, 4, 0.5, "linear") == 1.0
    assert freeze_fraction(4, 4, 0.8, "cubic") == 1.0
    assert freeze_fractions(4, 0.8, "cubic") == pytest.approx([0.512, 0.614125, 0.729, 0.857375], abs=1e-12)


@pytest.mark.parametrize(
    "L, t0, steps, mode, expected",
    [
        # t = 0.5, 0.625, 0.75, 0.875 -> 50, 62.5, 75, 87.5
        (4, 0.5, 100, "linear", [50, 63, 75, 88]),
        # t = 0.4, 0.55, 0.7, 0.85: 0.55 * 100 is 55.00000000000001 in floating point, must stay 55
        (4, 0.4, 100, "linear", [40, 55, 70, 85]),
        # t = 0.8^3, 0.85^3, 0.9^3, 0.95^3 = 0.512, 0.614125, 0.729, 0.857375
        (4, 0.8, 100, "cubic", [52, 62, 73, 86]),
        # the tiny model: 2 freezable units, 12 steps
        (2, 0.5, 12, "linear", [6, 9]),  # t = 0.5, 0.75
        (2, 0.8, 12, "cubic", [7, 9]),  # 12 * 0.512 = 6.144, 12 * 0.729 = 8.748
        (3, 1.0, 10, "linear", [10, 10, 10]),  # t0 = 1: nothing stops before the end
    ],
)
def test_freeze_iterations_exact(L, t0, steps, mode, expected):
    assert freeze_iterations(L, t0, steps, mode) == expected


def test_freeze_iteration_is_first_step_with_tau_at_least_t():
    for mode, t0 in (("linear", 0.3), ("linear", 0.5), ("cubic", 0.8)):
        for L in (1, 3, 7):
            for steps in (9, 50, 120):
                for t, it in zip(freeze_fractions(L, t0, mode), freeze_iterations(L, t0, steps, mode)):
                    assert it / steps >= t - 1e-12 and (it - 1) / steps < t


def test_cosine_scaled_and_unscaled():
    # linear, L = 2, t0 = 0.5: unit 0 stops at 0.5, unit 1 at 0.75
    assert lr_scale(0, 0.0, 2, 0.5, "linear") == pytest.approx(2.0)  # lr0 / t_i
    assert lr_scale(0, 1 / 6, 2, 0.5, "linear") == pytest.approx(1.5)  # 0.5 * 2 * (1 + cos(pi/3))
    assert lr_scale(0, 0.25, 2, 0.5, "linear") == pytest.approx(1.0)  # half-way down
    assert lr_scale(0, 0.4, 2, 0.5, "linear") == pytest.approx(1 + math.cos(0.8 * math.pi))
    assert lr_scale(0, 0.5, 2, 0.5, "linear") == 0.0
    assert lr_scale(0, 0.9, 2, 0.5, "linear") == 0.0
    assert lr_scale(1, 0.375, 2, 0.5, "linear") == pytest.approx(2 / 3)  # 0.5 * (1/0.75) * (1 + cos(pi/2))
    # unscaled: the plain cosine from lr0
    assert lr_scale(0, 0.0, 2, 0.5, "linear", scale_lr=False) == pytest.approx(1.0)
    assert lr_scale(0, 1 / 6, 2, 0.5, "linear", scale_lr=False) == pytest.approx(0.75)
    assert lr_scale(0, 0.25, 2, 0.5, "linear", scale_lr=False) == pytest.approx(0.5)
    assert lr_scale(1, 0.375, 2, 0.5, "linear", scale_lr=False) == pytest.approx(0.5)
    # cubic, t0 = 0.8: unit 0 stops at 0.512
    assert lr_scale(0, 0.0, 2, 0.8, "cubic") == pytest.approx(1 / 0.512)
    assert lr_scale(0, 0.256, 2, 0.8, "cubic") == pytest.approx(0.9765625)  # 0.5 / 0.512
    assert lr_scale(0, 0.256, 2, 0.8, "cubic", scale_lr=False) == pytest.approx(0.5)
    assert lr_scale(0, 0.512, 2, 0.8, "cubic") == 0.0
    # the head (i = L, t = 1) follows the plain run-long cosine
    assert lr_scale(2, 0.5, 2, 0.8, "cubic") == pytest.approx(0.5)
    assert cosine_scale(1.0, 0.25, scale_lr=False) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_freezeout_config_defaults_and_validation():
    assert (FreezeOutLinearConfig().t0, FreezeOutLinearConfig().scale_lr) == (0.5, True)
    assert (FreezeOutCubicConfig().t0, FreezeOutCubicConfig().scale_lr) == (0.8, True)
    assert FreezeOutLinear.granularity == FreezeOutCubic.granularity == "block"
    for cls in (FreezeOutLinearConfig, FreezeOutCubicConfig, PipeTransformerConfig):
        keys = {k for k, _, comment in reference_rows(cls) if comment}
        assert keys >= {f for f in cls.__dataclass_fields__ if f != "name"}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="policy.t0"):
            FreezeOutLinear.validate_config(FreezeOutLinearConfig(t0=bad))
    for bad in (0.0, 1.2):
        with pytest.raises(ConfigError, match="policy.alpha"):
            PipeTransformerFreezing.validate_config(PipeTransformerConfig(alpha=bad))


# --- end to end on the tiny model ------------------------------------------------------------------------


def _trainer(tmp_path, policy, *extra):
    cfg = load_config([
        "model.name=tiny", "data.name=synthetic", "data.synthetic_samples=160", "data.batch_size=16",
        "trainer.epochs=3", "trainer.max_steps_per_epoch=4", "trainer.progress=false",
        "trainer.probe_batch_size=16", "tracking.system_metrics=false", "trainer.device=cpu",
        "tracking.enabled=false", f"trainer.output_dir={tmp_path}", *extra,
    ])
    return Trainer(cfg, policy=policy)


def _record_lrs(trainer):
    """unit -> lr of its param group at every optimiser step (None once the group is empty)."""
    seen: list[dict[int, float | None]] = []

    def hook(opt, args, kwargs):
        seen.append({g["unit"]: (g["lr"] if g["params"] else None) for g in opt.param_groups})

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize(
    "cls, cfg, t, freeze_at",
    [
        (FreezeOutLinear, FreezeOutLinearConfig(), [0.5, 0.75], [6, 9]),
        (FreezeOutLinear, FreezeOutLinearConfig(scale_lr=False), [0.5, 0.75], [6, 9]),
        (FreezeOutCubic, FreezeOutCubicConfig(), [0.512, 0.729], [7, 9]),
    ],
)
def test_freezeout_end_to_end(tmp_path, cls, cfg, t, freeze_at):
    trainer = _trainer(tmp_path, cls(cfg))
    assert trainer.partition.granularity == "block"
    assert [u.is_head for u in trainer.units] == [False, False, True]
    lrs = _record_lrs(trainer)
    trainer.fit()
    # both freezable units frozen, in forward order, at ceil(t_i * T)
    assert [(e.unit, e.step, e.action) for e in trainer.freezer.events] == [
        (0, freeze_at[0], "freeze"), (1, freeze_at[1], "freeze")]
    assert trainer.freezer.frozen == {0, 1}
    assert len(lrs) == T
    start = [1 / ti if cfg.scale_lr else 1.0 for ti in t]
    for k, row in enumerate(lrs):
        tau = k / T
        for u in (0, 1):
            if k < freeze_at[u]:  # the unit's own cosine, set by the policy
                want = LR0 * 0.5 * start[u] * (1 + math.cos(math.pi * tau / t[u]))
                assert row[u] == pytest.approx(want, rel=1e-12), (k, u)
            else:  # frozen: no parameters left in its group
                assert row[u] is None, (k, u)
        # the head stays on the global schedule
        assert row[2] == pytest.approx(LR0 * lr_factor(trainer.cfg.schedule, k, 4, T), rel=1e-12)
    # hand-computed spot checks (scaled linear: unit 0 starts at 2 * lr0, is at lr0 at tau = 1/4)
    if cls is FreezeOutLinear and cfg.scale_lr:
        assert lrs[0][0] == pytest.approx(0.1) and lrs[3][0] == pytest.approx(0.05)
        assert lrs[0][1] == pytest.approx(0.05 / 0.75)


def test_freezeout_state_round_trip_keeps_schedule():
    plan = Plan(epochs=3, steps_per_epoch=4, batch_size=16, base_lr=LR0, seed=0)

    class U:  # minimal stand-in for freezebench.units.Unit
        def __init__(self, index, is_head=False):
            self.index, self.is_head = index, is_head

    units = [U(0), U(1), U(2, is_head=True)]
    pol = FreezeOutCubic()
    pol.setup(units, plan)
    assert pol.freeze_steps == {0: 7, 1: 9}
    d0 = pol.decide(0)
    assert list(d0.freeze) == [] and d0.lr_scale == pytest.approx({0: 1 / 0.512, 1: 1 / 0.729})
    d7 = pol.decide(7)
    assert list(d7.freeze) == [0] and set(d7.lr_scale) == {1}
    state = pol.state_dict()
    # a resumed run with a longer plan keeps the saved schedule
    clone = FreezeOutCubic()
    clone.setup(units, Plan(epochs=6, steps_per_epoch=4, batch_size=16, base_lr=LR0, seed=0))
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)
    assert clone.decide(9).freeze == [0, 1]


# --- PipeTransformer --------------------------------------------------------------------------------------


def test_pipetransformer_schedule_exact():
    assert [frozen_prefix(12, 1 / 3, e) for e in range(1, 8)] == [4, 7, 9, 10, 11, 11, 12]
    assert [frozen_prefix(12, 1 / 3, e) for e in range(8, 20)] == [12] * 12  # capped at L
    assert frozen_prefix(12, 1 / 3, 0) == 0
    # alpha = 0.5 (the reference code's default): 6, 9, 10.5, 11.25, ... ; 12 * 0.75 is exactly 9
    assert [frozen_prefix(12, 0.5, e) for e in range(1, 6)] == [6, 9, 11, 12, 12]
    assert [frozen_prefix(2, 1 / 3, e) for e in range(1, 4)] == [1, 2, 2]  # the tiny model
    assert frozen_prefix(5, 1.0, 1) == 5
    assert frozen_prefix(0, 0.5, 3) == 0


def test_pipetransformer_end_to_end(tmp_path):
    pol = PipeTransformerFreezing()
    assert pol.cfg.alpha == pytest.approx(1 / 3)
    trainer = _trainer(tmp_path, pol)
    assert trainer.partition.granularity == "block"
    trainer.fit()
    # F(1) = ceil(2/3) = 1 after epoch 1 (step 4), F(2) = ceil(10/9) = 2 after epoch 2 (step 8)
    assert [(e.unit, e.step) for e in trainer.freezer.events] == [(0, 4), (1, 8)]
    assert trainer.freezer.frozen == {0, 1}
    state = pol.state_dict()
    assert state == {"prefix": 2}
    clone = PipeTransformerFreezing(pol.cfg)
    clone.setup(trainer.units, trainer.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)
