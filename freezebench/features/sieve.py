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
from collections.abc import Iterator
from typing import Any

import torch

from ..zoo.data import Batch, DataBundle, TensorLoader


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


class SievedLoader:
    """A training loader over the sieve's partial set; everything else is the wrapped loader's."""

    def __init__(self, base: Any, sieve: Sieve):
        self.base, self.sieve = base, sieve
        self.batch_size = base.batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.sieve.m / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.base.num_samples

    def unaugmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.unaugmented(idx)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)
        self.sieve.update_to(epoch)

    def __iter__(self) -> Iterator[Batch]:
        base = self.base
        gen = torch.Generator(device="cpu").manual_seed(base.seed * 1_000_003 + self.epoch)
        order = self.sieve.partial[torch.randperm(self.sieve.m, generator=gen)]
        if isinstance(base, TensorLoader):
            order = order.to(base.device)
            for b in range(len(self)):
                idx = order[b * self.batch_size: (b + 1) * self.batch_size]
                yield base._prepare(base.x[idx], gen if base.augment else None), base.y[idx], idx
            return
        # a folder loader: a DataLoader over the partial set, in this order (items carry dataset indices)
        dl = torch.utils.data.DataLoader(torch.utils.data.Subset(base.ds, order.tolist()),
                                         batch_size=self.batch_size, shuffle=False, num_workers=base.num_workers,
                                         pin_memory=base.device.type == "cuda")
        nb = base.device.type == "cuda"
        for x, y, i in dl:
            yield x.to(base.device, non_blocking=nb), y.to(base.device, non_blocking=nb), i.to(base.device)


def sieve_data(cfg: Any, data: DataBundle, *, seed: int, device: Any) -> tuple[DataBundle, Sieve | None]:
    """``data`` with its training loader wrapped by a sieve (``data.sieve.enabled``), and the sieve."""
    if not cfg.enabled:
        return data, None
    sieve = Sieve(data.train.num_samples, cfg.ratio, cfg.period, cfg.swap, seed, device=device)
    return dataclasses.replace(data, train=SievedLoader(data.train, sieve)), sieve
