"""Trainer hooks: the one extension point of the training loop.

    from freezebench.trainer import Trainer
    from freezebench.trainer.hooks import Hook

    class StopAt(Hook):
        name = "stop_at"

        def __init__(self, step: int):
            self.step = step

        def after_step(self, trainer, step, losses, idx):
            if step == self.step:
                trainer.request_stop()          # checkpoint at this step boundary, then stop

    Trainer(cfg, hooks=[StopAt(6)]).fit()

A hook sees five events and may keep state:

* ``on_fit_start(trainer)``: once, before the first step (after a resume has been applied);
* ``after_step(trainer, step, losses, idx)``: after every optimiser step; ``step`` is the 1-based count of
  optimiser steps, ``losses`` the step's per-sample training losses (device tensor, not detached from the
  graph's values, do not call ``backward``), ``idx`` their dataset indices;
* ``on_epoch_end(trainer, epoch, metrics)``: after an epoch's evaluation and metrics (``metrics`` is the
  dict logged for that epoch, every hook's :meth:`Hook.epoch_metrics` included; read it, do not change it);
* ``on_fit_end(trainer, result, error)``: once, in reverse hook order, also when the fit raised (``result``
  is then ``None`` and ``error`` the exception, re-raised after every hook ran);
* ``on_checkpoint(trainer, epoch, finished)``: after every ``last.pt`` write (``epoch`` epochs complete,
  ``finished`` for the run's final state); the tracking hook logs an epoch's metrics only here, once a
  checkpoint covers them (exactly once across crashes, :mod:`freezebench.trainer.reliability`);
* ``epoch_metrics()``: this epoch's metrics of the hook, merged into the epoch's metric dict (logged to
  MLflow, kept in ``RunResult.history``);
* ``state_dict()`` / ``load_state_dict(state)``: a hook whose ``state_dict()`` returns a dict is stored in the
  checkpoint under its :attr:`Hook.name` (``payload["hooks"][name]``) and restored on resume, after the
  model, freezer, policy and optimiser (so a hook may adjust the restored optimiser state); ``None``: the hook
  has no state. Resume refuses a checkpoint whose stateful hooks differ from this run's.

Names must be unique within a trainer. The loop calls ``after_step`` only on hooks that override it (the
list is built once, before the first step), so a hook that only logs per epoch costs nothing per step.

Built-in hooks (assembled by :func:`freezebench.trainer.loop.Trainer`, in this order): ``tracking``
(MLflow run start, per-epoch metrics, end-of-run artifacts), ``stop_signal`` (SIGTERM/SIGINT handlers),
``sparsity`` (:mod:`freezebench.features.sparsity`), ``sieve`` (:mod:`freezebench.features.sieve`),
``policy`` (the policy's observe/decide tick and its epoch metrics), ``cache``
(:mod:`freezebench.features.cache`'s metrics), ``grad_norm`` (``trainer.grad_norm_metric``); then the hooks
passed as ``Trainer(cfg, hooks=[...])``, in their order.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from .. import metrics as M
from ..config import flatten, to_yaml
from .tracking import csv_text, git_commit

if TYPE_CHECKING:  # the loop imports this module
    from .loop import RunResult, Trainer


class Hook:
    """Base class: every event is a no-op; override the ones the feature needs (see the module docstring)."""

    name: str = "hook"

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before the first step (a resumed trainer is already in its restored state)."""

    def after_step(self, trainer: Trainer, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        """After optimiser step ``step`` (1-based); ``losses``/``idx``: the step's per-sample losses, indices."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After epoch ``epoch`` (0-based) was evaluated; ``metrics``: what is logged for it."""

    def on_fit_end(self, trainer: Trainer, result: RunResult | None, error: BaseException | None) -> None:
        """Once, in reverse hook order, also after an error (then ``result`` is None)."""

    def on_checkpoint(self, trainer: Trainer, epoch: int, finished: bool) -> None:
        """After ``last.pt`` was written (``epoch`` epochs complete; ``finished``: the run's final state)."""

    def epoch_metrics(self) -> dict[str, float]:
        """This hook's metrics of the epoch that just ended (merged into the epoch's metrics)."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """The hook's state for the checkpoint (``None``: stateless, nothing is stored)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def overrides(hook: Hook, event: str) -> bool:
    """Whether ``hook``'s class implements ``event`` (the loop calls only those, e.g. per step)."""
    return getattr(type(hook), event) is not getattr(Hook, event)


# --- built-in hooks ----------------------------------------------------------------------------------------
class SparsityHook(Hook):
    """Sparse training (``sparsity.*``): re-mask weights and optimiser state after every step."""

    name = "sparsity"

    def __init__(self, sparsity: Any):
        self.sparsity = sparsity

    def after_step(self, trainer: Trainer, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        self.sparsity.after_step(step)  # masked weights and their optimiser state back to 0

    def epoch_metrics(self) -> dict[str, float]:
        return {M.SPARSITY_DENSITY: self.sparsity.density()}

    def state_dict(self) -> dict[str, Any]:
        return self.sparsity.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sparsity.load_state_dict(state)  # after the optimiser: masks zero its restored state too


class SieveHook(Hook):
    """Data sieving (``data.sieve.*``): the per-sample losses of every training forward, for the sieve."""

    name = "sieve"

    def __init__(self, sieve: Any):
        self.sieve = sieve

    def after_step(self, trainer: Trainer, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        # the global batch under DDP, so every rank's sieve holds the same losses and moves the same samples
        gather = trainer.parallel.gather_cat
        self.sieve.record(gather(idx), gather(losses.detach()))

    def state_dict(self) -> dict[str, Any]:
        return self.sieve.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sieve.load_state_dict(state)


class PolicyHook(Hook):
    """The policy's tick: a decision before the first step, then ``observe``/``decide`` when due."""

    name = "policy"

    def __init__(self, policy: Any):
        self.policy = policy

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.initial_decision()

    def after_step(self, trainer: Trainer, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        trainer.policy_tick(step, losses, idx)

    def epoch_metrics(self) -> dict[str, float]:
        return {f"policy/{k}": float(v) for k, v in self.policy.epoch_metrics().items()}


class CacheHook(Hook):
    """The frozen-prefix cache's bookkeeping (``trainer.cache_frozen_prefix``): its per-epoch metrics."""

    name = "cache"

    def __init__(self, cache: Any):
        self.cache = cache

    def epoch_metrics(self) -> dict[str, float]:
        return self.cache.metrics()


class StopSignalHook(Hook):
    """SIGTERM/SIGINT: checkpoint at the next step boundary, then stop; a second signal stops at once.

    Installed for the fit (main thread only), the previous handlers restored at its end.
    """

    name = "stop_signal"

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            if trainer.stop_requested is not None:
                raise KeyboardInterrupt
            trainer.request_stop(signum)
            print(f"freezebench: {signal.Signals(signum).name} received: writing a checkpoint at the next step "
                  f"boundary, then stopping (send it again to stop at once)", file=sys.stderr, flush=True)

        for s in self._previous:
            signal.signal(s, handler)

    def on_fit_end(self, trainer: Trainer, result: RunResult | None, error: BaseException | None) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class TrackingHook(Hook):
    """The run record: the MLflow run starts with the fit, every epoch's metrics are logged, the end logs the
    freeze events, timeline, summary and end metrics and writes ``final.pt`` (``trainer.save_checkpoint``).

    The run is marked KILLED (interrupted) or FAILED (anything else raised) with an ``error`` tag; a resumed
    run that finishes loses the stale ``error`` tag. With checkpoints on, an epoch's metrics wait for the
    checkpoint that covers them (:meth:`on_checkpoint`): MLflow never holds a step that a resume would train
    and log again (:mod:`freezebench.trainer.reliability`).
    """

    name = "tracking"

    def __init__(self) -> None:
        self.pending: list[tuple[int, dict[str, float]]] = []  # (step, metrics) not covered by a checkpoint yet

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.tracker.start(trainer.run_name, self.tags(trainer))
        self.log_start(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if trainer.cfg.trainer.checkpoint_every:
            self.pending.append((epoch + 1, dict(metrics)))
        else:  # no checkpoints, no resume: nothing to wait for
            trainer.tracker.log_metrics(metrics, step=epoch + 1)

    def on_checkpoint(self, trainer: Trainer, epoch: int, finished: bool) -> None:
        for step, metrics in self.pending:
            if step <= epoch:
                trainer.tracker.log_metrics(metrics, step=step)
        self.pending = [(s, m) for s, m in self.pending if s > epoch]

    def on_fit_end(self, trainer: Trainer, result: RunResult | None, error: BaseException | None) -> None:
        tracker = trainer.tracker
        if error is None and result is not None:
            try:
                if trainer.rank == 0:
                    self.log_end(trainer, result)
                    if trainer.resumed_from is not None:
                        tracker.delete_tags(["error"])  # the interrupted attempt's error is history now
            except BaseException as e:
                error = e
                raise
            finally:
                if error is not None:
                    self._failed(tracker, error)
            tracker.finish("FINISHED")
            return
        if error is not None:
            self._failed(tracker, error)

    @staticmethod
    def tags(tr: Trainer) -> dict[str, str]:
        """The run's MLflow tags (policy, model, dataset, seed, version, commit, ``tracking.tags.*``, description)."""
        c = tr.cfg
        tags = {"policy": c.policy.name, "model": c.model.name, "dataset": c.data.name,
                "seed": str(c.trainer.seed), "freezebench_version": __version__,
                "granularity": tr.partition.granularity, "device": str(tr.device)}
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        tags.update({k: str(v) for k, v in c.tracking.tags.items()})
        tags.setdefault("mlflow.note.content", TrackingHook.description(tr, tags.get("suite")))  # the run's description
        return tags

    @staticmethod
    def description(tr: Trainer, suite: str | None = None) -> str:
        """One paragraph for the MLflow UI's run description (Markdown)."""
        c, p = tr.cfg, tr.plan
        text = (f"**{c.policy.name}** freezing on **{c.model.name}** / **{c.data.name}**, seed {c.trainer.seed}: "
                f"{p.epochs} epochs of {p.steps_per_epoch} steps (batch {c.data.batch_size}), {c.optim.name} "
                f"lr {c.optim.lr} with a {c.schedule.name} schedule, {len(tr.units)} units "
                f"({tr.partition.granularity} granularity) on {tr.device}.")
        if suite:
            text += f" Part of suite `{suite}` (`freezebench compare --filter \"tags.suite = '{suite}'\"`)."
        return text

    @staticmethod
    def log_start(tr: Trainer) -> None:
        """Parameters, config and unit table; a run tracked only from a resume on gets the earlier epochs."""
        tr.tracker.log_params({**flatten(tr.cfg), "units.count": len(tr.units),
                                 "units.params": tr.partition.total_params,
                                 "units.gflops_per_sample_full": tr.cost.full_step_flops / 1e9,
                                 **tr.batch.log_params()})  # text: the length unit FLOPs are counted at
        tr.tracker.log_text(to_yaml(tr.cfg), "config.yaml")
        tr.tracker.log_text(tr.partition.table(), "units.txt")
        if tr.resumed_from is not None:  # what the checkpoint covers and the run lacks (reliability.py)
            tr.tracker.skip_held_metrics()
            for i, m in enumerate(tr.resumed_from["history"]):
                tr.tracker.log_metrics(m, step=i + 1)

    @staticmethod
    def log_end(tr: Trainer, result: RunResult) -> None:
        """Freeze events, timeline plot, summary, the final weights (``final.pt``) and the end metrics."""
        ev = result.events
        cols = {
            "unit": [e.unit for e in ev], "name": [e.name for e in ev], "step": [e.step for e in ev],
            "epoch": [e.epoch for e in ev], "num_params": [e.num_params for e in ev],
            "action": [e.action for e in ev], "reason": [e.reason for e in ev],
        }
        tr.tracker.log_text(csv_text(cols), "freeze_events.csv")
        tr.tracker.log_table(cols, "freeze_events.json")
        if tr.tracker.run_id:  # the figure (and matplotlib) only for a tracked run
            from ..analysis.plots import freeze_timeline

            fig = freeze_timeline(result.unit_names, ev, tr.plan.epochs, title=tr.run_name,
                                  steps_per_epoch=tr.plan.steps_per_epoch)  # a Figure outside pyplot
            tr.tracker.log_figure(fig, "freeze_timeline.png")
        summary = {"run_id": result.run_id, "run_name": tr.run_name, "metrics": result.metrics,
                   "frozen_units": sorted(tr.freezer.frozen), "num_units": len(tr.units),
                   "unit_names": result.unit_names, "warnings": []}
        from .reliability import divergence

        diverged = divergence(result.metrics, tr.data.info.num_classes, tr.data.info.num_val)
        if diverged:
            summary["warnings"].append(diverged)
            tr.tracker.set_tags({"diverged": "true"})
            print(f"freezebench: warning: {diverged}", file=sys.stderr, flush=True)
        tr.tracker.log_dict(summary, "summary.json")
        if tr.cfg.trainer.save_checkpoint:
            folder = Path(tr.cfg.trainer.output_dir) / (result.run_id or tr.run_name)
            path = tr.save_checkpoint(folder / "final.pt")
            result.checkpoint = str(path)
            if tr.cfg.tracking.enabled and tr.cfg.tracking.log_checkpoint:
                tr.tracker.log_artifact(str(path), "checkpoints")
        tr.tracker.log_metrics({k: v for k, v in result.metrics.items() if k not in result.history[-1]},
                                 step=tr.plan.epochs)

    @staticmethod
    def _failed(tracker: Any, error: BaseException) -> None:
        from ..errors import TrainingInterrupted

        if tracker.run_id:
            tracker.set_tags({"error": f"{type(error).__name__}: {str(error)[:400]}"})
        tracker.finish("KILLED" if isinstance(error, (KeyboardInterrupt, TrainingInterrupted)) else "FAILED")
