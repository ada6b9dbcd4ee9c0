"""``spfde``: progressive sequential freezing in sparse training with data sieving (SpFDE).

    freezebench train policy=spfde                                   # sparse + sieved + progressive freezing
    freezebench train policy=spfde policy.target_flops_reduction=0.3 policy.interval_epochs=0.5
    freezebench train policy=spfde sparsity.enabled=false data.sieve.enabled=false   # freezing alone

Method card
-----------
Paper: Geng Yuan, Yanyu Li, Sheng Li, Zhenglun Kong, Sergey Tulyakov, Xulong Tang, Yanzhi Wang and Jian Ren,
"Layer Freezing & Data Sieving: Missing Pieces of a Generic Framework for Sparse Training", NeurIPS 2022
(arXiv:2209.11204). The framework cuts training cost along three axes at once: weight sparsity, layer
freezing and data sieving. freezebench has no public code to follow (``shared/design/ALGORITHMS.md``,
"SpFDE"); the three parts are:

* **Sparse training** and **data sieving** are trainer features any policy can use
  (:mod:`freezebench.features.sparsity`, ``sparsity.*``; :mod:`freezebench.features.sieve`, ``data.sieve.*``; see their
  docstrings for the rules). SpFDE *is* their combination with freezing, so this policy declares them in
  :attr:`SpFDE.config_defaults`: ``policy=spfde`` turns on ``sparsity.enabled`` and ``data.sieve.enabled``
  with their defaults (80% ERK sparsity, MEST-style prune-and-regrow every 100 steps until 75% of
  training; partial set 80% of the data, its easiest 20% swapped for the removed samples every epoch), and a preset or the command line can still change or switch them off.
  The resolved config logged with every run shows what ran.
* **Progressive freezing** (this module): sequential from the front, one unit per constant interval of
  ``interval_epochs`` epochs, up to ``fraction`` of the freezable units, starting at the *latest* step
  whose schedule still meets ``target_flops_reduction``, the fraction of the run's training FLOPs saved
  by freezing alone. The saving is computed before training with the trainer's cost model
  (:class:`freezebench.cost.CostModel` over the units' dense forward FLOPs; forward, weight- and
  input-gradient terms as in every freezebench report), so a run can aim at a compute budget; the
  start step is found by bisection (the saving only falls as the start moves later). Frozen units keep
  their masks and weights (the sparsity feature skips frozen layers at mask updates). Never unfreezes.
  The pure core is :func:`freeze_schedule` / :func:`freezing_saving`.

Defaults (ours; the paper's are not public, and they were not swept here): block granularity (the
paper freezes layer blocks of ResNets), ``interval_epochs = 0.25``, ``fraction = 1.0`` (every block but the
head ends frozen) and ``target_flops_reduction = 0.2``. On the default job (resnet20 on the digits, 10
epochs, sieved to 36 steps per epoch) the schedule starts at epoch 5.86, so every block trains for more
than half of the run, and the last block freezes at epoch 8.11, when the cosine learning rate is down to
8.5% of its peak; the planned freezing saving is 20.1% (``policy/planned_saving``). When even a start at
step 0 cannot meet the target the schedule starts at step 0 and ``policy/planned_saving`` shows what it
reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from freezebench.cost import CostModel
from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig
from freezebench.ranges import Range


@dataclass
class SpFDEConfig(PolicyConfig):
    name: str = "spfde"
    target_flops_reduction: float = 0.2  # training-FLOPs share saved by freezing; sets the start step, in [0, 1)
    interval_epochs: float = 0.25  # epochs between two successive unit freezes (constant interval), > 0
    fraction: float = 1.0  # share of the freezable units (front first) frozen by the end of the schedule, (0, 1]


# --------------------------------------------------------------------------------------------------------
# pure core
# --------------------------------------------------------------------------------------------------------


def freezing_saving(cost: CostModel, total_steps: int, freeze_steps: Sequence[int]) -> float:
    """Fraction of training FLOPs saved when unit ``k`` freezes after ``freeze_steps[k]`` completed steps.

    Step ``j`` (1-based) is paid with the units frozen after ``j - 1`` steps; units freeze front first.
    """
    full = cost.full_step_flops * total_steps
    if full <= 0 or total_steps <= 0:
        return 0.0
    spent, prev = 0.0, 0
    steps = sorted(min(max(0, s), total_steps) for s in freeze_steps)
    for p, s in enumerate(steps):
        spent += cost.step_flops(range(p)) * (s - prev)
        prev = s
    spent += cost.step_flops(range(len(steps))) * (total_steps - prev)
    return 1.0 - spent / full


def freeze_steps(start: int, interval: int, count: int, total_steps: int) -> list[int]:
    """``start + k * interval`` for ``k < count``, those before the end of training."""
    return [s for s in (start + k * interval for k in range(count)) if s < total_steps]


def freeze_schedule(cost: CostModel, total_steps: int, interval: int, count: int,
                    target: float) -> tuple[list[int], float]:
    """The latest start whose schedule saves at least ``target`` of the FLOPs (else start 0).

    Returns the freeze steps of units ``0..`` and the saving they reach.
    """
    def saving(t0: int) -> float:
        return freezing_saving(cost, total_steps, freeze_steps(t0, interval, count, total_steps))

    if saving(0) < target:
        lo = 0
    else:
        lo, hi = 0, total_steps  # saving(lo) >= target; saving(total_steps) = 0 (nothing freezes)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if saving(mid) >= target:
                lo = mid
            else:
                hi = mid
    steps = freeze_steps(lo, interval, count, total_steps)
    return steps, saving(lo)


# --------------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------------


class SpFDE(FreezePolicy):
    __doc__ = __doc__
    name = "spfde"
    granularity = "block"
    Config = SpFDEConfig
    config_defaults: ClassVar[dict[str, Any]] = {"sparsity.enabled": True, "data.sieve.enabled": True}

    ranges = {"target_flops_reduction": Range(0, 1, hi_open=True), "interval_epochs": Range(0, lo_open=True),
              "fraction": Range(0, 1, lo_open=True)}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        c = self.cfg
        self.interval = max(1, round(c.interval_epochs * plan.steps_per_epoch))
        count = round(c.fraction * len(self.freezable))
        cost = CostModel([u.flops for u in units])
        steps, self.saving = freeze_schedule(cost, plan.total_steps, self.interval, count,
                                             c.target_flops_reduction)
        # step -> the units (front first) frozen after it
        self.schedule: dict[int, list[int]] = {}
        for unit, s in zip(self.freezable, steps):
            self.schedule.setdefault(s, []).append(unit)
        self.start = steps[0] if steps else None

    def decide_at(self, step: int) -> bool:
        return step in self.schedule

    def decide(self, step: int) -> Decision | None:
        todo = [u for u in self.schedule.get(step, []) if u not in self.frozen]
        if not todo:
            return None
        assert self.plan is not None
        return Decision(freeze=todo, reason=(
            f"progressive freezing every {self.interval} steps from step {self.start} "
            f"(planned freezing saving {self.saving:.3f}, target {self.cfg.target_flops_reduction})"))

    def epoch_metrics(self) -> dict[str, float]:
        return {"planned_saving": self.saving}
