"""The frozen-prefix cache: skip the forward pass of a frozen prefix of units by storing its outputs.

Once units ``0..k-1`` are all frozen (weights fixed, normalisation layers in eval mode), what they compute
for a given input never changes. AutoFreeze (Liu et al., 2021, "AutoFreeze: Automatically Freezing Model
Blocks to Accelerate Fine-tuning"), Egeria (Wang et al., EuroSys 2023) and PipeTransformer (He et al.,
ICML 2021) therefore compute it once per sample, store it and feed the stored tensors to the trainable
rest of the network in later epochs. SmartFRZ (Li et al., ICLR 2023) never does this: its frozen units still
run forward every step. Here (ALGORITHMS.md, "Caching the frozen prefix"):

* **Where to cut.** The model is traced once with ``torch.fx``; a *cut* after unit ``k-1`` splits the graph
  after the last operation that belongs to units ``0..k-1``. Every value computed before the cut and read
  after it (the prefix output, and e.g. a residual branch's input when the cut falls inside a block) is a
  *live value*; the cache stores all of them, so any traceable model can be cut anywhere (no sequential
  structure is assumed). A cut is refused when an operation of a trainable unit, a trainable parameter or
  a random operation (dropout) runs before it, and a model ``torch.fx`` cannot trace is refused at
  construction: the message says to train without ``trainer.cache_frozen_prefix``.
* **What is stored.** The live values per training sample (keyed by the sample index ``idx`` that the
  loaders yield), in ``trainer.cache_dtype`` (bf16 by default, fp32 for bit-exact training), in device
  memory, in host memory (pinned, gathered on a background thread) or memory-mapped files on disk
  (``trainer.cache_location``).
* **When the prefix grows** from ``k`` to ``k'``, a sample stored at cut ``k`` is pushed through units
  ``k..k'-1`` only (the segment of the graph between the two cuts), not recomputed from the input; when it
  shrinks (unfreezing), values stored past the new prefix are dropped.
* **Cost.** A step costs ``CostModel.step_flops(frozen, cached_prefix=k)`` for samples served from cut
  ``k`` (their forward through units ``0..k-1`` is skipped), so the epoch that fills the cache pays the
  prefix forward once and later ones do not.

Caching is valid only if a sample's training input is the same every epoch: random augmentation is refused.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError
from .. import metrics as M
from ..units import Unit

log = logging.getLogger(__name__)

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_LOCATIONS = ("device", "cpu", "disk")
_NUMPY_STORAGE = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float32: np.float32}
_RANDOM_FUNCTIONS = {torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
                     torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout, torch.bernoulli,
                     torch.rand, torch.randn, torch.rand_like, torch.randn_like}


class ModelSplit:
    """A traced model that can run between any two cuts (after unit ``a-1`` .. after unit ``b-1``).

    Cut ``0`` is the model input; cut ``k`` lies after the last graph node of units ``0..k-1``. Segments are
    ``fx.GraphModule`` s that share the model's submodules and parameters (training updates are seen).
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit]):
        self.model = model
        self.units = list(units)
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: cannot split this model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"trainer.cache_frozen_prefix: {type(model).__name__} cannot be traced by torch.fx ({first[:200]}), "
                f"so its frozen prefix cannot be split off; set trainer.cache_frozen_prefix=false"
            ) from None
        self.nodes = list(self.gm.graph.nodes)
        unit_of_module = {n: u.index for u in self.units for n in u.module_names}
        self._unit_of = [self._node_unit(n, unit_of_module) for n in self.nodes]
        self._segments: dict[tuple[int, int], fx.GraphModule] = {}
        self._positions: dict[int, int] = {}
        self._index = {n: i for i, n in enumerate(self.nodes)}
        self._last_use = [max((self._index[u] for u in n.users), default=-1) for n in self.nodes]

    @staticmethod
    def _node_unit(node: fx.Node, unit_of_module: dict[str, int]) -> int | None:
        if node.op not in ("call_module", "get_attr"):
            return None
        name = str(node.target)
        if node.op == "get_attr":
            name = name.rpartition(".")[0]
        while True:  # the longest module name that belongs to a unit
            if name in unit_of_module:
                return unit_of_module[name]
            if not name:
                return None
            name = name.rpartition(".")[0]

    def position(self, k: int) -> int:
        """Graph position of cut ``k``: the prefix is ``nodes[:position]``."""
        if k == 0:
            return 0
        if k not in self._positions:
            owned = [i for i, u in enumerate(self._unit_of) if u is not None and u < k]
            pos = (max(owned) + 1) if owned else 0
            # move the cut past parameter-free, deterministic operations (activations, the residual add)
            # to where the fewest values cross it: after a block's add, only its output is stored
            best, fewest = pos, len(self.live(pos))
            while pos < len(self.nodes) and self._movable(self.nodes[pos]):
                pos += 1
                n = len(self.live(pos))
                if n <= fewest:
                    best, fewest = pos, n
            self._positions[k] = best
        return self._positions[k]

    def _movable(self, node: fx.Node) -> bool:
        if node.op in ("call_function", "call_method"):
            return not _is_random(node)
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return (self._unit_of[self._index[node]] is None and not any(True for _ in mod.parameters())
                    and not isinstance(mod, nn.modules.dropout._DropoutNd))
        return False

    def live(self, pos: int) -> list[fx.Node]:
        """Values computed before ``pos`` and read at or after it (parameters excepted)."""
        return [n for i, n in enumerate(self.nodes[:pos]) if n.op != "get_attr" and self._last_use[i] >= pos]

    def check_cut(self, k: int) -> None:
        """Raise :class:`ConfigError` unless everything before cut ``k`` is frozen and deterministic."""
        pos = self.position(k)
        modules = dict(self.gm.named_modules())
        for node, unit in zip(self.nodes[:pos], self._unit_of[:pos]):
            if unit is not None and unit >= k:
                raise ConfigError(
                    f"the model cannot be split after unit {k - 1} ({self.units[k - 1].name}): trainable unit "
                    f"{unit} ({self.units[unit].name}) runs before it; train without trainer.cache_frozen_prefix"
                )
            if node.op == "call_module":
                mod = modules[str(node.target)]
                if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
                    raise ConfigError(f"cannot cache the frozen prefix: dropout {node.target!r} in it is random "
                                      f"every step; train without trainer.cache_frozen_prefix")
                if any(p.requires_grad for p in mod.parameters()):
                    raise ConfigError(f"cannot cache the frozen prefix: {node.target!r} before unit {k} has "
                                      f"trainable parameters; train without trainer.cache_frozen_prefix")
            elif node.op == "get_attr":
                attr = self.gm.get_parameter(str(node.target)) if _is_param(self.gm, str(node.target)) else None
                if attr is not None and attr.requires_grad:
                    raise ConfigError(f"cannot cache the frozen prefix: trainable parameter {node.target!r} is "
                                      f"used before unit {k}; train without trainer.cache_frozen_prefix")
            elif node.op in ("call_function", "call_method") and _is_random(node):
                raise ConfigError(f"cannot cache the frozen prefix: {node.name} before unit {k} is random; train "
                                  f"without trainer.cache_frozen_prefix")

    def segment(self, a: int, b: int | None) -> fx.GraphModule:
        """A module taking the live values at cut ``a`` (cut 0: the model inputs) and returning the live
        values at cut ``b`` as a tuple (``b=None``: the model's output)."""
        key = (a, -1 if b is None else b)
        seg = self._segments.get(key)
        if seg is not None:
            return seg
        pa = self.position(a)
        pb = len(self.nodes) if b is None else self.position(b)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs = [n for n in self.nodes if n.op == "placeholder"] if a == 0 else self.live(pa)
        for n in inputs:
            env[n] = graph.placeholder(n.name)

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op != "get_attr":
                    raise RuntimeError(f"segment {a}->{b}: value {n.name} is not available")
                env[n] = graph.get_attr(n.target)
            return env[n]

        for n in self.nodes[pa:pb]:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                graph.output(fx.map_arg(n.args[0], lookup))
                break
            env[n] = graph.node_copy(n, lookup)
        if b is not None:
            graph.output(tuple(lookup(n) for n in self.live(pb)))
        seg = fx.GraphModule(self.gm, graph, class_name=f"Segment_{a}_{key[1]}")
        seg.graph.eliminate_dead_code()
        seg.recompile()
        self._segments[key] = seg
        return seg


