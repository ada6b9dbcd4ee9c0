"""The freezer: the only code in freezebench that freezes or unfreezes anything.

Freezing unit ``u`` means, at once and always the same way for every policy:

1. ``requires_grad = False`` and ``.grad = None`` on its parameters (no weight gradients are computed);
2. its normalisation layers switched to eval mode (BatchNorm running statistics stop moving), and kept
   there across ``model.train()`` calls (:meth:`Freezer.train_mode`);
3. its parameters removed from the optimiser together with their optimiser state (momentum, Adam moments);
4. a :class:`FreezeEvent` recorded (unit, name, step, epoch, parameter count, reason).

Freezing is monotone unless the policy declares ``allows_unfreeze`` (unfreezing restores ``requires_grad``,
train mode and the parameters to their optimiser param group, with fresh optimiser state). The classifier
head is never frozen.

The optimiser is expected to hold one param group per unit (``group["unit"] = index``), which
:func:`param_groups` builds; that is also what per-unit learning rates need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import FreezebenchError
from ..units import Unit


@dataclass(frozen=True)
class FreezeEvent:
    unit: int
    name: str
    step: int
    epoch: float
    num_params: int
    action: str = "freeze"  # freeze | unfreeze
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_groups(units: Sequence[Unit], other: Sequence[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """One optimiser param group per unit (tagged with ``unit``), plus one for unit-less parameters."""
    groups = [{"params": list(u.parameters), "unit": u.index} for u in units]
    if other:
        groups.append({"params": list(other), "unit": -1})
    return groups


class Freezer:
    """Applies freeze/unfreeze decisions to a model, its units and its optimiser."""

    def __init__(self, model: nn.Module, units: Sequence[Unit], optimizer: torch.optim.Optimizer,
                 allow_unfreeze: bool = False):
        self.model = model
        self.units = list(units)
        self.optimizer = optimizer
        self.allow_unfreeze = allow_unfreeze
        self.frozen: set[int] = set()
        self.events: list[FreezeEvent] = []
        self._group_of = {g["unit"]: g for g in optimizer.param_groups if "unit" in g}
        missing = [u.index for u in self.units if u.parameters and u.index not in self._group_of]
        if missing:
            raise FreezebenchError(f"optimizer has no param group for units {missing}: build it with param_groups()")
        self._saved_params: dict[int, list[nn.Parameter]] = {}
        self.total_params = sum(u.num_params for u in self.units)

    # --- decisions -----------------------------------------------------------------------------------
    def freeze(self, indices: Iterable[int], step: int, epoch: float, reason: str = "") -> list[FreezeEvent]:
        new = []
        for i in sorted(set(indices)):
            self._check(i)
            if i in self.frozen:
                continue
            unit = self.units[i]
            if unit.is_head:
                raise FreezebenchError(f"unit {i} ({unit.name}) is the classifier head and cannot be frozen")
            for p in unit.parameters:
                p.requires_grad_(False)
                p.grad = None
                self.optimizer.state.pop(p, None)
            group = self._group_of.get(i)
            if group is not None:
                self._saved_params[i] = list(group["params"])
                group["params"] = []
            for m in unit.norm_modules:
                m.eval()
            self.frozen.add(i)
            ev = FreezeEvent(i, unit.name, step, epoch, unit.num_params, "freeze", reason)
            self.events.append(ev)
            new.append(ev)
        return new

    def unfreeze(self, indices: Iterable[int], step: int, epoch: float, reason: str = "") -> list[FreezeEvent]:
        if not self.allow_unfreeze:
            raise FreezebenchError("this policy does not declare unfreezing (FreezePolicy.allows_unfreeze)")
        new = []
        for i in sorted(set(indices)):
            self._check(i)
            if i not in self.frozen:
                continue
            unit = self.units[i]
            for p in unit.parameters:
                p.requires_grad_(True)
            group = self._group_of.get(i)
            if group is not None:
                group["params"] = self._saved_params.pop(i, list(unit.parameters))
            for m in unit.norm_modules:
                m.train(self.model.training)
            self.frozen.discard(i)
            ev = FreezeEvent(i, unit.name, step, epoch, unit.num_params, "unfreeze", reason)
            self.events.append(ev)
            new.append(ev)
        return new

    def _check(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < len(self.units):
            raise FreezebenchError(f"unit index {i!r} out of range 0..{len(self.units) - 1}")

    # --- modes and views ---------------------------------------------------------------------------------
    def train_mode(self) -> None:
        """``model.train()``, then frozen units' norm layers back to eval (call instead of model.train())."""
        self.model.train()
        for i in self.frozen:
            for m in self.units[i].norm_modules:
                m.eval()

    @property
    def frozen_param_fraction(self) -> float:
        if self.total_params == 0:
            return 0.0
        return sum(self.units[i].num_params for i in self.frozen) / self.total_params

    def frozen_prefix(self) -> int:
        """Length of the frozen prefix: units 0..k-1 all frozen."""
        k = 0
        while k in self.frozen:
            k += 1
        return k

    def reattach_optimizer(self) -> None:
        """Find the per-unit param groups again (``optimizer.load_state_dict`` replaces the group dicts)."""
        self._group_of = {g["unit"]: g for g in self.optimizer.param_groups if "unit" in g}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": sorted(self.frozen), "events": [e.as_dict() for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-apply a saved frozen set (events restored verbatim). Call before loading optimiser state."""
        frozen = state.get("frozen", [])
        self.freeze(frozen, step=0, epoch=0.0)
        self.events = [FreezeEvent(**e) for e in state.get("events", [])]
