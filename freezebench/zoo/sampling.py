"""The training data order as a chain of samplers: epoch shuffle (or the sieve's partial set) -> shard.

    EpochShuffle(n, seed, shuffle=True)                    # epoch e: a seeded permutation of 0..n-1
    SieveSampler(sieve, seed)                              # epoch e: the sieve's partial set, shuffled
    ShardSampler(inner, rank, world, pad=True, seed=seed)  # rank r's share of what ``inner`` gives

A sampler gives, per epoch, the dataset indices to visit in order and the generator that augmentation of
those batches draws from. :class:`OrderedLoader` batches any chain over a base loader of
:mod:`freezebench.zoo.data` (its tensors or its dataset), so sieving under DDP is the composition
``ShardSampler(SieveSampler(...))`` and nothing re-implements iteration.

One seed formula (:func:`epoch_seed`): epoch ``e`` of a run seeded ``s`` draws its order from
``s * 1_000_003 + e``; under DDP each rank's augmentation draws from that plus ``7_919 * (rank + 1)``
(:func:`rank_seed`), so ranks do not augment their samples alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order (every loader and sampler uses it)."""
    return seed * 1_000_003 + epoch


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation in epoch ``epoch`` under DDP."""
    return epoch_seed(seed, epoch) + 7_919 * (rank + 1)


class EpochShuffle:
    """All ``n`` samples, in a seeded permutation per epoch (in order when ``shuffle`` is off)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        pass

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        gen = torch.Generator(device="cpu").manual_seed(epoch_seed(self.seed, epoch))
        return (torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)), gen


class SieveSampler:
    """The sieve's partial set (:mod:`freezebench.features.sieve`) in a seeded permutation per epoch; moving
    to epoch ``e`` runs the sieve updates due by then."""

    def __init__(self, sieve: Any, seed: int):
        self.sieve, self.seed = sieve, seed

    def __len__(self) -> int:
        return self.sieve.m

    def set_epoch(self, epoch: int) -> None:
        self.sieve.update_to(epoch)

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        gen = torch.Generator(device="cpu").manual_seed(epoch_seed(self.seed, epoch))
        return self.sieve.partial[torch.randperm(self.sieve.m, generator=gen)], gen


class ShardSampler:
    """Rank ``rank``'s share of ``inner``'s order, by ``DistributedSampler``'s rule: padded by wrapping to a
    multiple of ``world`` when ``pad`` (training: every rank takes the same number of steps), then every
    ``world``-th index from ``rank``; unpadded shards (validation) partition the samples."""

    def __init__(self, inner: Any, rank: int, world: int, *, pad: bool, seed: int):
        self.inner, self.rank, self.world, self.pad, self.seed = inner, rank, world, pad, seed

    def __len__(self) -> int:
        n = len(self.inner)
        return math.ceil(n / self.world) if self.pad else len(range(self.rank, n, self.world))

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Generator]:
        order, _ = self.inner.order(epoch)
        n = len(order)
        if self.pad:
            total = math.ceil(n / self.world) * self.world
            order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
        return order[self.rank :: self.world], torch.Generator().manual_seed(rank_seed(self.seed, epoch, self.rank))


class OrderedLoader:
    """Batches of a base loader (:class:`~freezebench.zoo.data.TensorLoader` or
    :class:`~freezebench.zoo.data.FolderLoader`) in the order a sampler chain gives; everything else
    (sample count, unaugmented view, device) is the base loader's."""

    def __init__(self, base: Any, sampler: Any):
        self.base, self.sampler = base, sampler
        self.batch_size = base.batch_size

    @property
    def epoch(self) -> int:
        """The current epoch (the base loader's: loaders over one base move together)."""
        return self.base.epoch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.base.num_samples

    def unaugmented(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.unaugmented(idx)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        """The dataset indices of the current epoch, in the order they are visited."""
        return self.sampler.order(self.epoch)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order, gen = self.sampler.order(self.epoch)
        yield from self.base.batches_of(order, gen)


def chain_of(loader: Any) -> tuple[Any, Any]:
    """``(base loader, sampler)`` of ``loader``: its chain when it is an :class:`OrderedLoader`, else the
    plain loader's own epoch shuffle."""
    if isinstance(loader, OrderedLoader):
        return loader.base, loader.sampler
    return loader, EpochShuffle(loader.num_samples, loader.seed, loader.shuffle)
