"""Layer tailoring (SmartFRZ paper, section 3.2-3.3): every unit reduced to ``tailor_size`` sampled weights.

The predictor is shared by all units, so each unit's weights are cut down to a fixed-size vector. For each
unit a set of ``tailor_size`` indices into the unit's *flattened, concatenated* parameters (in the unit's
parameter order) is drawn once and reused for every snapshot, so a history is a history of the same
weights.

Choices that are ours (the paper only says "randomly sample"):

* **Generator.** Unit ``u``'s indices come from a CPU ``torch.Generator`` seeded with a 63-bit hash
  (BLAKE2b) of ``(seed, u)``: stable across snapshots, reproducible across runs and devices with the same
  seed, different for different seeds or units. Drawn on the CPU, then moved to the parameters' device.
* **Nested.** A unit's index sequence does not depend on ``tailor_size``: it is the concatenation of
  independent permutations of all ``numel`` weights (``randperm`` from the unit's generator, as many as
  needed), and the size-``k`` tailoring is its first ``k`` entries. So the size-512 tailoring is the
  prefix of the size-4096 one for every unit, and one collection at tailor 4096 holds every smaller
  tailor size's snapshots as its leading columns (``predictors/collect.py``).
* **Units with at least ``tailor_size`` weights** are therefore sampled *without* replacement (the prefix
  of one permutation); **units with fewer** (a BatchNorm-only unit, a small bias-only unit) see every
  weight at least once (the first ``numel`` draws are a permutation of all of them) and the rest repeat
  in further permutations. A unit with no weights is an error.
* **Gathering** never concatenates a unit's parameters: the indices are split per tensor once (sorted,
  with the permutation that restores the drawn order), each tensor contributes one ``index_select`` of
  its own elements, and the small gathered pieces are put back in drawn order with one index. The
  batched :meth:`Tailor.snapshot_all` does that for many units, each tensor's ``index_select`` writing
  into a cached staging vector, then one ``index_select`` with a cached index.
* Snapshots are returned in ``float32`` by default (whatever the parameters' dtype), detached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = ["Tailor", "unit_seed", "draw_indices", "WHOLE_COPY_MAX"]

#: tensors of at most this many elements are copied whole by :meth:`Tailor.snapshot_all` (one call for all
#: of them), larger ones gathered (one call each); a copy of 4,096 floats costs about one call's overhead
WHOLE_COPY_MAX = 4096

UnitSpec = Sequence[torch.Tensor] | Sequence[int] | int


def unit_seed(seed: int, unit: int) -> int:
    """The generator seed of unit ``unit``: a 63-bit BLAKE2b hash of ``(seed, unit)``."""
    digest = hashlib.blake2b(f"smartfrz-tailor:{int(seed)}:{int(unit)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_indices(numel: int, tailor_size: int, seed: int, unit: int) -> torch.Tensor:
    """``tailor_size`` indices in ``[0, numel)`` (int64, CPU) for unit ``unit``; see the module docstring."""
    if numel <= 0:
        raise ValueError(f"unit {unit} has no weights to tailor")
    if tailor_size <= 0:
        raise ValueError(f"tailor_size must be positive, got {tailor_size}")
    g = torch.Generator().manual_seed(unit_seed(seed, unit))
    blocks, have = [], 0
    while have < tailor_size:  # one permutation of all the unit's weights after another: nested prefixes
        blocks.append(torch.randperm(numel, generator=g)[: tailor_size - have])
        have += len(blocks[-1])
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _sizes(spec: UnitSpec) -> tuple[list[int], torch.device]:
    if isinstance(spec, int):
        return [spec], torch.device("cpu")
    items = list(spec)
    if items and all(isinstance(t, torch.Tensor) for t in items):
        return [t.numel() for t in items], items[0].device
    if all(isinstance(t, int) for t in items):
        return [int(t) for t in items], torch.device("cpu")
    raise TypeError("a unit is given as a list of tensors, a list of tensor sizes, or one total size")


class Tailor:
    """Fixed per-unit sample indices and the gathering of snapshots.

    ``units``: one entry per unit (unit index = position), each a list of the unit's parameter tensors, a
    list of their sizes (``numel``), or one int (the unit's total size, as one tensor).
    ``device``: where indices live; default: the device of each unit's first tensor (CPU for sizes).
    """

    def __init__(
        self,
        units: Sequence[UnitSpec],
        tailor_size: int = 1024,  # weights sampled per unit (paper default 1024; Table 5 sweeps 512-4096)
        seed: int = 0,  # base seed; unit u uses unit_seed(seed, u)
        device: torch.device | str | None = None,
    ):
        self.tailor_size = int(tailor_size)
        self.seed = int(seed)
        self.numels: list[list[int]] = []
        self.indices: list[torch.Tensor] = []  # (tailor_size,) int64, drawn order, per unit
        self._local: list[list[torch.Tensor]] = []  # per unit, per tensor: sorted local offsets
        self._restore: list[torch.Tensor] = []  # per unit: gathered (sorted) order -> drawn order
        self._plans: dict[tuple, tuple] = {}  # snapshot_all's cached plans per (unit set, dtype)
        for u, spec in enumerate(units):
            sizes, dev = _sizes(spec)
            dev = torch.device(device) if device is not None else dev
            idx = draw_indices(sum(sizes), self.tailor_size, self.seed, u)
            self.numels.append(sizes)
            self._build(idx, sizes, dev)

    def _build(self, idx: torch.Tensor, sizes: list[int], dev: torch.device) -> None:
        sorted_idx, order = torch.sort(idx)
        bounds = torch.tensor([0, *sizes]).cumsum(0)
        local = []
        for i in range(len(sizes)):
            lo, hi = torch.searchsorted(sorted_idx, bounds[i : i + 2]).tolist()
            local.append((sorted_idx[lo:hi] - bounds[i]).to(dev))
        restore = torch.empty_like(order)
        restore[order] = torch.arange(len(order))  # gathered[restore] is in drawn order
        self.indices.append(idx.to(dev))
        self._local.append(local)
        self._restore.append(restore.to(dev))

    @property
    def num_units(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> Tailor:
        """Move every index tensor to ``device`` (in place; returns self)."""
        self.indices = [t.to(device) for t in self.indices]
        self._local = [[t.to(device) for t in ts] for ts in self._local]
        self._restore = [t.to(device) for t in self._restore]
        self._plans = {}
        return self

    def _gather(self, unit: int, params: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        if len(params) != len(self._local[unit]):
            raise ValueError(f"unit {unit}: got {len(params)} tensors, tailored for {len(self._local[unit])}")
        pieces = []
        for p, loc, n in zip(params, self._local[unit], self.numels[unit]):
            if p.numel() != n:
                raise ValueError(f"unit {unit}: a tensor has {p.numel()} elements, tailored for {n}")
            if loc.numel():
                pieces.append(p.detach().reshape(-1).index_select(0, loc).to(dtype))
        return pieces

    def snapshot(
        self, unit: int, unit_params: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The tailored snapshot ``(tailor_size,)`` of unit ``unit`` whose parameters are ``unit_params``."""
        return torch.cat(self._gather(unit, unit_params, dtype))[self._restore[unit]]

    def snapshot_all(
        self,
        params: Sequence[Sequence[torch.Tensor]],
        units: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Snapshots ``(len(units), tailor_size)`` of ``units`` (default: all), row ``i`` for ``units[i]``.

        ``params[u]`` is unit ``u``'s parameter list (indexed by unit id, like the constructor's list).

        Per set of units (and dtype) a plan is built once and cached; a call then issues a fixed handful
        of operations whatever the number of tensors:

        * each *large* tensor (more than :data:`WHOLE_COPY_MAX` elements) contributes one ``index_select``
          of its sampled elements, read through a flat view kept in the plan and written straight into a
          cached source vector (``out=``);
        * all *small* tensors (BatchNorm weights and biases, small convolutions) are copied whole into the
          same vector by one ``torch._foreach_copy_``: one call for dozens of tensors instead of one
          gather each;
        * one ``index_select`` with a cached index reads every unit's snapshot, in drawn order, from that
          vector (a small tensor's sampled elements, repeats included, are read from its copy).

        No concatenation, no reshape, no allocation but the result. A tensor that is not the planned one
        (another object, or its storage moved: ``p.data = ...``) is flattened again. (Relative costs
        measured in isolation on resnet20's 19 layer units, 57 tensors, tailor 1024, on a loaded CPU: the
        advanced-indexing gather of the first version, rebuilding its index every call, took 6-12x as
        long as one gather per tensor; concatenating all the weights for one global ``index_select`` about
        5x, the concatenation itself dominating.) The values are copies of the weights, so every variant
        gives the same bits."""
        units = list(range(self.num_units)) if units is None else list(units)
        if not units:
            dev = self.indices[0].device if self.indices else torch.device("cpu")
            return torch.empty(0, self.tailor_size, dtype=dtype, device=dev)
        key = (tuple(units), dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(units, params, dtype)
            if len(self._plans) > 64:  # active sets only shrink during training: a handful of keys
                self._plans.clear()
            self._plans[key] = plan
        source, index, big, small, small_dst, small_src = plan
        with torch.no_grad():
            for u, j, p, ptr, flat, loc, dst in big:
                q = params[u][j]
                if q is p and flat is not None and q.data_ptr() == ptr:  # the planned tensor, unmoved
                    torch.index_select(flat, 0, loc, out=dst)
                elif q.dtype == dtype:
                    torch.index_select(q.reshape(-1), 0, loc, out=dst)
                else:
                    dst.copy_(q.reshape(-1).index_select(0, loc))
            if small:
                if all(params[u][j] is p and p.data_ptr() == ptr for u, j, p, ptr in small):
                    torch._foreach_copy_(small_dst, small_src)
                else:
                    for (u, j, _, _), dst in zip(small, small_dst):
                        dst.copy_(params[u][j].reshape(-1))
            return source.index_select(0, index).view(len(units), self.tailor_size)

    def _plan(self, units: list[int], params: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype):
        for u in units:  # checked once per plan: the units' tensors are fixed for a run
            if len(params[u]) != len(self._local[u]):
                raise ValueError(f"unit {u}: got {len(params[u])} tensors, tailored for {len(self._local[u])}")
            for p, n in zip(params[u], self.numels[u]):
                if p.numel() != n:
                    raise ValueError(f"unit {u}: a tensor has {p.numel()} elements, tailored for {n}")
        dev = self._restore[units[0]].device
        big_n = small_n = 0
        layout = []  # per unit, per tensor: ("big", offset in the gathered part) | ("small", offset in the copies)
        for u in units:
            for j, loc in enumerate(self._local[u]):
                p = params[u][j]
                if not loc.numel():
                    layout.append(None)
                elif p.numel() <= WHOLE_COPY_MAX and p.is_contiguous():
                    layout.append(("small", small_n))
                    small_n += p.numel()
                else:
                    layout.append(("big", big_n))
                    big_n += loc.numel()
        source = torch.empty(big_n + small_n, dtype=dtype, device=dev)
        big, small, small_dst, small_src, index, at = [], [], [], [], [], 0
        for u in units:
            pos = []  # where the unit's sampled elements (sorted order) lie in `source`
            for j, loc in enumerate(self._local[u]):
                slot = layout[at]
                at += 1
                if slot is None:
                    continue
                p = params[u][j]
                kind, off = slot
                if kind == "big":
                    # a flat view of a contiguous tensor of the output dtype, kept with the tensor and its
                    # address (optimisers and load_state_dict update weights in place)
                    flat = p.detach().view(-1) if p.is_contiguous() and p.dtype == dtype else None
                    big.append((u, j, p, p.data_ptr(), flat, loc, source[off : off + loc.numel()]))
                    pos.append(torch.arange(off, off + loc.numel(), device=dev))
                else:
                    off += big_n
                    small.append((u, j, p, p.data_ptr()))
                    small_dst.append(source[off : off + p.numel()])
                    small_src.append(p.detach().view(-1))
                    pos.append(loc + off)
            index.append(torch.cat(pos)[self._restore[u]])  # drawn order
        return source, torch.cat(index), big, small, small_dst, small_src
