"""Data-parallel training under ``torchrun``: every rank freezes the same units at the same step.

    torchrun --nproc_per_node 8 -m freezebench train policy=smartfrz ...           # GPUs: NCCL
    torchrun --nproc_per_node 2 -m freezebench train trainer.device=cpu ...        # CPU: gloo

(``python -m torch.distributed.run`` where the ``torchrun`` script is not on the path.) The trainer switches
to data parallelism when ``torchrun`` has set ``RANK``/``WORLD_SIZE``; nothing else changes on the command line.

How the ranks stay in step:

* **Data**: each rank trains on its shard of the epoch's order (the seeded permutation, or the sieve's
  partial set under ``data.sieve.*``), by ``DistributedSampler``'s rule (padded by wrapping to a multiple of
  the world size, every ``world``-th index from ``rank``), so all ranks take the same number of steps: the
  sampler chain of :mod:`freezebench.zoo.sampling`. ``data.batch_size`` is per rank (the global batch is
  ``world`` times it). Validation is sharded without padding and its sums are all-reduced. The sieve records
  the global batch's per-sample losses, so every rank's sieve moves the same samples.
* **Decisions**: every rank runs the policy on signals that are identical on all ranks (weights and, after
  DDP's all-reduce, gradients are identical; activations come from the same fixed probe batch; per-sample
  losses are all-gathered into the global batch), and rank 0's decision is broadcast and applied by every
  rank, so float noise can never split the ranks.
* **Freezing**: DDP's reducer knows the parameters that required gradients when it was built; after a freeze
  the wrapper is rebuilt around the remaining trainable parameters (the old reducer and its hooks dropped).
* **Buffers**: BatchNorm statistics move per rank; at every epoch end rank 0's buffers are broadcast (DDP
  itself broadcasts them before every forward), so evaluation and checkpoints see one model.
* **Accounting and logging**: samples, FLOPs and training loss/accuracy are summed over all ranks; only
  rank 0 logs to MLflow and writes checkpoints (with every rank's random states).
* **Stopping**: SIGTERM/SIGINT stop all ranks at the same step boundary (the stop flag is all-reduced every
  ``trainer.check_finite_every`` steps).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ..zoo.sampling import OrderedLoader, ShardSampler, chain_of


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist | None:
    """The process's place in a ``torchrun`` job (``None`` outside one)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def setup(ctx: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (pickled; for decisions, paths and flags)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so sample counts and FLOPs stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``t`` in rank order (the same shape on every rank)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank."""
    for b in module.buffers():
        dist.broadcast(b.data, src)


def wrap(model: torch.nn.Module, device: torch.device, old: Any = None) -> torch.nn.Module:
    """A DDP wrapper over the parameters of ``model`` that require gradients now.

    ``old`` (the previous wrapper) is dropped first: its reducer's hooks would otherwise wait for gradients
    of parameters that were frozen since.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if old is not None and old is not model:
        del old
        gc.collect()
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)


class ShardedLoader(OrderedLoader):
    """Rank ``rank``'s share of a loader of :mod:`freezebench.zoo.data` (plain or sieved): its sampler chain
    followed by a :class:`~freezebench.zoo.sampling.ShardSampler`.

    ``pad`` wraps the order to a multiple of ``world`` so every rank gets the same number of batches
    (training), or leaves the shards uneven (validation, where sums are all-reduced and nothing may be
    counted twice).
    """

    def __init__(self, loader: Any, rank: int, world: int, *, pad: bool):
        base, inner = chain_of(loader)
        super().__init__(base, ShardSampler(inner, rank, world, pad=pad, seed=base.seed))
        self.rank, self.world, self.pad = rank, world, pad

    def shard(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        return self.indices()


def shard_data(data: Any, ctx: Dist) -> Any:
    """A :class:`freezebench.zoo.data.DataBundle` whose loaders give this rank's shards."""
    return replace(data, train=ShardedLoader(data.train, ctx.rank, ctx.world_size, pad=True),
                   val=ShardedLoader(data.val, ctx.rank, ctx.world_size, pad=False))


# --- the parallelism object the trainer holds ----------------------------------------------------------------
class SingleProcess:
    """One process: every collective is the identity, the data is not sharded, the model not wrapped.

    :class:`DataParallel` has the same methods; the training loop calls them unconditionally, so it has no
    single-process / DDP branches.
    """

    rank = 0
    world_size = 1

    def setup(self, device: torch.device) -> torch.device:
        """The device this process trains on."""
        return device

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (decisions, paths, flags)."""
        return obj

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums over ranks."""
        return values

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated in rank order (the global batch)."""
        return t

    def agree(self, flag: bool, step: int, every: int, device: torch.device) -> bool:
        """Whether any rank raised ``flag``; under DDP checked (a collective) every ``every`` steps only."""
        return flag

    def reduce_epoch(self, sums: Any, model: torch.nn.Module) -> None:
        """An epoch's :class:`~freezebench.trainer.state.EpochSums` over all ranks, and rank 0's buffers."""

    def wrap(self, model: torch.nn.Module, device: torch.device, old: Any = None) -> torch.nn.Module:
        """What the training step calls: the model itself, or a DDP wrapper over its trained parameters."""
        return model

    def shard(self, data: Any) -> Any:
        """The :class:`~freezebench.zoo.data.DataBundle` this process iterates."""
        return data


class DataParallel(SingleProcess):
    """Data parallelism under ``torchrun`` (see the module docstring for how the ranks stay in step)."""

    def __init__(self, ctx: Dist):
        self.ctx = ctx
        self.rank, self.world_size = ctx.rank, ctx.world_size

    def setup(self, device: torch.device) -> torch.device:
        return setup(self.ctx, device)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def gather(self, obj: Any) -> list[Any]:
        return all_gather_object(obj)

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        return all_reduce_sum(values, device)

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(t)

    def agree(self, flag: bool, step: int, every: int, device: torch.device) -> bool:
        if step % every:
            return False
        return any_rank(flag, device)

    def reduce_epoch(self, sums: Any, model: torch.nn.Module) -> None:
        s, f, ls, c, ff = all_reduce_sum([sums.samples, sums.flops, sums.loss_sum.item(), sums.correct.item(),
                                          sums.flops_full], sums.loss_sum.device)
        broadcast_buffers(model)
        sums.samples, sums.flops, sums.flops_full = int(s), f, ff
        sums.loss_sum, sums.correct = torch.tensor(ls), torch.tensor(int(c))

    def wrap(self, model: torch.nn.Module, device: torch.device, old: Any = None) -> torch.nn.Module:
        return wrap(model, device, old)

    def shard(self, data: Any) -> Any:
        return shard_data(data, self.ctx)


def parallel_from_env() -> SingleProcess:
    """:class:`DataParallel` under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), else :class:`SingleProcess`."""
    ctx = from_env()
    return SingleProcess() if ctx is None else DataParallel(ctx)
