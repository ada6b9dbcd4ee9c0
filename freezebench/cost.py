"""The training cost model: FLOPs a step really spends given what is frozen (and cached).

With ``F_l`` the forward FLOPs per sample of unit ``l`` (from :mod:`freezebench.units`) and ``F_other``
the forward FLOPs outside every unit, one training step costs per sample:

* forward: ``sum_l F_l + F_other``, minus the units of a cached frozen prefix (their forward is skipped);
* weight gradients: ``sum over trainable units of F_l`` (a frozen unit computes no weight gradient);
* input gradients: ``sum over units after the first trainable unit of F_l`` (backpropagation stops at the
  first trainable unit: nothing before it needs a gradient).

Full training therefore costs ``3 * sum F_l - F_0 + F_other`` per sample. This is what "TFLOPs" means in
every freezebench report; ``cost/tflops_full`` is the same run's cost had nothing been frozen.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


class CostModel:
    def __init__(self, unit_flops: Sequence[float], other_flops: float = 0.0):
        self.f = [float(x) for x in unit_flops]
        self.other = float(other_flops)
        self._cache: dict[tuple[frozenset[int], int], float] = {}

    def step_flops(self, frozen: Collection[int] = (), cached_prefix: int = 0) -> float:
        """Training FLOPs per sample of one step with ``frozen`` units and a cached prefix of that length."""
        key = (frozenset(frozen), cached_prefix)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        L = len(self.f)
        trainable = [i for i in range(L) if i not in key[0]]
        forward = sum(self.f[cached_prefix:]) + self.other
        wgrad = sum(self.f[i] for i in trainable)
        first = trainable[0] if trainable else L
        igrad = sum(self.f[first + 1 :])
        total = forward + wgrad + igrad
        self._cache[key] = total
        return total

    @property
    def full_step_flops(self) -> float:
        return self.step_flops(())

    def forward_flops(self) -> float:
        return sum(self.f) + self.other
