"""``autofreeze``: freeze the front blocks whose accumulated-gradient norm has stopped changing.

Method card
-----------
Paper: Yuhan Liu, Saurabh Agarwal, Shivaram Venkataraman. "AutoFreeze: Automatically Freezing Model
Blocks to Accelerate Fine-tuning". arXiv:2102.01386, 2021.

Rule (paper section 3, as run by SmartFRZ's AutoFreeze baseline):

* after every backward pass, add each active unit's gradients into an accumulator of its own;
* ``M = evals_per_epoch`` times per epoch compute ``G_l = sum_p ||acc_p||_1 / n`` per active unit ``l``
  (``n``: steps accumulated since the last evaluation) and reset the accumulators;
* from the second evaluation on, ``r_l = |G_l^prev - G_l| / G_l^prev`` and
  ``thr = percentile(r over the active units, N)``; freeze the longest run of active units *from the
  front* whose ``r < thr`` (a unit is frozen only when every unit before it is frozen); never unfreeze.

Defaults and their source: ``evals_per_epoch = 4`` (SmartFRZ, Table 9: the best of its sweep of AutoFreeze's
evaluation frequency; the reference README uses more evaluations over the whole run), ``percentile = 50``
(the reference code's ``--percentile`` default). Block granularity, as the paper freezes BERT blocks.

Details that are ours (the paper and reference code leave them open or do something else):

* **Evaluation points.** Evaluation ``k = 1..M`` of an epoch comes after epoch-step ``ceil(k*S/M)``
  (``S`` = steps per epoch), duplicates merged. When ``M`` divides ``S`` these are exactly the steps with
  ``step % (S // M) == 0``; otherwise the intervals differ by one step (e.g. ``S=10, M=4``: steps 3, 5, 8,
  10); when ``S < M`` every step is an evaluation. The last evaluation always ends the epoch. The reference
  code spaces its intervals over the whole run instead (``num_intervals`` over all epochs).
* **Per-step mean.** ``G`` is divided by the number of steps accumulated, so intervals of unequal length
  compare fairly; with equal intervals the factor cancels in ``r`` and the rule is the paper's.
* **Percentile**: linear interpolation between closest ranks, numpy's default ``np.percentile`` (the
  reference code's call) and ``torch.quantile``'s; implemented in plain Python so that ``inf`` is handled.
* **Edge cases of r.** ``G_now = 0``: ``r = 0`` (the unit gets no gradient any more; the reference code
  also sets 0). ``G_prev = 0 < G_now``: ``r = inf`` (not converged; the reference divides by zero).
  Non-finite ``G`` (fp16 overflow in an interval): ``r = inf``. Since the rule needs ``r < thr`` strictly,
  with a single active unit left ``thr`` equals its own ``r`` and nothing freezes: the last freezable
  unit is never frozen by this rule, and with percentile 50 at most the units strictly below the median
  freeze at one evaluation. Ties at the threshold do not freeze. Once a single active unit is left, the
  policy stops accumulating and evaluating (nothing could freeze any more).
* **Scope.** Every freezable unit (the head excluded) is a candidate, the stem included; the reference
  code for BERT only scores the 12 encoder layers (not the embeddings). ``score_first=false`` does that:
  the first unit (a BERT's embeddings, at block granularity: embeddings, each encoder layer, pooler and
  classifier as the head) is not scored and is frozen together with the first unit the rule freezes, so
  on BERT the rule runs over the encoder layers front to back, ``M`` times per epoch, as in the paper.
  The default (``null``) does so when the first unit holds an ``nn.Embedding`` (a text model), and scores
  every unit otherwise.
* **Mechanics.** The shared freezer removes frozen parameters from the optimiser and keeps the rest of
  its state; the reference code rebuilds the optimiser (state reset). No activation caching here.

Cost (the SmartFRZ paper measured the reference's norm computation at up to 20% of training time: it
moves every accumulated tensor to the host and takes its norm there, one by one). Here the accumulators
are fp32 tensors on the parameters' device, one per parameter of each active unit (memory: one fp32 copy
of the active parameters); each step adds the gradients with a single fused ``torch._foreach_add_`` and
never synchronises with the host; an evaluation takes every L1 norm with one ``torch._foreach_norm``,
sums them per unit on the device and moves one ``(units,)`` vector to the host. Frozen units are dropped
from the accumulation. Gradients are read from the units' parameters directly (the tensors that
``Signals.grads`` would return, without creating a detached view of each per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig, Signal, Signals, epoch_check_offsets
from freezebench.ranges import Range


@dataclass
class AutoFreezeConfig(PolicyConfig):
    name: str = "autofreeze"
    evals_per_epoch: int = 4  # M: gradient-norm evaluations per epoch (SmartFRZ Table 9); >= 1
    percentile: float = 50.0  # N: threshold = N-th percentile (linear interpolation) of r over active units, 0-100
    score_first: bool | None = None  # score the first unit (the stem) too; false: it freezes with the next unit (the reference code on BERT: encoder layers only); null: false when the first unit is a token embedding (text models), else true


# --- pure core ----------------------------------------------------------------------------------------
def eval_offsets(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """Epoch-steps (1..steps_per_epoch) after which an evaluation runs: ``ceil(k*S/M)``, k = 1..M, deduplicated."""
    return epoch_check_offsets(steps_per_epoch, evals_per_epoch)


def relative_changes(g_prev: Sequence[float], g_now: Sequence[float]) -> list[float]:
    """``r_l = |G_prev - G_now| / G_prev`` with the edge cases of the method card (0 if G_now = 0, inf if
    G_prev = 0 < G_now or either is non-finite)."""
    if len(g_prev) != len(g_now):
        raise ValueError(f"g_prev has {len(g_prev)} units, g_now {len(g_now)}")
    out = []
    for p, n in zip(g_prev, g_now):
        p, n = float(p), float(n)
        if not (math.isfinite(p) and math.isfinite(n)):
            out.append(math.inf)
        elif n == 0.0:
            out.append(0.0)
        elif p == 0.0:
            out.append(math.inf)
        else:
            out.append(abs(p - n) / p)
    return out


def percentile_linear(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default
    ``np.percentile``, ``torch.quantile``'s ``linear``); ``inf`` values are allowed (NaN is not)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    v = sorted(float(x) for x in values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    frac = pos - lo
    if frac == 0.0 or v[lo] == v[hi]:
        return v[lo]
    return v[lo] + (v[hi] - v[lo]) * frac


def autofreeze_prefix(r: Sequence[float], thr: float) -> int:
    """Length of the leading run of ``r`` strictly below ``thr``."""
    k = 0
    for x in r:
        if not x < thr:
            break
        k += 1
    return k


def decide_prefix(g_prev: Sequence[float], g_now: Sequence[float], percentile: float) -> int:
    """Number of leading active units to freeze, given their previous and current gradient norms."""
    if not g_now:
        return 0
    r = relative_changes(g_prev, g_now)
    return autofreeze_prefix(r, percentile_linear(r, percentile))


# --- policy -------------------------------------------------------------------------------------------
class AutoFreeze(FreezePolicy):
    __doc__ = __doc__
    name = "autofreeze"
    needs = frozenset({Signal.GRADS})
    granularity = "block"
    Config = AutoFreezeConfig

    ranges = {"evals_per_epoch": Range(1), "percentile": Range(0, 100)}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        first = self.cfg.score_first
        self._score_first = bool(first) if first is not None else not (
            units and any(isinstance(m, torch.nn.Embedding) for m in units[0].modules))
        self._offsets = frozenset(eval_offsets(plan.steps_per_epoch, self.cfg.evals_per_epoch))
        self._tracked: list[int] = self._candidates(self._scored(self.active_units()))  # units whose gradients are accumulated
        self._acc: dict[int, list[torch.Tensor]] = {u: self._zeros(u) for u in self._tracked}
        self._steps = 0  # steps accumulated since the last evaluation
        self._evals = 0  # evaluations done
        self._g_prev: dict[int, float] = {}  # G of each tracked unit at the last evaluation
        self.last_r: dict[int, float] = {}  # r at the last evaluation (diagnostics, not state)
        self._rebuild()

    @staticmethod
    def _candidates(active: list[int]) -> list[int]:
        """The units still to track: with fewer than two active units the rule can never freeze again
        (a lone unit's ``r`` is its own threshold), so accumulation stops for good."""
        return active if len(active) >= 2 else []

    def _scored(self, active: list[int]) -> list[int]:
        """The active units the rule scores: all, or (``score_first=false``) all but the first unit."""
        return active if self._score_first else [u for u in active if u != 0]

    def _zeros(self, unit: int) -> list[torch.Tensor]:
        return [torch.zeros_like(p, dtype=torch.float32) for p in self.units[unit].parameters]

    def _rebuild(self) -> None:
        """Flat lists over the tracked units' parameters, so a step is one fused add."""
        self._params = [p for u in self._tracked for p in self.units[u].parameters]
        self._flat_acc = [a for u in self._tracked for a in self._acc[u]]
        seg = [i for i, u in enumerate(self._tracked) for _ in self.units[u].parameters]
        device = self._params[0].device if self._params else torch.device("cpu")
        self._seg = torch.tensor(seg, dtype=torch.long, device=device)

    # --- life cycle -----------------------------------------------------------------------------------
    def observe_at(self, step: int) -> bool:
        return bool(self._tracked)

    def observe(self, step: int, signals: Signals) -> None:
        self._steps += 1
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):  # parameters unused in this step's forward
            pairs = [(a, g) for a, g in zip(self._flat_acc, grads) if g is not None]
            if not pairs:
                return
            acc, grads = (list(t) for t in zip(*pairs))
        else:
            acc = self._flat_acc
        with torch.no_grad():
            torch._foreach_add_(acc, grads)

    def decide_at(self, step: int) -> bool:
        assert self.plan is not None
        return step > 0 and bool(self._tracked) and ((step - 1) % self.plan.steps_per_epoch) + 1 in self._offsets

    def unit_norms(self) -> list[float]:
        """``G`` of every tracked unit over the current interval (one device->host transfer)."""
        if not self._flat_acc:
            return [0.0] * len(self._tracked)
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm(self._flat_acc, 1))
            g = torch.zeros(len(self._tracked), dtype=torch.float32, device=norms.device)
            g.index_add_(0, self._seg.to(norms.device), norms.float())
            g /= max(self._steps, 1)
        return g.tolist()

    def decide(self, step: int) -> Decision | None:
        active = list(self._tracked)
        if not active:
            return None
        g_now = self.unit_norms()
        if self._flat_acc:
            torch._foreach_zero_(self._flat_acc)
        self._steps = 0
        self._evals += 1
        prev = [self._g_prev.get(u) for u in active]
        self._g_prev = dict(zip(active, g_now))
        if any(p is None for p in prev):  # first evaluation: nothing to compare with yet
            return None
        k = decide_prefix(prev, g_now, self.cfg.percentile)  # the pure core, tested on its own
        r = relative_changes(prev, g_now)  # for the record and the reason
        self.last_r = dict(zip(active, r))
        if k == 0:
            return None
        thr = percentile_linear(r, self.cfg.percentile)
        shown = ", ".join(f"{u}:{x:.3g}" for u, x in zip(active[: k + 1], r[: k + 1]))
        freeze = active[:k] if self._score_first or 0 not in self.active_units() else [0, *active[:k]]
        return Decision(freeze=freeze,
                        reason=f"grad-norm change r < p{self.cfg.percentile:g} = {thr:.3g} ({shown})")

    def notify_frozen(self, frozen: frozenset[int]) -> None:
        super().notify_frozen(frozen)
        keep = self._candidates(self._scored([u for u in self._tracked if u not in frozen]))
        if keep != self._tracked:
            for u in set(self._tracked) - set(keep):
                self._acc.pop(u, None)
                self._g_prev.pop(u, None)
            self._tracked = keep
            self._rebuild()

    # --- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "tracked": list(self._tracked),
            "steps": self._steps,
            "evals": self._evals,
            "g_prev": {u: self._g_prev[u] for u in self._tracked if u in self._g_prev},
            "acc": {u: [a.detach().clone() for a in self._acc[u]] for u in self._tracked},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tracked = [int(u) for u in state["tracked"]]
        self._steps = int(state["steps"])
        self._evals = int(state["evals"])
        self._g_prev = {int(u): float(g) for u, g in state["g_prev"].items()}
        self._acc = {}
        for u in self._tracked:
            bufs = self._zeros(u)
            saved = state["acc"][u]
            if len(saved) != len(bufs):
                raise ValueError(f"autofreeze state: unit {u} has {len(bufs)} parameters, state {len(saved)}")
            for b, s in zip(bufs, saved):
                b.copy_(s)
            self._acc[u] = bufs
        self._rebuild()
