"""The freezing-policy interface: a policy decides, the trainer freezes.

A policy observes read-only signals and returns :class:`Decision` objects; it never touches
``requires_grad``, the optimiser or norm layers itself (that is :class:`freezebench.trainer.freezer.Freezer`'s job),
so every policy gets identical mechanics and a comparison compares decisions only.

Life cycle, driven by :class:`freezebench.trainer.Trainer`::

    policy.setup(units, plan)                       # once, before the first step
    after every optimiser step ``step`` (1-based count of completed steps):
        if policy.observe_at(step): policy.observe(step, signals)   # only the signals in ``needs``
        if policy.decide_at(step):  decision = policy.decide(step)  # applied by the freezer
    policy.state_dict() / load_state_dict()          # checkpoint and resume

Writing a policy: subclass :class:`FreezePolicy`, give it a ``Config`` dataclass (its fields become the
``policy.*`` config keys, each with a comment), declare ``needs``, and register it under the entry-point
group ``freezebench.policies``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: the interface module loads without torch (fast `freezebench config`)
    import torch

    from .units import Unit

from .ranges import Range, check_ranges


class Signal(enum.Enum):
    """What a policy may ask the trainer to compute for it (and nothing else is computed)."""

    WEIGHTS = "weights"  # read access to the active units' parameters after the step (no copy made)
    GRADS = "grads"  # the active units' gradients of the step just taken, before they are cleared
    ACTIVATIONS = "activations"  # each requested unit's output on the fixed probe batch (eval mode, no grad)
    SAMPLE_LOSSES = "sample_losses"  # per-sample training losses of the last batch, with dataset indices
    MODEL = "model"  # read access to the whole training model (a policy keeping its own copy: Egeria's reference)


def epoch_check_offsets(steps_per_epoch: int, checks_per_epoch: int) -> list[int]:
    """Steps into an epoch (1..S) after which each of ``checks_per_epoch`` evenly spaced checks runs.

    Check ``j`` (1..c) runs after ``ceil(j * S / c)`` steps, so the last one ends the epoch; more checks than
    steps means one check after every step. Shared by every policy that acts "M times per epoch".
    """
    s, c = steps_per_epoch, max(1, min(checks_per_epoch, steps_per_epoch))
    return sorted({(j * s + c - 1) // c for j in range(1, c + 1)})


@dataclass(frozen=True)
class Plan:
    """The shape of the training run, known before the first step."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    base_lr: float  # optim.lr: the learning rate that per-unit factors multiply
    seed: int
    device: str = "cpu"
    # step schedule: completed-step counts after which the global learning rate is lower (empty otherwise)
    lr_drops: tuple[int, ...] = ()
    # the data's modality, "image" or "text" (the trainer's batch adapter, freezebench.trainer.batches)
    modality: str = "image"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def check_steps(self, checks_per_epoch: int) -> frozenset[int]:
        """Global step counts of ``checks_per_epoch`` evenly spaced checks in every epoch."""
        offsets = epoch_check_offsets(self.steps_per_epoch, checks_per_epoch)
        return frozenset(e * self.steps_per_epoch + o for e in range(self.epochs) for o in offsets)

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimiser steps (fractional)."""
        return step / self.steps_per_epoch


@dataclass
class Signals:
    """The signals delivered to :meth:`FreezePolicy.observe`; fields not in ``needs`` are left ``None``."""

    step: int
    epoch: float
    units: Sequence[Unit]
    # unit index -> its output on the probe batch, flattened per input: shape (probe_size, features)
    activations: Mapping[int, torch.Tensor] | None = None
    probe_inputs: torch.Tensor | None = None  # the fixed probe batch the activations were computed on
    sample_losses: torch.Tensor | None = None  # (batch,) losses of the last training batch (detached)
    sample_indices: torch.Tensor | None = None  # (batch,) dataset indices of those samples
    model: torch.nn.Module | None = None  # the training model (``Signal.MODEL``; read only: do not modify)

    def weights(self, unit: int) -> list[torch.Tensor]:
        """The unit's parameters, detached (views, not copies: do not modify)."""
        return [p.detach() for p in self.units[unit].parameters]

    def grads(self, unit: int) -> list[torch.Tensor | None]:
        """The unit's gradients from the last backward pass (``None`` for a parameter without one)."""
        return [None if p.grad is None else p.grad.detach() for p in self.units[unit].parameters]


