"""Data sieving as a trainer feature any policy can use (``data.sieve.*``).

    freezebench train policy=full data.sieve.enabled=true data.sieve.ratio=0.8
    freezebench train policy=spfde                      # SpFDE turns it on by default

From SpFDE (Geng Yuan et al., "Layer Freezing & Data Sieving: Missing Pieces of a Generic Framework for
Sparse Training", NeurIPS 2022): train on a *partial set* of ``ratio`` of the training samples; every
sieving ``period`` (epochs) move the easiest part of the partial set (lowest recent training loss) to the
*removed set* and bring back the samples that have been removed longest (first in, first out), so every
sample keeps being seen while every epoch is shorter.

Mechanics (our reading; the paper's exact schedule is not public):

* start: a seeded random partial set of ``m = round(ratio * n)`` samples (at least one); the other
  ``n - m`` form the removed queue in random order;
* per-sample losses come from the training forward pass the trainer already runs
  (:meth:`Sieve.record` receives the step's per-sample losses and dataset indices; no extra pass): each
  sample's most recent loss is kept on the device; a sample that has not been trained on since it joined
  the partial set counts as hardest (+inf) and is not removed;
* at the start of every epoch ``e`` with ``e % period == 0`` (``e > 0``): the ``k`` partial samples with
  the lowest recent loss (ties: the earlier position) are appended to the tail of the removed queue and the
  ``k`` samples at its head rejoin the partial set, with ``k = round(swap * (n - m))`` (at most ``m``, at
  least one when ``n > m``). The partial set keeps its size ``m``.
* a removed sample rejoins after ``ceil((n - m) / k)`` updates, so **every sample is in the partial set at
  least once in any** :attr:`Sieve.cycle_periods` ``= ceil((n - m) / k) + 1`` consecutive periods (2 with
  the default ``swap = 1``).

An epoch iterates once over the partial set in a seeded random order (seed and epoch, as the plain
loader), so ``Plan.steps_per_epoch = ceil(m / batch_size)`` is the real number of steps of every epoch, the
learning-rate schedule is laid out over those steps, and ``data/samples_per_epoch`` and ``cost/tflops``
shrink by the ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..zoo.data import DataBundle
from ..zoo.sampling import OrderedLoader, SieveSampler


class Sieve:
    """The partial set, the removed queue and the latest per-sample losses; see the module docstring."""

    def __init__(self, n: int, ratio: float, period: int, swap: float, seed: int, device: Any = "cpu"):
        self.n, self.period = n, period
        self.m = max(1, min(n, int(round(ratio * n))))
        gen = torch.Generator().manual_seed(seed * 7_919 + 23)
        perm = torch.randperm(n, generator=gen)
        self.partial = perm[: self.m].clone()  # dataset indices, CPU
        self.removed = perm[self.m:].clone()  # FIFO: head first
        r = n - self.m
        self.k = 0 if r == 0 else max(1, min(self.m, r, int(round(swap * r))))
        self.loss = torch.full((n,), float("inf"), device=device)
        self.updates = 0

    @property
    def cycle_periods(self) -> int:
        """Every sample is in the partial set at least once in any this many consecutive periods."""
        return 1 if self.k == 0 else math.ceil((self.n - self.m) / self.k) + 1

    def record(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Keep the latest training loss of the samples ``idx`` (device tensors, no host sync)."""
        self.loss.index_copy_(0, idx.to(self.loss.device), losses.detach().float().to(self.loss.device))

    def update(self) -> None:
        """One sieving step: the ``k`` easiest partial samples out (queue tail), the queue's head ``k`` in."""
        if self.k == 0:
            return
        recent = self.loss[self.partial.to(self.loss.device)].cpu()
        order = torch.sort(recent, stable=True).indices
        out, keep = order[: self.k], order[self.k:]
        back = self.removed[: self.k]
        self.removed = torch.cat([self.removed[self.k:], self.partial[out]])
        self.partial = torch.cat([self.partial[keep], back])
        self.loss[back.to(self.loss.device)] = float("inf")  # not trained on since rejoining
        self.updates += 1

    def update_to(self, epoch: int) -> None:
        """Run the updates due at the starts of epochs ``period, 2 period, ... <= epoch`` not run yet."""
        while (self.updates + 1) * self.period <= epoch and self.k:
            self.update()

    def state_dict(self) -> dict[str, Any]:
        return {"partial": self.partial.clone(), "removed": self.removed.clone(), "loss": self.loss.cpu(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.partial, self.removed = state["partial"].clone(), state["removed"].clone()
        self.loss = state["loss"].to(self.loss.device)
        self.updates = int(state["updates"])


class SievedLoader(OrderedLoader):
    """A training loader over the sieve's partial set: the base loader's batches in the order of a
    :class:`~freezebench.zoo.sampling.SieveSampler` (moving to an epoch runs the sieve updates due by then)."""

    def __init__(self, base: Any, sieve: Sieve):
        super().__init__(base, SieveSampler(sieve, base.seed))
        self.sieve = sieve


def sieve_data(cfg: Any, data: DataBundle, *, seed: int, device: Any) -> tuple[DataBundle, Sieve | None]:
    """``data`` with its training loader wrapped by a sieve (``data.sieve.enabled``), and the sieve."""
    if not cfg.enabled:
        return data, None
    sieve = Sieve(data.train.num_samples, cfg.ratio, cfg.period, cfg.swap, seed, device=device)
    return dataclasses.replace(data, train=SievedLoader(data.train, sieve)), sieve
