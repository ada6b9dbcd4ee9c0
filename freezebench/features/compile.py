"""Compiled training that survives freezing (``trainer.compile=true``, off by default).

``torch.compile`` traces the training forward into a graph that AOT autograd differentiates once, for the
parameters that required gradients *at trace time*. Freezing changes ``requires_grad`` (and puts the frozen
units' BatchNorm into eval mode), so every freeze event fails dynamo's guards and forces a recompile; this
is also what makes freezing pay off under compilation: the new backward graph no longer computes the
frozen weights' gradients. Done naively, this has three pitfalls, which this module removes:

* **Silent fall-back to eager.** Dynamo keeps all of a code object's compiled graphs in one cache of
  ``torch._dynamo.config.recompile_limit`` entries (8). A policy that freezes often (FreezeOut one unit at a
  time, AutoFreeze 4 checks per epoch, SmartFRZ in any order) exceeds it, and dynamo then runs that code
  eagerly for the rest of the run, saying so once in a log line. Here every frozen set gets its *own* compile
  region (``torch.compile(..., isolate_recompiles=True)``, torch >= 2.14), so a region's cache holds the one
  graph for its frozen set (plus at most a shape specialisation), and the old regions of a policy that never
  unfreezes are dropped. The global ``accumulated_recompile_limit`` is raised when the run's regions need it.
  (Before torch 2.14 regions share the code object's cache, and ``recompile_limit`` is raised by a region's
  allowance at every new frozen set instead: the cache is sized for the run's freeze events.)
  If dynamo falls back anyway (a frame it cannot compile, a limit hit), :class:`CompiledTraining` logs a
  warning and counts it in ``compile/fallbacks``; graph breaks are counted in ``compile/graph_breaks``.
* **Recompiling more than needed.** A region is keyed by the frozen set, so compilation happens only when the
  frozen set changes (and not at all when a policy that unfreezes returns to a set it trained before).
* **Compile time counted as training time.** Dynamo's compile callbacks (``torch._dynamo.callback``: start
  and end of every frame compile, and of a backward compiled lazily) time compilation; the trainer subtracts
  it from ``time/train_s`` and logs it as ``time/compile_s``.

The frozen-prefix cache (:mod:`freezebench.features.cache`) composes: it calls its trainable suffix (an
``fx`` segment) through :meth:`CompiledTraining.__call__`, so the suffix is compiled per frozen set and the
prefix, which runs under ``torch.no_grad`` only while the cache fills, stays eager. Evaluation and the
probe forwards that policies ask for run the eager model. Under DDP (several processes) compilation is
refused with one line: the trainer re-wraps DDP at every freeze event, and that path is not tested.

Metrics (per epoch, counts cumulative): ``compile/compiles`` (frozen sets whose training forward was
compiled), ``compile/recompiles`` (the same less the first: the compiles freezing caused, at most the freeze
events), ``compile/shape_recompiles`` (compiles inside a region for a new input shape, e.g. a smaller last
batch, at most one per region once dynamo makes the batch dimension dynamic), ``compile/fallbacks``,
``compile/graph_breaks``, ``compile/regions`` and ``time/compile_s`` (this epoch's compile seconds).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import metrics as M
from ..errors import ConfigError
from ..trainer.hooks import Hook

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# graphs one region may hold: its frozen set's graph and a recompile for a dynamic batch dimension (a last
# batch of another size); more means something other than freezing and shapes is failing the guards
REGION_RECOMPILE_LIMIT = 4
# torch.compile(recompile_limit=, isolate_recompiles=) arrived in torch 2.14; before, all regions share one
# cache per code object, and the global recompile_limit is sized for the run's frozen sets instead
_ISOLATES = {"recompile_limit", "isolate_recompiles"} <= set(inspect.signature(torch.compile).parameters)


def _counters() -> Any:
    from torch._dynamo.utils import counters

    return counters


def _failed_frames() -> int:
    """Frames dynamo tried to convert and left to run eagerly (process-wide count)."""
    frames = _counters()["frames"]
    return int(frames["total"] - frames["ok"])


def _graph_breaks() -> int:
    return int(sum(_counters()["graph_break"].values()))


def _last_unimplemented() -> str:
    reasons = list(_counters()["unimplemented"])
    return reasons[-1].strip().splitlines()[0] if reasons else "unknown reason"


class _CompileClock:
    """Compile seconds and dynamo frame compiles from ``torch._dynamo.callback`` (registered once per instance,
    removed by :meth:`close`). Dynamo runs the callbacks around the outermost compile only, so nested
    compiles are not counted twice."""

    def __init__(self) -> None:
        from torch._dynamo.callback import callback_handler

        try:
            from torch._dynamo.callback import CallbackTrigger

            self._dynamo: Any = CallbackTrigger.DYNAMO
        except ImportError:  # older torch: callbacks without a trigger; every start is a frame compile
            self._dynamo = None
        self._handler = callback_handler
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.frame_compiles = 0
        self._t0: float | None = None
        me = weakref.ref(self)  # the global handler must not keep a finished trainer's clock alive

        def start(*args: Any) -> None:
            clock = me()
            if clock is not None:
                clock._start(args[0] if args else None)

        def end(*args: Any) -> None:
            clock = me()
            if clock is not None:
                clock._end()

        self._cbs = (start, end)
        callback_handler.register_start_callback(start)
        callback_handler.register_end_callback(end)

    def _start(self, args: Any) -> None:
        with self._lock:
            self._t0 = time.perf_counter()
            if self._dynamo is None or getattr(args, "callback_trigger", self._dynamo) == self._dynamo:
                self.frame_compiles += 1

    def _end(self) -> None:
        with self._lock:
            if self._t0 is not None:
                self.seconds += time.perf_counter() - self._t0
                self._t0 = None

    def close(self) -> None:
        start, end = self._cbs
        for remove, cb in ((self._handler.remove_start_callback, start), (self._handler.remove_end_callback, end)):
            try:
                remove(cb)
            except ValueError:  # already removed
                pass


class CompiledTraining:
    """The training forward under ``torch.compile``, one compile region per frozen set.

    ``compiled(module)`` returns the callable to run ``module`` with for the frozen set now in force (the
    trainer's freezer is read, never written); the trainer calls it for every training forward. Cheap on
    the hot path: the frozen set is recomputed only when the freezer has recorded a new event.
    """

    def __init__(self, frozen_source: Any, *, backend: str = "inductor", mode: str = "default",
                 fullgraph: bool = False, keep_regions: bool = False):
        self._freezer = frozen_source  # anything with .frozen (a set of unit indices) and .events (a list)
        self.backend = backend
        self.mode = None if mode == "default" or backend != "inductor" else mode
        self.fullgraph = fullgraph
        self.keep_regions = keep_regions  # a policy that unfreezes may return to a frozen set: keep its graphs
        self._clock = _CompileClock()
        self._regions: dict[tuple[int, frozenset[int]], Callable[..., Any]] = {}
        self._modules: dict[int, nn.Module] = {}  # keeps the modules a region key names alive (stable ids)
        self._events_seen: tuple[int, int] = (-1, -1)
        self._frozen: frozenset[int] = frozenset()
        self._last: tuple[nn.Module | None, frozenset[int] | None, Callable[..., Any] | None] = (None, None, None)
        self.compiles = 0  # frozen sets whose training forward was compiled (a region's first compile)
        self.shape_recompiles = 0  # compiles inside a region: new input shapes (e.g. a smaller last batch)
        self.regions_built = 0
        self.fallbacks = 0
        self._breaks0 = _graph_breaks()
        self._seconds_taken = 0.0
        self.epoch_compile_s = 0.0  # what the last take_compile_seconds() returned (the epoch's compile time)

    # --- the hot path -------------------------------------------------------------------------------------
    def __call__(self, module: nn.Module) -> Callable[..., Any]:
        """What to call instead of ``module`` for the current frozen set."""
        frozen = self._current_frozen()
        last_mod, last_frozen, last_fn = self._last
        if last_mod is module and last_frozen is frozen and last_fn is not None:
            return last_fn
        fn = self._region(module, frozen)
        self._last = (module, frozen, fn)
        return fn

    def _current_frozen(self) -> frozenset[int]:
        events = self._freezer.events
        seen = (id(events), len(events))
        if seen != self._events_seen:  # a freeze / unfreeze event (or a resumed freezer): read the set again
            self._events_seen = seen
            frozen = frozenset(self._freezer.frozen)
            if frozen != self._frozen:
                self._frozen = frozen
        return self._frozen

    def _region(self, module: nn.Module, frozen: frozenset[int]) -> Callable[..., Any]:
        key = (id(module), frozen)
        fn = self._regions.get(key)
        if fn is not None:
            return fn
        if not self.keep_regions:  # monotone freezing never returns to an old set: free its graphs
            self._regions = {k: v for k, v in self._regions.items() if k[1] == frozen}
            self._modules = {i: m for i, m in self._modules.items() if any(k[0] == i for k in self._regions)}
        self._size_global_cache()
        isolate = {"recompile_limit": REGION_RECOMPILE_LIMIT, "isolate_recompiles": True} if _ISOLATES else {}
        compiled = torch.compile(module, backend=self.backend, mode=self.mode, fullgraph=self.fullgraph,
                                 **isolate)
        fn = self._counted(compiled)
        self._regions[key] = fn
        self._modules[id(module)] = module
        self.regions_built += 1
        return fn

    def _size_global_cache(self) -> None:
        """Raise dynamo's process-wide cap on compiled entries so this run's regions never reach it."""
        import torch._dynamo.config as dcfg

        need = (self.regions_built + 2) * REGION_RECOMPILE_LIMIT + 64
        if dcfg.accumulated_recompile_limit < need:
            dcfg.accumulated_recompile_limit = need
        if not _ISOLATES:  # one shared cache per code object: room for every region's graphs
            name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
            shared = (self.regions_built + 1) * REGION_RECOMPILE_LIMIT
            if getattr(dcfg, name) < shared:
                setattr(dcfg, name, shared)

    def _counted(self, compiled: Callable[..., Any]) -> Callable[..., Any]:
        clock = self._clock

        first = [True]  # this region has not compiled yet

        def run(*args: Any) -> Any:
            before = clock.frame_compiles
            failed = _failed_frames()
            out = compiled(*args)
            if clock.frame_compiles != before:
                if first[0]:
                    self.compiles += 1
                else:
                    self.shape_recompiles += 1
                first[0] = False
            if _failed_frames() != failed:
                self._fell_back()
            return out

        return run

    def _fell_back(self) -> None:
        self.fallbacks += 1
        log.warning("trainer.compile: dynamo could not compile part of the training forward and runs it eagerly "
                    "(%s); counted in compile/fallbacks (TORCH_LOGS=recompiles,graph_breaks shows why)",
                    _last_unimplemented())

    # --- accounting -----------------------------------------------------------------------------------------
    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling since this object was made."""
        return self._clock.seconds

    def take_compile_seconds(self) -> float:
        """Compile seconds since the last call (the trainer takes them out of the epoch's training time)."""
        total = self._clock.seconds
        new, self._seconds_taken = total - self._seconds_taken, total
        self.epoch_compile_s = new
        return new

    @property
    def recompiles(self) -> int:
        """Compiles caused by a change of the frozen set (every region's first compile but the first)."""
        return max(0, self.compiles - 1)

    def metrics(self, compile_s: float) -> dict[str, float]:
        return {M.COMPILE_COMPILES: float(self.compiles), M.COMPILE_RECOMPILES: float(self.recompiles),
                M.COMPILE_SHAPE_RECOMPILES: float(self.shape_recompiles),
                M.COMPILE_FALLBACKS: float(self.fallbacks),
                M.COMPILE_GRAPH_BREAKS: float(_graph_breaks() - self._breaks0),
                M.COMPILE_REGIONS: float(self.regions_built), M.TIME_COMPILE_S: compile_s,
                M.TIME_COMPILE_TOTAL_S: self.compile_seconds}

    def close(self) -> None:
        self._clock.close()
        self._regions.clear()
        self._modules.clear()
        self._last = (None, None, None)


class CompileHook(Hook):
    """The trainer's hook for ``trainer.compile``: the compile metrics of every epoch, and the compile
    callbacks removed when the fit ends. (The loop itself calls :class:`CompiledTraining` for the training
    forward and takes the epoch's compile seconds out of ``time/train_s``.)"""

    name = "compile"

    def __init__(self, compiled: CompiledTraining):
        self.compiled = compiled

    def epoch_metrics(self) -> dict[str, float]:
        return self.compiled.metrics(self.compiled.epoch_compile_s)

    def on_fit_end(self, trainer: Any, result: Any, error: BaseException | None) -> None:
        self.compiled.close()


def check_backend(backend: str, mode: str) -> None:
    """One-line :class:`ConfigError` for an unknown backend or mode."""
    from torch._dynamo import list_backends

    known = sorted(set(list_backends(exclude_tags=())) | {"inductor", "eager", "aot_eager"})
    if backend not in known:
        raise ConfigError(f"trainer.compile_backend={backend!r} is not a torch.compile backend; known: "
                          f"{', '.join(known)}")
    if mode not in MODES:
        raise ConfigError(f"trainer.compile_mode={mode!r} is not one of {', '.join(MODES)}")


def attach(trainer: Any) -> CompiledTraining | None:
    """The trainer's :class:`CompiledTraining` when ``trainer.compile`` is on (None when off); wires the
    frozen-prefix cache's suffix through it. Refuses DDP with one line."""
    tc = trainer.cfg.trainer
    if not tc.get("compile", False):
        return None
    if trainer.world_size > 1:
        raise ConfigError("trainer.compile is not supported under DDP (several processes) yet: DDP is re-wrapped "
                          "at every freeze event; set trainer.compile=false")
    check_backend(tc.compile_backend, tc.compile_mode)
    compiled = CompiledTraining(trainer.freezer, backend=tc.compile_backend, mode=tc.compile_mode,
                                keep_regions=type(trainer.policy).allows_unfreeze)
    if trainer.cache is not None:
        trainer.cache.wrap = compiled
    return compiled
