"""``freezeout_linear`` and ``freezeout_cubic``: FreezeOut's fixed per-unit annealing schedules.

Method card
-----------
Paper: Andrew Brock, Theodore Lim, J. M. Ritchie and Nick Weston, "FreezeOut: Accelerate Training by
Progressively Freezing Layers", NIPS 2017 Workshop on Optimization, arXiv:1706.04983 (2017). Reference code:
github.com/ajbrock/FreezeOut (read for the facts; this is our own implementation).

Rule: every unit gets its own cosine learning-rate schedule that reaches zero at a fixed fraction ``t_i`` of
training, after which the unit is frozen. With the freezable units numbered ``i = 0..L-1`` in forward order
and the classifier head as number ``L``::

    t_i       = s(t0 + (1 - t0) * i / L)          s(x) = x (linear) or x**3 (cubic)
    lr_i(tau) = 0.5 * lr_i(0) * (1 + cos(pi * tau / t_i))      for tau = t / T < t_i
    lr_i(0)   = lr0 / t_i  if scale_lr  else lr0

Unit ``i`` is frozen after ``ceil(t_i * T)`` completed steps: the first step count ``t`` with
``t / T >= t_i`` (its learning rate is zero from there on anyway). ``T`` is the run's total number of
optimiser steps and ``lr0 = optim.lr``.

Which ``i`` and ``L``: the reference code numbers every layer it anneals, first conv = 0 up to the
classifier = ``layer_index_max``, and divides by that maximum, so the classifier gets ``t = 1`` (it trains to
the end) and the first layer gets ``s(t0)``. We do exactly that with our units: ``i`` is the position of a
unit among the freezable units (its unit index, since the head is the last unit) and ``L`` the number of
freezable units, which is also the head's index. The head (``t = 1``) is never frozen and is left on the
trainer's global schedule (``schedule.*``; under the default cosine without warm-up that *is* the ``t = 1``
FreezeOut curve, as in the reference code). Parameters outside every unit stay on the global schedule too.

Granularity: ``block``. The reference code anneals whole residual blocks (WideResNet ``BasicBlock``,
DenseNet dense layers) plus the stem conv, which is what our block granularity yields (on ``resnet20``: the
stem conv, 9 basic blocks and the head, exactly the reference's layer indexing). ``model.granularity=layer``
works too.

Learning rate: the policy owns the learning rate of the units it anneals. At step 0 and after every step
it returns ``Decision(lr_scale={unit: lr_i(tau) / lr0})`` for every active freezable unit, which *replaces*
the global schedule (warm-up, ``min_lr_factor``, step decays) for those units; the trainer applies it to
the step about to run, whose ``tau = t / T`` with ``t`` the number of completed steps.

Defaults and their source:

* ``freezeout_cubic``: ``t0 = 0.8`` before cubing (first unit stops at 0.512 of training), ``scale_lr =
  true``: the reference code's defaults ("Scaled Cubic").
* ``freezeout_linear``: ``t0 = 0.5``, ``scale_lr = true``: the "linear freezing" baseline of SmartFRZ (Li et
  al. 2022), which uses FreezeOut's linear schedule with ``t0 = 0.5`` (its Table 8 sweeps 0.3-0.6); the
  reference code's author also reports the idea "worked out of the box with linear scaling and t_0 = 0.5".

What we changed and why:

* The reference code assumes 1000 iterations per epoch (``max_j = epochs * 1000 * t_i``); we use the run's
  true step count ``T = epochs * steps_per_epoch``.
* The reference deactivates a layer when ``j > max_j`` (one extra step at learning rate ~0); we freeze at
  the first step with ``tau >= t_i``, so the step counts are ``ceil(t_i * T)``. ``ceil`` is taken with a
  relative tolerance of 1e-9 so that a product that is an integer in exact arithmetic (e.g. ``0.75 * 12``)
  is not pushed up by floating-point error.
* Freezing uses freezebench's shared mechanics (no gradients, removed from the optimiser with its state,
  norm layers in eval mode); the reference detaches the layer output and drops its param group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig
from freezebench.ranges import Range

#: the schedule's shaping function s(x) = x ** power
MODES: dict[str, int] = {"linear": 1, "squared": 2, "cubic": 3}

_REL_TOL = 1e-9


def _check_mode(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"unknown FreezeOut mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def freeze_fraction(i: int, L: int, t0: float, mode: str) -> float:
    """``t_i = s(t0 + (1 - t0) * i / L)``: the fraction of training at which unit ``i`` (of ``L``) stops.

    ``i = L`` is the head (``t = 1``); ``L = 0`` (only a head) gives 1.
    """
    power = _check_mode(mode)
    if not 0 <= i <= L:
        raise ValueError(f"unit position {i} out of range 0..{L}")
    x = 1.0 if L == 0 else t0 + (1.0 - t0) * i / L
    return x**power


def freeze_fractions(L: int, t0: float, mode: str) -> list[float]:
    """``t_i`` of the ``L`` freezable units ``i = 0..L-1`` (the head, ``i = L``, has ``t = 1``)."""
    return [freeze_fraction(i, L, t0, mode) for i in range(L)]


def _ceil(x: float) -> int:
    return math.ceil(x - _REL_TOL * max(1.0, abs(x)))


def freeze_iterations(L: int, t0: float, T: int, mode: str) -> list[int]:
    """Completed-step count after which each freezable unit ``i = 0..L-1`` is frozen: ``ceil(t_i * T)``."""
    return [_ceil(t * T) for t in freeze_fractions(L, t0, mode)]


def cosine_scale(t_i: float, tau: float, scale_lr: bool = True) -> float:
    """``lr_i(tau) / lr0`` for a unit stopping at ``t_i``: ``0.5 * a * (1 + cos(pi * tau / t_i))``, ``a =
    1 / t_i`` when ``scale_lr`` else 1; 0 from ``tau >= t_i`` on."""
    if tau >= t_i:
        return 0.0
    start = 1.0 / t_i if scale_lr else 1.0
    return 0.5 * start * (1.0 + math.cos(math.pi * tau / t_i))


def lr_scale(i: int, tau: float, L: int, t0: float, mode: str, scale_lr: bool = True) -> float:
    """Learning rate of freezable unit ``i`` (of ``L``) at training fraction ``tau``, as a multiple of lr0."""
    return cosine_scale(freeze_fraction(i, L, t0, mode), tau, scale_lr)


@dataclass
class FreezeOutConfig(PolicyConfig):
    name: str = "freezeout"
    t0: float = 0.5  # fraction of training (before s() is applied) at which the first unit stops, in (0, 1]
    scale_lr: bool = True  # start unit i at lr0 / t_i so every unit travels about the same distance


@dataclass
class FreezeOutLinearConfig(FreezeOutConfig):
    name: str = "freezeout_linear"
    t0: float = 0.5  # first unit stops at t0 of training, in (0, 1] (SmartFRZ linear baseline: 0.5)
    scale_lr: bool = True  # start unit i at lr0 / t_i (reference default) instead of lr0


@dataclass
class FreezeOutCubicConfig(FreezeOutConfig):
    name: str = "freezeout_cubic"
    t0: float = 0.8  # first unit stops at t0**3 of training, t0 in (0, 1] (reference default 0.8)
    scale_lr: bool = True  # start unit i at lr0 / t_i (reference default) instead of lr0


class _FreezeOut(FreezePolicy):
    """Shared implementation; subclasses fix ``mode``."""

    mode: ClassVar[str] = "linear"
    granularity = "block"
    Config = FreezeOutConfig

    ranges = {"t0": Range(0, 1, lo_open=True, note="(fraction of training)")}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        L = len(self.freezable)
        self.total_steps = plan.total_steps
        # unit index -> (t_i, freeze step); i is the position among the freezable units
        self.t = dict(zip(self.freezable, freeze_fractions(L, self.cfg.t0, self.mode)))
        self.freeze_steps = dict(zip(self.freezable, freeze_iterations(L, self.cfg.t0, self.total_steps, self.mode)))

    def decide_at(self, step: int) -> bool:
        return bool(self.active_units())

    def decide(self, step: int) -> Decision | None:
        active = self.active_units()
        if not active:
            return None
        tau = step / self.total_steps
        freeze = [u for u in active if step >= self.freeze_steps[u]]
        scales = {u: cosine_scale(self.t[u], tau, self.cfg.scale_lr) for u in active if u not in freeze}
        reason = f"FreezeOut {self.mode} schedule reached t_i (tau={tau:.4f})" if freeze else ""
        return Decision(freeze=freeze, lr_scale=scales, reason=reason)

    def state_dict(self) -> dict[str, Any]:
        # the schedule is fixed at setup; saving it lets a resumed run keep it even if the plan changed
        return {"total_steps": self.total_steps, "t": dict(self.t), "freeze_steps": dict(self.freeze_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = int(state["total_steps"])
        self.t = {int(k): float(v) for k, v in state["t"].items()}
        self.freeze_steps = {int(k): int(v) for k, v in state["freeze_steps"].items()}


class FreezeOutLinear(_FreezeOut):
    __doc__ = __doc__
    name = "freezeout_linear"
    mode = "linear"
    Config = FreezeOutLinearConfig


class FreezeOutCubic(_FreezeOut):
    __doc__ = __doc__
    name = "freezeout_cubic"
    mode = "cubic"
    Config = FreezeOutCubicConfig