def _is_random(node: fx.Node) -> bool:
    return node.target in _RANDOM_FUNCTIONS or node.target in ("bernoulli_", "uniform_", "normal_", "dropout")


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


class _Level:
    """Stored live values of every sample at one cut: one buffer per live value, shape (N, *value shape)."""

    def __init__(self, k: int, shapes: list[torch.Size], num_samples: int, dtype: torch.dtype, location: str,
                 device: torch.device, folder: Path | None):
        self.k = k
        self.buffers: list[torch.Tensor] = []
        for j, shape in enumerate(shapes):
            full = (num_samples, *shape)
            if location == "disk":
                assert folder is not None
                arr = np.lib.format.open_memmap(folder / f"cut{k}_value{j}.npy", mode="w+",
                                                dtype=_NUMPY_STORAGE[dtype], shape=full)
                buf = torch.from_numpy(arr).view(dtype)
            elif location == "cpu":
                buf = torch.empty(full, dtype=dtype, pin_memory=device.type == "cuda")
            else:
                buf = torch.empty(full, dtype=dtype, device=device)
            self.buffers.append(buf)
        self.count = 0  # samples stored at this cut
        self.nbytes = sum(b.numel() * b.element_size() for b in self.buffers)


class PrefixCache:
    """Per-sample cache of a frozen prefix's live values (see the module docstring).

    ``forward(x, idx, frozen)`` replaces ``model(x)`` in the training step: it serves the samples ``idx`` from
    the cache when they are stored at the cut after the frozen prefix of ``frozen``, otherwise computes
    their values at that cut (from the input, or from an earlier cut) under ``torch.no_grad``, stores them,
    and runs the trainable suffix on the stored (reduced-precision) values. ``last_flops_per_sample`` holds
    the step's training FLOPs per sample under the cost model.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], num_samples: int, *, dtype: str = "bf16",
                 location: str = "device", folder: str | None = None, device: torch.device | str = "cpu",
                 cost: Any = None, channels_last: bool = False):
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"trainer.cache_dtype={dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
        if location not in CACHE_LOCATIONS:
            raise ConfigError(f"trainer.cache_location={location!r} is not one of {', '.join(CACHE_LOCATIONS)}")
        self.split = ModelSplit(model, units)
        self.units = list(units)
        self.num_samples = num_samples
        self.dtype = CACHE_DTYPES[dtype]
        self.location = location
        self.device = torch.device(device)
        self.cost = cost
        self.channels_last = channels_last
        self._tmp: str | None = None
        if location == "disk":
            if folder:
                self.folder = Path(folder).expanduser()
                self.folder.mkdir(parents=True, exist_ok=True)
            else:
                self._tmp = tempfile.mkdtemp(prefix="freezebench-cache-")
                self.folder = Path(self._tmp)
        else:
            self.folder = None
        self.level = np.zeros(num_samples, dtype=np.int32)  # cut each sample is stored at (0: not stored)
        self.levels: dict[int, _Level] = {}
        self._checked: set[int] = set()
        self._prefix = 0
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="freezebench-cache")
                      if location != "device" else None)
        self.last_flops_per_sample = 0.0
        self._frozen: frozenset[int] = frozenset()
        self._pending: dict[int, tuple[np.ndarray, concurrent.futures.Future]] = {}
        self.stats = {"served": 0, "computed_from_input": 0, "pushed": 0}

    # --- bookkeeping ----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(lv.nbytes for lv in self.levels.values())

    def _drop_level(self, k: int) -> None:
        lv = self.levels.pop(k, None)
        if lv is not None and self.folder is not None:
            for j in range(len(lv.buffers)):
                (self.folder / f"cut{k}_value{j}.npy").unlink(missing_ok=True)

    def set_prefix(self, k: int) -> None:
        """The frozen prefix now has length ``k``; values stored past it are dropped (unfreezing)."""
        if k < self._prefix:
            for lvl in [x for x in self.levels if x > k]:
                self._drop_level(lvl)
            self.level[self.level > k] = 0
        if k > 0 and k not in self._checked:
            self.split.check_cut(k)
            self._checked.add(k)
        self._prefix = k

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.levels.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def metrics(self) -> dict[str, float]:
        """``cache/mb`` (stored now) and the samples served from it / computed into it so far."""
        return {M.CACHE_MB: self.nbytes / 2**20, M.CACHE_SERVED: float(self.stats["served"]),
                M.CACHE_COMPUTED: float(self.stats["computed_from_input"] + self.stats["pushed"])}

    # --- prefetching --------------------------------------------------------------------------------------
    def batches(self, loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Iterate ``loader``; with host or disk storage, gather each next batch's stored values on a
        background thread while the current step runs (the gathered rows are consumed by :meth:`forward`)."""
        self._pending = {}
        if self._pool is None:
            yield from loader
            return
        it = iter(loader)
        ahead: list[tuple[Any, ...]] = []
        done = False

        def pull() -> None:
            nonlocal done
            try:
                b = next(it)
            except StopIteration:
                done = True
                return
            host_idx = b[2].detach().to("cpu", non_blocking=False).numpy().copy()
            fut = self._pool.submit(self._gather_host, host_idx, self._prefix)
            ahead.append((b, host_idx, fut))

        pull()
        while ahead:
            while not done and len(ahead) < 3:  # two batches ahead: the device may run that far ahead
                pull()
            b, host_idx, fut = ahead.pop(0)
            self._pending[id(b[2])] = (host_idx, fut)
            yield b
            self._pending.pop(id(b[2]), None)

    def _gather_host(self, host_idx: np.ndarray, k: int) -> tuple[int, list[torch.Tensor]] | None:
        """Rows ``host_idx`` at cut ``k`` copied to the device, or None when not all are stored there."""
        lv = self.levels.get(k)
        if k == 0 or lv is None or not (self.level[host_idx] == k).all():
            return None
        ti = torch.from_numpy(host_idx)
        pin = self.device.type == "cuda"
        out = []
        for buf in lv.buffers:
            rows = buf.index_select(0, ti)
            if pin:
                rows = rows.pin_memory()
            out.append(rows.to(self.device, non_blocking=pin))
        return k, out

    # --- the step ------------------------------------------------------------------------------------------
    def _to_compute(self, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for v in values:
            v = v.float()
            if self.channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out.append(v)
        return out

    def forward(self, x: torch.Tensor, idx: torch.Tensor, frozen: Any) -> torch.Tensor:
        """``model(x)`` for the training samples ``idx``, with the units ``frozen`` frozen."""
        self._frozen = frozenset(frozen)
        k = 0
        while k in self._frozen:
            k += 1
        self.set_prefix(k)
        n = len(idx)
        if k == 0:
            self.last_flops_per_sample = self._flops(0)
            return self.split.model(x)
        lv = self.levels.get(k)
        pend = self._pending.get(id(idx))
        values: list[torch.Tensor] | None = None
        if pend is not None:  # gathered ahead on the background thread (host / disk storage)
            got = pend[1].result()
            if got is not None and got[0] == k:
                values = got[1]
        elif lv is not None and lv.count == self.num_samples and lv.buffers[0].device == idx.device:
            values = [buf.index_select(0, idx) for buf in lv.buffers]  # all stored here: no host round trip
        if values is None:
            host_idx = pend[0] if pend is not None else idx.detach().cpu().numpy()
            levels = self.level[host_idx]
            if lv is None or not (levels == k).all():
                return self._fill(x, idx, host_idx, levels, k)
            ti = idx if lv.buffers[0].device == idx.device else torch.from_numpy(host_idx)
            values = [buf.index_select(0, ti).to(self.device, non_blocking=True) for buf in lv.buffers]
        self.stats["served"] += n
        self.last_flops_per_sample = self._flops(k)
        return self.split.segment(k, None)(*self._to_compute(values))

    def _fill(self, x: torch.Tensor, idx: torch.Tensor, host_idx: np.ndarray, levels: np.ndarray,
              k: int) -> torch.Tensor:
        """Compute the values at cut ``k`` of a batch (from the input or from earlier cuts), store, train."""
        n = len(host_idx)
        values: list[torch.Tensor | None] | None = None
        flops = 0.0
        with torch.no_grad():
            for src in sorted(set(levels.tolist())):
                rows = np.nonzero(levels == src)[0]
                if src == 0 or src > k or src not in self.levels:
                    sel = torch.from_numpy(rows).to(x.device)
                    out = self.split.segment(0, k)(x if len(rows) == n else x.index_select(0, sel))
                    self.stats["computed_from_input"] += len(rows)
                    flops += self._flops(0) * len(rows)
                else:
                    ti = torch.from_numpy(host_idx[rows])
                    stored = self.levels[src].buffers
                    ins = [b.index_select(0, ti.to(b.device)).to(self.device) for b in stored]
                    out = self.split.segment(src, k)(*self._to_compute(ins))
                    self.stats["pushed"] += len(rows)
                    flops += self._flops(src) * len(rows)
                out = list(out)
                if values is None:
                    values = [None] * len(out)
                for j, v in enumerate(out):
                    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != len(rows):
                        raise ConfigError(
                            f"cannot cache the frozen prefix: a value crossing the cut after unit {k - 1} is not a "
                            f"per-sample tensor; train without trainer.cache_frozen_prefix")
                    if values[j] is None:
                        values[j] = torch.empty((n, *v.shape[1:]), dtype=self.dtype, device=v.device)
                    values[j][torch.from_numpy(rows).to(v.device)] = v.to(self.dtype)
        assert values is not None
        self._store(k, host_idx, idx, values)  # type: ignore[arg-type]
        self.last_flops_per_sample = flops / n
        return self.split.segment(k, None)(*self._to_compute(values))  # type: ignore[arg-type]

    def _store(self, k: int, host_idx: np.ndarray, idx: torch.Tensor, values: list[torch.Tensor]) -> None:
        lv = self.levels.get(k)
        if lv is None:
            lv = _Level(k, [v.shape[1:] for v in values], self.num_samples, self.dtype, self.location, self.device,
                        self.folder)
            self.levels[k] = lv
            log.info("frozen-prefix cache: cut after unit %d, %d value(s) per sample, %.1f MiB (%s, %s)", k - 1,
                     len(values), lv.nbytes / 2**20, self.location, str(self.dtype).replace("torch.", ""))
        ti = idx if lv.buffers[0].device == idx.device else torch.from_numpy(host_idx)
        for buf, v in zip(lv.buffers, values):
            buf.index_copy_(0, ti, v.to(buf.device))
        old = self.level[host_idx]
        for src in set(old.tolist()) - {0, k}:
            other = self.levels.get(src)
            if other is not None:
                other.count -= int((old == src).sum())
                if other.count <= 0:
                    self._drop_level(src)
        lv.count += int((old != k).sum())
        self.level[host_idx] = k

    def _flops(self, cached_from: int) -> float:
        if self.cost is None:
            return 0.0
        return self.cost.step_flops(self._frozen, cached_prefix=cached_from)
