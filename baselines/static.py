"""``static``: freeze a fixed prefix of units at a fixed step.

Method card
-----------
Rule: at step ``s`` freeze units ``0..k-1`` (the first ``k`` freezable units in forward order), where
``k = policy.units`` or ``floor(policy.fraction * L_freezable)``; never unfreeze. ``s = policy.at_step``,
or ``round(policy.at_epoch * steps_per_epoch)``; ``s = 0`` freezes before the first step (the classic
fine-tuning recipe of freezing the lower layers of a pretrained network).
Source: the "static freezing" baseline common to the freezing literature (e.g. Yosinski et al. 2014's
transfer experiments); no tunable published defaults. Defaults here: half the units after one epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from freezebench.errors import ConfigError
from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig
from freezebench.ranges import Range


@dataclass
class StaticConfig(PolicyConfig):
    name: str = "static"
    units: int | None = None  # freeze the first k freezable units; null: use `fraction`
    fraction: float = 0.5  # fraction of the freezable units to freeze (rounded down) when units is null
    at_epoch: float = 1.0  # when to freeze, in epochs (0: before the first step)
    at_step: int | None = None  # when to freeze, in optimiser steps (overrides at_epoch)


def static_prefix(num_freezable: int, units: int | None, fraction: float) -> int:
    """Number of leading units to freeze (pure function)."""
    k = units if units is not None else math.floor(fraction * num_freezable)
    return max(0, min(k, num_freezable))


class StaticFreezing(FreezePolicy):
    __doc__ = __doc__
    name = "static"
    Config = StaticConfig

    ranges = {"units": Range(0), "fraction": Range(0, 1), "at_epoch": Range(0), "at_step": Range(0)}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        if self.cfg.units is not None and self.cfg.units > len(self.freezable):
            raise ConfigError(f"policy.units={self.cfg.units} is more than the {len(self.freezable)} freezable units "
                              f"of this model (the last unit, the head, always trains); pass at most "
                              f"{len(self.freezable)}, or policy.fraction instead")
        self.k = static_prefix(len(self.freezable), self.cfg.units, self.cfg.fraction)
        self.at = self.cfg.at_step if self.cfg.at_step is not None else round(self.cfg.at_epoch * plan.steps_per_epoch)

    def decide_at(self, step: int) -> bool:
        return step == self.at

    def decide(self, step: int) -> Decision | None:
        todo = [i for i in self.freezable[: self.k] if i not in self.frozen]
        return Decision(freeze=todo, reason=f"static prefix of {self.k} units") if todo else None
