"""Per-unit history of tailored snapshots: a ring buffer on the training device.

One tensor ``(num_units, window, tailor_size)`` holds the last ``window`` snapshots of every unit (the
paper's attention window, default 30). ``record`` writes the snapshots of several units with one indexed
store; ``windows`` reads several units' windows, oldest first, with one gather. Write positions and fill
counts are kept on the host (Python ints), so neither call synchronises with the device.

Memory: ``num_units * window * tailor_size * 4`` bytes in fp32, e.g. ResNet-50's 54 layer units at window
30 and tailor 1024: 6.6 MB (the paper: "about 6 MB"). Frozen units are dropped (count reset); their rows
stay allocated (no reallocation during training) but are zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HistoryBuffer"]


class HistoryBuffer:
    def __init__(
        self,
        num_units: int,
        window: int = 30,  # snapshots kept per unit (paper default 30; Table 4 sweeps 20-50)
        tailor_size: int = 1024,  # length of one snapshot
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if window < 1 or tailor_size < 1 or num_units < 0:
            raise ValueError(
                f"need window >= 1, tailor_size >= 1, num_units >= 0; got {window}, {tailor_size}, {num_units}"
            )
        self.num_units, self.window, self.tailor_size = int(num_units), int(window), int(tailor_size)
        self.buffer = torch.zeros(self.num_units, self.window, self.tailor_size, device=device, dtype=dtype)
        self._head = [0] * self.num_units  # next slot to write, per unit
        self._count = [0] * self.num_units  # snapshots held, per unit (<= window)
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # record's row index per (checked) set of units

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer."""
        return self.buffer.numel() * self.buffer.element_size()

    def _check(self, unit_ids: Sequence[int]) -> list[int]:
        ids = [int(u) for u in unit_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit ids must be distinct, got {ids}")
        bad = [u for u in ids if not 0 <= u < self.num_units]
        if bad:
            raise IndexError(f"unit ids {bad} out of range 0..{self.num_units - 1}")
        return ids

    def record(self, unit_ids: Sequence[int], snapshots: torch.Tensor) -> None:
        """Append ``snapshots[i]`` (``(k, tailor_size)``) to the history of ``unit_ids[i]``.

        One store: when every unit writes the same slot (the case in training, where the active units are
        recorded together), ``index_copy_`` of the rows into that slot with a row index cached per set of
        units; otherwise one indexed store."""
        key = tuple(map(int, unit_ids))
        rows = self._rows.get(key)
        if rows is None:
            ids = self._check(unit_ids)
            rows = torch.tensor(ids, device=self.device, dtype=torch.long)
            if len(self._rows) > 64:  # active sets only shrink during training: a handful of keys
                self._rows.clear()
            self._rows[key] = rows
        if snapshots.shape != (len(key), self.tailor_size):
            shape = tuple(snapshots.shape)
            raise ValueError(f"snapshots must have shape ({len(key)}, {self.tailor_size}), got {shape}")
        if not key:
            return
        head, count, window = self._head, self._count, self.window
        slot = head[key[0]]
        snaps = snapshots.to(device=self.device, dtype=self.buffer.dtype)
        if all(head[u] == slot for u in key):
            self.buffer.select(1, slot).index_copy_(0, rows, snaps)
        else:
            cols = torch.tensor([head[u] for u in key], device=self.device)
            self.buffer[rows, cols] = snaps
        for u in key:
            head[u] = (head[u] + 1) % window
            if count[u] < window:
                count[u] += 1

    def count(self, unit: int) -> int:
        """Snapshots held for ``unit`` (at most ``window``)."""
        return self._count[unit]

    def full(self, unit: int) -> bool:
        return self._count[unit] == self.window

    def ready_units(self) -> list[int]:
        """Units with a full window, ascending."""
        return [u for u in range(self.num_units) if self._count[u] == self.window]

    def windows(self, unit_ids: Sequence[int]) -> torch.Tensor:
        """``(k, window, tailor_size)``: each unit's snapshots oldest first (the latest is ``[:, -1]``).

        Every unit must have a full window (see :meth:`ready_units`). The result is a fresh tensor (an
        advanced-indexing gather), never a view of the buffer: the policy normalises it in place."""
        ids = self._check(unit_ids)
        short = [u for u in ids if not self.full(u)]
        if short:
            raise ValueError(f"units {short} do not have a full window of {self.window} snapshots yet")
        # with a full ring, the oldest entry is at the head (the next slot to be overwritten)
        start = torch.tensor([self._head[u] for u in ids], device=self.device)
        cols = (start.unsqueeze(1) + torch.arange(self.window, device=self.device)) % self.window
        rows = torch.tensor(ids, device=self.device).unsqueeze(1)
        return self.buffer[rows, cols]

    def drop(self, unit: int) -> None:
        """Forget ``unit``'s history (a frozen unit): count reset, its rows zeroed."""
        self._check([unit])
        self._head[unit] = 0
        self._count[unit] = 0
        self.buffer[unit].zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "tailor_size": self.tailor_size,
            "buffer": self.buffer.detach().clone(),
            "head": list(self._head),
            "count": list(self._count),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        if tuple(buf.shape) != tuple(self.buffer.shape):
            raise ValueError(f"history state has shape {tuple(buf.shape)}, this buffer {tuple(self.buffer.shape)}")
        self.buffer.copy_(buf)
        self._head = [int(h) for h in state["head"]]
        self._count = [int(c) for c in state["count"]]