@dataclass
class Decision:
    """What a policy wants done now.

    ``lr_scale`` sets a unit's learning rate to ``optim.lr * value``, *replacing* the global schedule for
    that unit until changed again (FreezeOut anneals its units this way); ``None`` as a value hands the unit
    back to the global schedule.
    """

    freeze: Sequence[int] = ()
    unfreeze: Sequence[int] = ()
    lr_scale: Mapping[int, float | None] = field(default_factory=dict)
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.freeze or self.unfreeze or self.lr_scale)


@dataclass
class PolicyConfig:
    """Fields common to every policy's config (``policy.name`` selects the policy)."""

    name: str = "full"


class FreezePolicy:
    """Base class of every freezing policy. See the module docstring for the life cycle."""

    #: registry name (set by subclasses; equals the entry-point name)
    name: ClassVar[str] = ""
    #: signals this policy consumes; the trainer computes only these
    needs: ClassVar[frozenset[Signal]] = frozenset()
    #: whether the policy may unfreeze units (the freezer refuses otherwise)
    allows_unfreeze: ClassVar[bool] = False
    #: unit granularity used when ``model.granularity=auto``: "layer" or "block"
    granularity: ClassVar[str] = "layer"
    #: the policy's config dataclass (must subclass PolicyConfig)
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig
    #: trainer features the method is defined with, as dotted config keys -> values (SpFDE:
    #: ``{"sparsity.enabled": True, "data.sieve.enabled": True}``). ``load_config`` applies them over the
    #: built-in defaults, so a preset or the command line still overrides them and the resolved config
    #: (logged with every run) shows what ran.
    config_defaults: ClassVar[Mapping[str, Any]] = {}
    #: ranges of ``Config``'s numeric fields (:mod:`freezebench.ranges`), checked by :meth:`validate_config`
    ranges: ClassVar[Mapping[str, Range]] = {}

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        """Refuse a bad ``policy.*`` value with one line (``load_config`` and ``setup`` call it): the
        :attr:`ranges` table; a subclass adds checks that are not ranges after ``super().validate_config``."""
        check_ranges(cfg, cls.ranges, prefix="policy.")

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.Config(name=self.name)
        self.units: Sequence[Unit] = ()
        self.plan: Plan | None = None
        self.frozen: frozenset[int] = frozenset()

    # --- life cycle -------------------------------------------------------------------------------------
    def setup(self, units: Sequence[Unit], plan: Plan) -> None:
        """Called once before training. Override to precompute schedules (call ``super().setup``)."""
        self.units = units
        self.plan = plan

    def observe_at(self, step: int) -> bool:
        """Whether signals are wanted after ``step`` completed steps (default: never)."""
        return False

    def observe(self, step: int, signals: Signals) -> None:
        """Receive the declared signals."""

    def decide_at(self, step: int) -> bool:
        """Whether :meth:`decide` is called after ``step`` (default: at the end of every epoch)."""
        assert self.plan is not None
        return step % self.plan.steps_per_epoch == 0

    def decide(self, step: int) -> Decision | None:
        """Return the units to freeze now (or ``None``)."""
        return None

    def probe_units(self) -> list[int]:
        """Units whose activations are wanted when ``ACTIVATIONS`` is due (default: the active units)."""
        return self.active_units()

    # --- helpers ----------------------------------------------------------------------------------------
    @property
    def freezable(self) -> list[int]:
        """Indices of the units a policy may freeze (every unit but the classifier head)."""
        return [u.index for u in self.units if not u.is_head]

    def active_units(self) -> list[int]:
        """Freezable units not frozen yet, in forward order."""
        return [i for i in self.freezable if i not in self.frozen]

    def notify_frozen(self, frozen: frozenset[int]) -> None:
        """Called by the trainer after every change of the frozen set (keep ``self.frozen`` current)."""
        self.frozen = frozen

    def epoch_metrics(self) -> dict[str, float]:
        """Policy-specific figures logged at every epoch end as ``policy/<key>`` (e.g. a mean similarity)."""
        return {}

    # --- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"
