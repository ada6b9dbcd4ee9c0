"""The shared trainer: one training loop for every policy, CPU and CUDA.

    from freezebench.config import load_config
    from freezebench.trainer import Trainer
    result = Trainer(load_config(["policy=static", "trainer.epochs=3"])).fit()

The loop, by level (each a method of :class:`Trainer`):

* :meth:`~Trainer.fit`: every hook's ``on_fit_start``, the epochs left, the final checkpoint, every hook's
  ``on_fit_end`` (:mod:`freezebench.trainer.hooks`);
* :meth:`~Trainer.train_epoch`: :meth:`~Trainer.train_step` per batch; a stop request (SIGTERM, a hook)
  writes a checkpoint at the step boundary and stops;
* :meth:`~Trainer.train_step`: forward -> loss -> backward -> optimiser step -> the step hooks (sparsity,
  sieve, the policy tick: ``policy.observe`` / ``policy.decide`` when due, the freezer applying the
  decision, ...);
* :meth:`~Trainer.end_epoch`: the epoch's sums over ranks, evaluation, accounting (FLOPs under
  :mod:`freezebench.cost`, wall time split into train / eval / policy, peak memory, frozen units), the
  epoch's metrics (every hook's included), every hook's ``on_epoch_end`` (tracking logs them), a periodic
  checkpoint.

The counters live in :class:`~freezebench.trainer.state.TrainState` and
:class:`~freezebench.trainer.state.EpochSums`; :meth:`~Trainer.state_dict` / :meth:`~Trainer.load_state_dict`
hold everything a resume needs (the file: :mod:`freezebench.trainer.checkpoint`). Single process and DDP
differ only in the :mod:`freezebench.trainer.distributed` parallelism object the trainer holds.
"""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import __version__, faults
from .. import metrics as M
from ..config import flatten
from ..cost import CostModel
from ..errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from ..features import compile as compiling
from ..features.cache import PrefixCache
from ..features.sieve import sieve_data
from ..features.sparsity import build_sparsity
from ..fileio import atomic_torch_save, check_writable_folder
from ..messages import epoch_line, position_text
from ..progress import phase
from ..policy import Decision, FreezePolicy, Plan, Signal, Signals
from ..registry import POLICIES
from ..units import Partition, capture_outputs
from ..zoo.data import DataBundle, build_data
from . import checkpoint as ckpt
from . import distributed
from . import reliability
from .batches import adapter_for
from .freezer import FreezeEvent, Freezer, param_groups
from .hooks import CacheHook, Hook, PolicyHook, SieveHook, SparsityHook, StopSignalHook, TrackingHook, overrides
from .identity import adopt_model
from .state import EpochSums, TrainState
from .tracking import NullTracker, check_reachable, make_tracker, resolve_uri

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a fit produced (also logged to MLflow as ``summary.json``)."""

    run_id: str | None
    metrics: dict[str, float]  # final values: val/acc, val/loss, time/total_s, cost/tflops, ...
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    events: list[FreezeEvent] = field(default_factory=list)
    unit_names: list[str] = field(default_factory=list)
    checkpoint: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return dev


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def peak_memory_mb(device: torch.device) -> float:
    """CUDA allocator peak on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def lr_factor(cfg: Any, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Global learning-rate multiplier for optimiser step ``step`` (0-based) under ``cfg`` (schedule.*)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if not warm and cfg.warmup_fraction:  # schedule.warmup_fraction: used when warmup_epochs is 0
        warm = int(round(cfg.warmup_fraction * total_steps))
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.name == "linear":  # linear decay (Devlin et al. 2019's recipe; transformers' linear schedule)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * max(0.0, 1 - progress)
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    for g in groups:
        g["base_lr"] = cfg.lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class Trainer:
    """Builds model, data, policy and tracking from a config and trains.

    ``model``, ``data`` and ``policy`` may be passed in to override what the config would build (tests,
    benchmarks, library use); ``hooks`` are extra :class:`~freezebench.trainer.hooks.Hook` s, run after the
    built-in ones, in their order.

    Assembly, in the order its dependencies fix (each step needs those above it):

    1. parallelism and device (DDP joins its process group; the tracking server is checked before anything
       is built), then the seeds (data and model initialisation draw from them);
    2. data: the loaders, sieved (``data.sieve.*``) and sharded per rank;
    3. the model (its classes and input size come from the data), the policy (its granularity decides the
       partition), the partition into units and their FLOPs;
    4. the optimiser (one param group per unit) and the freezer (the only thing that freezes);
    5. the plan (steps per epoch come from the data), sparsity (needs optimiser and plan; changes the cost
       model), the policy's ``setup`` (units and plan), the frozen-prefix cache (needs the cost model);
    6. the hooks (every feature above exists);
    7. a resume (``resume=...``), applied to the fully built trainer (:meth:`load_state_dict`);
    8. the tracker, last: a resumed run continues its MLflow run.
    """

    def __init__(self, cfg: DictConfig, *, model: torch.nn.Module | None = None, data: DataBundle | None = None,
                 policy: FreezePolicy | None = None, hooks: Sequence[Hook] = (), tracking_process: Any = None):
        self.cfg = cfg
        self._setup_parallel()
        self._setup_data(data)
        self._setup_model(model, policy)
        self._setup_optimizer()
        self._setup_plan_and_features()
        self.hooks: list[Hook] = self._build_hooks(hooks)
        # the step hooks, as bound methods, built once: the step loop iterates over a plain list
        self._step_hooks = [h.after_step for h in self.hooks if overrides(h, "after_step")]
        self._epoch_hooks = [h for h in self.hooks if overrides(h, "on_epoch_end")]
        self.resumed_from: dict[str, Any] | None = self._resume()  # may set tracking.run_id
        # resumed from a finished checkpoint whose end was never logged: fit() only closes the run
        self._closing = self.resumed_from is not None and self.resumed_from["finished"]
        # tracking_process: MLflow warmed up in a second process (freezebench.trainer.tracking.TrackingProcess)
        self.tracker: NullTracker = make_tracker(cfg.tracking, tracking_process) if self.rank == 0 else NullTracker()

    # --- assembly ------------------------------------------------------------------------------------
    def _setup_parallel(self) -> None:
        cfg, tc = self.cfg, self.cfg.trainer
        self.parallel = distributed.parallel_from_env()  # SingleProcess, or DataParallel under torchrun
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        if tc.save_checkpoint or tc.checkpoint_every:  # found before training, not after it (issue 14)
            check_writable_folder(tc.output_dir, "trainer.output_dir")
        if cfg.tracking.enabled and self.rank == 0:  # an unreachable server fails before data and model are built
            check_reachable(resolve_uri(cfg.tracking.uri))
        self.device = self.parallel.setup(resolve_device(tc.device))
        if tc.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("trainer.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
        seed_everything(tc.seed, tc.deterministic)

    def _setup_data(self, data: DataBundle | None) -> None:
        cfg, tc = self.cfg, self.cfg.trainer
        self.data = data if data is not None else build_data(cfg.data, seed=tc.seed, device=self.device)
        # image tensors or text dicts: the one object that knows (freezebench.trainer.batches)
        self.batch = adapter_for(self.data.info)
        self.batch.check(cfg, self.world_size)
        # the data order, a sampler chain (freezebench.zoo.sampling): the epoch's shuffle, or the sieve's
        # partial set (data.sieve.*), then under DDP this rank's shard of it
        self.data, self.sieve = sieve_data(cfg.data.sieve, self.data, seed=tc.seed, device=self.device)
        self.data = self.parallel.shard(self.data)

    def _setup_model(self, model: torch.nn.Module | None, policy: FreezePolicy | None) -> None:
        cfg, tc, info = self.cfg, self.cfg.trainer, self.data.info
        if model is None:
            model = self.batch.build_model(cfg)  # a zoo model (image) or a text model (freezebench.zoo.text)
            self.custom_model = False
        else:  # a model passed in: named after itself, its checkpoint applied (freezebench.trainer.identity)
            cfg = self.cfg = adopt_model(cfg, model)
            self.custom_model = True
        self.model = model.to(self.device)
        self._channels_last = bool(tc.channels_last and self.device.type == "cuda")
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.batch.channels_last = self._channels_last
        self.train_model: torch.nn.Module = self.model  # what the training step calls (DDP wraps the model)
        if policy is None:
            policy = POLICIES.get(cfg.policy.name)(OmegaConf.to_object(cfg.policy))
        self.policy = policy
        self.needs = frozenset(type(policy).needs)
        gran = cfg.model.granularity if cfg.model.granularity != "auto" else type(policy).granularity
        probe_x, _ = self.data.probe_batch(2, seed=tc.seed)
        self.partition: Partition = self.batch.partition(self.model, probe_x, gran)
        self.units = self.partition.units
        self.cost = CostModel([u.flops for u in self.units], self.partition.other_flops)
        self.dense_full_step_flops = self.cost.full_step_flops  # what `full` training spends per sample

    def _setup_optimizer(self) -> None:
        tc = self.cfg.trainer
        self.optimizer = build_optimizer(self.cfg.optim, param_groups(self.units, self.partition.other_params))
        self.freezer = Freezer(self.model, self.units, self.optimizer,
                               allow_unfreeze=type(self.policy).allows_unfreeze)
        self.lr_override: dict[int, float] = {}
        self._schedule = OmegaConf.to_object(self.cfg.schedule)  # plain dataclass: read every step, cheaply
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
        self.scaler = torch.amp.GradScaler("cuda") if tc.precision == "fp16" else None

    def _setup_plan_and_features(self) -> None:
        cfg, tc = self.cfg, self.cfg.trainer
        steps = len(self.data.train)
        if tc.max_steps_per_epoch:
            steps = min(steps, tc.max_steps_per_epoch)
        drops = ()
        if cfg.schedule.name == "step":
            drops = tuple(sorted({math.ceil(m * steps) for m in cfg.schedule.milestones if 0 < m * steps}))
        self.plan = Plan(epochs=tc.epochs, steps_per_epoch=steps, batch_size=cfg.data.batch_size,
                         base_lr=cfg.optim.lr, seed=tc.seed, device=str(self.device), lr_drops=drops,
                         modality=self.batch.modality)
        # sparse training (sparsity.*): masks on conv / linear weights; the cost model counts their density
        self.sparsity = build_sparsity(cfg.sparsity, self.model, self.units, self.optimizer, self.plan.total_steps,
                                       tc.seed)
        if self.sparsity is not None:
            self.cost = self.batch.sparse_cost(self.sparsity, self.partition)  # text: at each padded length
        self.policy.setup(self.units, self.plan)
        self.cache: PrefixCache | None = self._build_cache()
        self.compiler = compiling.attach(self)  # trainer.compile: one graph per frozen set (None when off)
        # the loop's state, and config values read every step, copied once (an OmegaConf read costs ~10 us)
        self.state = TrainState()
        self._check_every = tc.check_finite_every
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stop_signal: int | None = None  # set by SIGTERM/SIGINT: checkpoint at the next step boundary, stop
        self._pending_rng: dict[str, Any] | None = None  # random states to restore when the resumed loop starts
        self._pending_sums: EpochSums | None = None  # the partial sums of the epoch a resumed run continues
        self._t_start = time.perf_counter()
        self.step_cost = self.cost.step_flops(self.freezer.frozen)  # changes only when the frozen set does

    def _build_cache(self) -> PrefixCache | None:
        """The frozen-prefix cache when ``trainer.cache_frozen_prefix`` (refused under random augmentation)."""
        tc = self.cfg.trainer
        if not tc.cache_frozen_prefix:
            return None
        if self.world_size > 1:
            raise ConfigError("trainer.cache_frozen_prefix is not supported under DDP (several processes) yet; "
                              "set trainer.cache_frozen_prefix=false")
        if self.data.info.random_augmentation:
            raise ConfigError(
                f"trainer.cache_frozen_prefix needs the same training input every epoch, but {self.data.info.name} "
                f"uses random augmentation; set data.augment=false or trainer.cache_frozen_prefix=false"
            )
        return PrefixCache(self.model, self.units, self.data.train.num_samples, dtype=tc.cache_dtype,
                           location=tc.cache_location, folder=tc.cache_dir, device=self.device, cost=self.cost,
                           channels_last=self._channels_last)

    def _build_hooks(self, extra: Sequence[Hook]) -> list[Hook]:
        """The built-in hooks (see :mod:`freezebench.trainer.hooks` for their order), then ``extra``."""
        from ..features.grad_norm import GradNormHook

        hooks: list[Hook | None] = [
            TrackingHook(),
            StopSignalHook(),
            SparsityHook(self.sparsity) if self.sparsity is not None else None,
            SieveHook(self.sieve) if self.sieve is not None else None,
            PolicyHook(self.policy),
            CacheHook(self.cache) if self.cache is not None else None,
            compiling.CompileHook(self.compiler) if self.compiler is not None else None,
            GradNormHook.from_trainer(self),
            *extra,
        ]
        out = [h for h in hooks if h is not None]
        names = [h.name for h in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"two trainer hooks are named {dup[0]!r}; give each hook its own name")
        return out

    # --- names ---------------------------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        c = self.cfg
        return c.tracking.run_name or f"{c.policy.name}-{c.model.name}-{c.data.name}-s{c.trainer.seed}"

    # --- the state's counters as attributes ----------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.state.step

    @property
    def policy_time(self) -> float:
        """Seconds spent in the policy so far."""
        return self.state.policy_time

    @property
    def current_lr_factor(self) -> float:
        return self.state.lr_factor

    # --- helpers -------------------------------------------------------------------------------------
    def autocast(self) -> Any:
        """The autocast context of ``trainer.precision`` (a no-op context under fp32)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _set_lr(self, step: int) -> None:
        factor = lr_factor(self._schedule, step, self.plan.steps_per_epoch, self.plan.total_steps)
        self.state.lr_factor = factor
        for g in self.optimizer.param_groups:
            scale = self.lr_override.get(g.get("unit", -1))
            g["lr"] = g["base_lr"] * (factor if scale is None else scale)

    def train_batches(self) -> Any:
        """The training loader of the current epoch (read ahead by the cache when it gathers from host memory
        or disk)."""
        if self.cache is None:
            return self.data.train
        return self.cache.batches(self.data.train)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The model's training forward pass; through the frozen-prefix cache when there is one, which also
        sets ``step_cost`` to this step's FLOPs per sample (skipped prefix forwards are not counted)."""
        if self.cache is None:
            return self.batch.forward(self.train_model if self.compiler is None else self.compiler(self.train_model), x)
        out = self.cache.forward(x, idx, self.freezer.frozen)
        self.step_cost = self.cache.last_flops_per_sample
        return out

    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._probe is None:
            self._probe = self.data.probe_batch(self.cfg.trainer.probe_batch_size, seed=self.cfg.trainer.seed)
        return self._probe

    def unit_activations(self, units: list[int], x: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Outputs of ``units`` on the probe batch (or ``x``), eval mode, no grad, flattened per input."""
        out = capture_outputs(self.model, self.units, units, self.probe()[0] if x is None else x, self.autocast())
        self.freezer.train_mode()
        return out

    # --- the policy ----------------------------------------------------------------------------------
    def _signals(self, step: int, losses: torch.Tensor, idx: torch.Tensor) -> Signals:
        s = Signals(step=step, epoch=self.plan.epoch_of(step), units=self.units)
        if Signal.ACTIVATIONS in self.needs:
            s.probe_inputs = self.probe()[0]
            s.activations = self.unit_activations(self.policy.probe_units())
        if Signal.SAMPLE_LOSSES in self.needs:  # the global batch: every rank's policy sees the same signal
            s.sample_losses, s.sample_indices = (self.parallel.gather_cat(t) for t in (losses.detach(), idx))
        if Signal.MODEL in self.needs:
            s.model = self.model
        return s

    def _decide(self, step: int) -> Decision | None:
        """The policy's decision; under DDP rank 0's, broadcast, so every rank freezes the same units."""
        return self.parallel.broadcast(self.policy.decide(step))

    def apply(self, decision: Decision | None, step: int) -> list[FreezeEvent]:
        """Apply a policy decision through the freezer (the only place that freezes)."""
        if not decision:
            return []
        epoch = self.plan.epoch_of(step)
        events = self.freezer.freeze(decision.freeze, step, epoch, decision.reason)
        if decision.unfreeze:
            events += self.freezer.unfreeze(decision.unfreeze, step, epoch, decision.reason)
        for unit, scale in decision.lr_scale.items():
            if scale is None:
                self.lr_override.pop(unit, None)
            else:
                self.lr_override[unit] = float(scale)
        if events:
            self.policy.notify_frozen(frozenset(self.freezer.frozen))
            self._wrap()  # DDP's reducer must only know the parameters still trained
            self.step_cost = self.cost.step_flops(self.freezer.frozen)
            for ev in events:
                log.info("%s unit %d (%s) at step %d (epoch %.2f) %s", ev.action, ev.unit, ev.name, ev.step,
                         ev.epoch, ev.reason)
        if decision.lr_scale:
            self._set_lr(step)
        return events

    def _wrap(self) -> None:
        self.train_model = self.parallel.wrap(self.model, self.device, self.train_model)

    def initial_decision(self) -> None:
        """A decision before the first step (static freezing at step 0, schedules that start frozen)."""
        if self.resumed_from is None and self.policy.decide_at(0):
            t0 = time.perf_counter()
            self.apply(self._decide(0), 0)
            self.state.policy_time += time.perf_counter() - t0

    def policy_tick(self, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        """After optimiser step ``step``: the policy observes and decides when it asked to (timed as policy)."""
        obs = self.policy.observe_at(step)
        dec = self.policy.decide_at(step)
        if not (obs or dec):
            return
        # On CUDA a tick that only queues device work (e.g. AutoFreeze adding gradients every step) is timed
        # on the host without synchronising, so the GPU keeps running ahead; ticks that decide, or that run
        # the probe forward, synchronise so that their device time is counted as policy time.
        sync = dec or (Signal.ACTIVATIONS in self.needs)
        if sync:
            self._sync()
        t0 = time.perf_counter()
        if obs:
            self.policy.observe(step, self._signals(step, losses, idx))
        if dec:
            self.apply(self._decide(step), step)
        if sync:
            self._sync()
        self.state.policy_time += time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss and accuracy (every rank evaluates its shard; the sums are added over ranks)."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        confusion = None  # text: counts per (label, prediction), for F1 / Matthews correlation
        n = 0
        for x, y, _ in self.data.val:
            x = self.batch.prepare(x)
            with self.autocast():
                out = self.batch.forward(self.model, x)
            loss_sum += self.batch.losses(out, y, reduction="sum")
            pred = out.argmax(1)
            correct += (pred == y).sum()
            counts = self.batch.confusion(pred, y)
            if counts is not None:
                confusion = counts if confusion is None else confusion + counts
            n += len(y)
        self.freezer.train_mode()
        extra = [] if confusion is None else confusion.tolist()
        loss_total, correct_total, n, *extra = self.parallel.sum([loss_sum.item(), correct.item(), n, *extra],
                                                                 self.device)
        self.state.val_metrics = self.batch.val_metrics(extra or None)
        return loss_total / max(n, 1), correct_total / max(n, 1)

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train: every hook's ``on_fit_start``, the epochs left, the final checkpoint, every hook's
        ``on_fit_end`` (in reverse order, also when something raised: the tracking hook then marks the run
        FAILED or KILLED)."""
        # denormal floats make CPU kernels up to 100x slower once gradients get tiny late in training;
        # flushing them is process-wide state, so it is switched back off when the fit ends
        torch.set_flush_denormal(True)
        started: list[Hook] = []
        result: RunResult | None = None
        error: BaseException | None = None
        try:
            self._t_start = time.perf_counter() - self.state.elapsed_before
            for h in self.hooks:
                started.append(h)
                h.on_fit_start(self)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.train_model is self.model:
                self._wrap()
            self.step_cost = self.cost.step_flops(self.freezer.frozen)
            if self.resumed_from is None and self.cfg.trainer.checkpoint_every:
                # the state before the first step: a kill before the first epoch's checkpoint resumes this run
                # (its MLflow run too) instead of leaving it RUNNING and starting another (reliability.py)
                self.save_state()
            phase("train-start")  # FREEZEBENCH_PHASES=1: timestamps for benchmarks/bench_startup.py
            for epoch in range(self.state.epoch, self.plan.epochs):
                self.end_epoch(epoch, self.train_epoch(epoch))
            phase("train-end")
            result = self._result()  # closing a finished checkpoint: no epoch left, only the end is redone
            if self.cfg.trainer.checkpoint_every and not self._closing:
                self.save_state(finished=True)  # the tracking hook then logs the last epoch
                if faults.ARMED:  # test-only SIGKILL (freezebench.faults)
                    faults.at("after_epoch_log", self.plan.epochs)
        except BaseException as e:
            error = e
            raise
        finally:
            torch.set_flush_denormal(False)
            self._end_hooks(started, result, error)
        if self.cfg.trainer.checkpoint_every and self.rank == 0:  # the end is logged and the run closed:
            reliability.mark_closed(self.run_dir, self.tracker.run_id)  # resume=auto leaves this run alone
        return result

    def _end_hooks(self, started: list[Hook], result: RunResult | None, error: BaseException | None) -> None:
        """``on_fit_end`` of every started hook, last first. All run; when the fit itself succeeded, the first
        hook error is raised after them (the hooks after it see it as the fit's error)."""
        original, first = error, None
        for h in reversed(started):
            try:
                h.on_fit_end(self, result, error)
            except BaseException as e:
                if first is None:
                    first = e
                if error is None:  # e.g. the tracking hook then marks the run FAILED
                    error, result = e, None
        if original is None and first is not None:
            raise first

    def train_epoch(self, epoch: int) -> EpochSums:
        """The training steps of epoch ``epoch`` (a resumed run continues its stopped epoch), with its sums."""
        from tqdm.auto import tqdm

        plan, state = self.plan, self.state
        self.freezer.train_mode()
        self.data.train.set_epoch(epoch)
        state.epoch = epoch
        sums, self._pending_sums = self._pending_sums, None
        if sums is None:
            sums = EpochSums.start(self.device, state.policy_time)
            state.batch = 0
        show = self.cfg.trainer.progress and self.rank == 0
        bar = tqdm(total=plan.steps_per_epoch, desc=f"epoch {epoch + 1}/{plan.epochs}", leave=False,
                   disable=not show, file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.2 if sys.stderr.isatty() else 15.0)  # logs get few lines
        self._sync()
        t0 = time.perf_counter()
        for b, (x, y, idx) in self._epoch_batches(state.batch):
            if b >= plan.steps_per_epoch:
                break
            loss = self.train_step(x, y, idx, sums)
            state.batch = b + 1
            if state.step % self._check_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", frozen=len(self.freezer.frozen), refresh=False)
            bar.update(1)
            if self._should_stop():
                self._interrupt(sums.to_checkpoint(state.policy_time, sums.loop_before + time.perf_counter() - t0))
        self._sync()
        sums.loop_s = time.perf_counter() - t0 + sums.loop_before
        bar.close()
        return sums

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, sums: EpochSums) -> torch.Tensor:
        """One optimiser step on the batch ``(x, y, idx)``, added to ``sums``, then the step hooks; the loss."""
        state = self.state
        x = self.batch.prepare(x)  # the batch adapter (freezebench.trainer.batches): image tensors or text dicts
        self._set_lr(state.step)
        with self.autocast():
            out = self.forward(x, idx)
        losses = self.batch.losses(out, y)
        loss = losses.mean()
        if faults.ARMED and state.batch == self.plan.steps_per_epoch // 2:  # test-only SIGKILL (faults.py)
            faults.at("mid_step", state.epoch + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        state.step += 1
        n = len(y)
        sums.samples += n
        sums.loss_sum += losses.detach().sum()
        sums.correct += (out.detach().argmax(1) == y).sum()
        self.batch.account(self, x, n, sums)  # the step's FLOPs (text: at the batch's padded length)
        if state.step % self._check_every == 0:  # a host sync: only every check_finite_every steps
            self._check_finite(loss)
        for after_step in self._step_hooks:  # sparsity, sieve, the policy tick, ... (freezebench.trainer.hooks)
            after_step(self, state.step, losses, idx)
        return loss

    def end_epoch(self, epoch: int, sums: EpochSums) -> dict[str, float]:
        """The end of epoch ``epoch``: sums over ranks, evaluation when due, accounting, the epoch's metrics
        (returned, and given to every hook's ``on_epoch_end``), a checkpoint every ``checkpoint_every``."""
        state, plan, tc = self.state, self.plan, self.cfg.trainer
        self.parallel.reduce_epoch(sums, self.model)  # the sums over ranks; rank 0's BatchNorm statistics
        samples = sums.samples
        train_loss = sums.loss_sum.item() / max(samples, 1)
        self._check_finite(torch.tensor(train_loss))
        policy_s = state.policy_time - sums.policy_before
        compile_s = self.compiler.take_compile_seconds() if self.compiler is not None else 0.0
        last = epoch == plan.epochs - 1
        t1 = time.perf_counter()
        if last or (tc.eval_every and (epoch + 1) % tc.eval_every == 0):
            state.val_loss, state.val_acc = self.evaluate()
        eval_s = time.perf_counter() - t1
        state.tflops += sums.flops / 1e12
        state.tflops_full += self.batch.epoch_full_flops(self, sums) / 1e12
        m = {
            M.TRAIN_LOSS: train_loss,
            M.TRAIN_ACC: sums.correct.item() / max(samples, 1),
            M.VAL_LOSS: state.val_loss,
            M.VAL_ACC: state.val_acc,
            M.TIME_EPOCH_S: sums.loop_s + eval_s,
            M.TIME_TRAIN_S: sums.loop_s - policy_s - compile_s,
            M.TIME_EVAL_S: eval_s,
            M.TIME_POLICY_S: policy_s,
            M.COST_TFLOPS: state.tflops,
            M.COST_TFLOPS_EPOCH: sums.flops / 1e12,
            M.COST_TFLOPS_FULL: state.tflops_full,
            M.FROZEN_UNITS: float(len(self.freezer.frozen)),
            M.FROZEN_PARAM_FRAC: self.freezer.frozen_param_fraction,
            M.PEAK_MB: peak_memory_mb(self.device),
            M.LR: state.lr_factor * self.cfg.optim.lr,
            M.SAMPLES_PER_EPOCH: float(samples),
            **state.val_metrics,  # text: val/f1, val/mcc, val/score (freezebench.zoo.text_data.task_metrics)
        }
        for h in self.hooks:
            m.update(h.epoch_metrics())
        m = {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}
        state.history.append(m)
        state.epoch, state.batch = epoch + 1, 0
        for h in self._epoch_hooks:  # tracking logs m
            h.on_epoch_end(self, epoch, m)
        if tc.progress and self.rank == 0:
            from tqdm.auto import tqdm

            tqdm.write(epoch_line(epoch + 1, plan.epochs, train_loss, state.val_acc, len(self.freezer.frozen),
                                  len(self.units) - 1, m[M.TIME_EPOCH_S], policy_s,
                                  time.perf_counter() - self._t_start), file=sys.stderr)
        if tc.checkpoint_every and (epoch + 1) % tc.checkpoint_every == 0 and not last:
            self.save_state()
        if faults.ARMED and not last:  # test-only SIGKILL (freezebench.faults)
            faults.at("after_epoch_log", epoch + 1)
        return m

    def _result(self) -> RunResult:
        state = self.state
        final = dict(state.history[-1]) if state.history else {}
        final.update({
            M.TIME_TOTAL_S: time.perf_counter() - self._t_start,
            M.TIME_POLICY_TOTAL_S: state.policy_time,
            M.COST_SAVING_FRAC: 1 - state.tflops / state.tflops_full if state.tflops_full else 0.0,
            M.FREEZE_EVENTS: float(len(self.freezer.events)),
        })
        return RunResult(run_id=self.tracker.run_id, metrics=final, history=[dict(h) for h in state.history],
                         events=list(self.freezer.events), unit_names=[u.name for u in self.units])

    def _epoch_batches(self, skip: int) -> Any:
        """``enumerate`` over this epoch's training batches from batch ``skip`` on.

        The ``skip`` batches a stopped run had consumed are drawn again (not trained on), so the randomness of
        augmentation stays in step; then the random states saved with the checkpoint are restored.
        """
        it = iter(self.train_batches())
        for _ in zip(range(skip), it):
            pass
        if self._pending_rng is not None:
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        yield from enumerate(it, start=skip)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.step} (epoch "
                f"{self.plan.epoch_of(self.step):.2f}); lower optim.lr or check the data"
            )

    # --- stopping ------------------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop at the next step boundary after writing a checkpoint (what SIGTERM and SIGINT do)."""
        self._stop_signal = int(signum)

    @property
    def stop_requested(self) -> int | None:
        """The signal number a stop was requested with (:meth:`request_stop`), else ``None``."""
        return self._stop_signal

    def _should_stop(self) -> bool:
        """Whether a stop was requested; under DDP agreed by all ranks every check_finite_every steps."""
        stop = self.parallel.agree(self._stop_signal is not None, self.step, self._check_every, self.device)
        if stop and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return stop

    def _interrupt(self, part: dict[str, Any]) -> None:
        signum = self._stop_signal or signal.SIGTERM
        state = self.state
        path = self.save_state(epoch_acc=part)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name}: stopped at step {self.step} "
            f"({position_text(state.epoch, state.batch, self.plan.epochs, self.plan.steps_per_epoch)}); checkpoint {path}; "
            f"continue with the same command line plus resume={path} (or resume=auto)", signum,
            str(path) if path else None)

    # --- the training state, checkpoint and resume (freezebench.trainer.checkpoint) -----------------------
    def state_dict(self) -> dict[str, Any]:
        """The training state between two steps (without this process's random states and partial epoch):
        weights, optimiser, gradient scaler, freezer, policy, every stateful hook (under its name),
        learning-rate overrides, position and accounting."""
        state = self.state
        return {
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "freezer": self.freezer.state_dict(),
            "policy": self.policy.state_dict(),
            "hooks": ckpt.hook_states(self.hooks),
            "lr_override": {int(k): float(v) for k, v in self.lr_override.items()},
            "lr_factor": float(state.lr_factor),
            "position": state.position(),
            "accounting": state.accounting(time.perf_counter() - self._t_start),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Put this (fully built, not yet trained) trainer into the state :meth:`state_dict` returned."""
        self.model.load_state_dict(sd["model_state"])
        self.freezer.load_state_dict(sd["freezer"])  # frozen groups emptied first: optimiser shapes match
        self.policy.notify_frozen(frozenset(self.freezer.frozen))
        self.policy.load_state_dict(sd["policy"])
        self.optimizer.load_state_dict(sd["optimizer"])
        ckpt.load_hook_states(self.hooks, sd["hooks"])  # after the optimiser: masks zero its state too
        self.freezer.reattach_optimizer()
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.lr_override = {int(k): float(v) for k, v in sd["lr_override"].items()}
        self.state.load(sd["position"], sd["accounting"], sd["lr_factor"])
        self.step_cost = self.cost.step_flops(self.freezer.frozen)

    @property
    def run_dir(self) -> Path:
        """Where last.pt goes: ``<trainer.output_dir>/<MLflow run id, or the run name when untracked>``, or the
        folder of the checkpoint this run resumed from (which is then superseded, never left unfinished)."""
        if self.resumed_from is not None:
            return Path(self.resumed_from["path"]).parent
        return Path(self.cfg.trainer.output_dir) / (self.tracker.run_id or self.run_name)

    def _resume(self) -> dict[str, Any] | None:
        """Apply the checkpoint ``resume`` names (nothing when it names none); what it was."""
        fingerprint = ckpt.config_fingerprint(flatten(self.cfg))
        path = ckpt.resolve(self.cfg.resume, self.cfg.trainer.output_dir, fingerprint) if self.rank == 0 else None
        path = self.parallel.broadcast(path)
        if path is None:
            return None
        payload = ckpt.read(path)
        ckpt.check_compatible(payload, path, fingerprint=fingerprint, unit_names=[u.name for u in self.units],
                              world_size=self.world_size)
        inexact = ckpt.check_exactness(payload, path, self.device, deterministic=self.cfg.trainer.deterministic,
                                       allow=self.cfg.trainer.allow_inexact_resume)
        if inexact and self.rank == 0:
            print(f"freezebench: warning: {inexact}", file=sys.stderr, flush=True)
        ckpt.restore(self, payload, path)
        self._pending_rng = payload["rng"][self.rank]
        part = payload["epoch_acc"][self.rank] if payload["epoch_acc"] else None
        if part:  # an epoch stopped at a step boundary: its partial sums (the batches it consumed: state.batch)
            self._pending_sums = EpochSums.from_checkpoint(part, self.device, self.state.policy_time)
        run_id = payload["mlflow"]["run_id"]
        if run_id and self.cfg.tracking.enabled and not self.cfg.tracking.run_id:  # an explicit run id wins
            self.cfg.tracking.run_id = run_id
        pos = payload["position"]
        log.warning("resuming from %s at step %d (%s)%s", path, pos["step"],
                    position_text(pos["epoch"], pos["batch"], self.plan.epochs, self.plan.steps_per_epoch),
                    f", MLflow run {run_id}" if run_id else "")
        return {"path": str(path), "run_id": run_id, "history": [dict(h) for h in payload["accounting"]["history"]],
                "finished": bool(payload.get("finished"))}

    def save_state(self, *, epoch_acc: dict[str, Any] | None = None, finished: bool = False) -> Path | None:
        """Write the training state to :attr:`run_dir`/last.pt atomically (rank 0, with every rank's random
        states and partial epoch ``epoch_acc``; see :mod:`freezebench.trainer.checkpoint`)."""
        ranks = self.parallel.gather({"rng": ckpt.rng_state(), "epoch_acc": epoch_acc})
        path: Path | None = None
        error = None
        if self.rank == 0:
            payload = ckpt.build_payload(
                self.state_dict(), self.checkpoint_payload(), self.cfg, rng=[r["rng"] for r in ranks],
                epoch_acc=None if epoch_acc is None else [r["epoch_acc"] for r in ranks],
                world_size=self.world_size, mlflow={"run_id": self.tracker.run_id, "uri": self.tracker.uri},
                finished=finished, device=self.device)
            try:
                path = ckpt.write(payload, self.run_dir / ckpt.LAST)
            except ckpt.CheckpointError as e:
                error = e
        # every rank learns how the write went (and waits for it)
        path, message = self.parallel.broadcast((path, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise ckpt.CheckpointError(message)
        if finished and faults.ARMED:  # test-only SIGKILL (freezebench.faults)
            faults.at("after_final_checkpoint", self.plan.epochs)
        for h in self.hooks:  # e.g. tracking logs the epochs this checkpoint covers (exactly once)
            h.on_checkpoint(self, self.state.epoch, finished)
        return path

    # --- the end of a run ----------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        """The final weights with the model's description (what ``final.pt`` holds; ``model.checkpoint=``)."""
        info = self.data.info
        return {
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "model_name": self.cfg.model.name,
            "custom_model": self.custom_model,  # not a zoo model: the CKA oracle copies the trained model instead
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "image_size": info.image_size,
            "dataset": info.name,
            "unit_names": [u.name for u in self.units],
            "granularity": self.partition.granularity,
            "freezebench_version": __version__,
            **self.batch.payload(),  # text: modality, vocabulary size, sequence length, task
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the final weights atomically (temporary file + rename)."""
        return atomic_torch_save(self.checkpoint_payload(), path)
