"""The training state as two objects: :class:`TrainState` (the whole run) and :class:`EpochSums` (the epoch
in progress).

Every counter the loop keeps lives here, so that the trainer's :meth:`~freezebench.trainer.Trainer.state_dict`
is these objects plus the model, optimiser, freezer, policy and hooks, and a resume puts them back in one
place. The checkpoint file keeps its layout (:mod:`freezebench.trainer.checkpoint`): ``position``,
``accounting`` and, per rank, ``epoch_acc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    """Run-wide counters and accounting (what survives from one epoch to the next)."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch in progress (= epochs finished, between epochs)
    batch: int = 0  # batches of that epoch trained on (0: it has not started)
    tflops: float = 0.0  # TFLOPs spent (cost model)
    tflops_full: float = 0.0  # what full (dense, unfrozen) training of the same samples would spend
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    val_loss: float = math.nan  # the latest evaluation
    val_acc: float = math.nan
    val_metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation's task metrics (text)
    policy_time: float = 0.0  # seconds spent in the policy (observe / decide / apply)
    elapsed_before: float = 0.0  # seconds the run had taken before it was resumed
    lr_factor: float = 1.0  # the schedule's learning-rate multiplier at the latest step

    def position(self) -> dict[str, int]:
        return {"step": int(self.step), "epoch": int(self.epoch), "batch": int(self.batch)}

    def accounting(self, elapsed_s: float) -> dict[str, Any]:
        """The accounting part of a checkpoint (``elapsed_s``: the run's seconds so far)."""
        return {"tflops": self.tflops, "tflops_full": self.tflops_full, "history": [dict(h) for h in self.history],
                "val_loss": self.val_loss, "val_acc": self.val_acc, "val_metrics": dict(self.val_metrics),
                "elapsed_s": elapsed_s,
                "policy_time": self.policy_time}

    def load(self, position: dict[str, Any], accounting: dict[str, Any], lr_factor: float) -> None:
        self.step, self.epoch, self.batch = int(position["step"]), int(position["epoch"]), int(position["batch"])
        self.tflops, self.tflops_full = float(accounting["tflops"]), float(accounting["tflops_full"])
        self.history = [dict(h) for h in accounting["history"]]
        self.val_loss, self.val_acc = float(accounting["val_loss"]), float(accounting["val_acc"])
        self.val_metrics = {k: float(v) for k, v in accounting.get("val_metrics", {}).items()}
        self.policy_time = float(accounting["policy_time"])
        self.elapsed_before = float(accounting["elapsed_s"])
        self.lr_factor = float(lr_factor)


@dataclass
class EpochSums:
    """This rank's sums over the epoch in progress (summed over ranks at its end)."""

    loss_sum: torch.Tensor  # device scalar: no host sync per step
    correct: torch.Tensor
    samples: int = 0
    flops: float = 0.0
    flops_full: float = 0.0  # text: what full training of the epoch's batches (at their lengths) would spend
    policy_before: float = 0.0  # TrainState.policy_time when the epoch started (less a resumed part's)
    loop_before: float = 0.0  # loop seconds of this epoch before a resume
    loop_s: float = 0.0  # loop seconds of the epoch (set when its last step is done)

    @classmethod
    def start(cls, device: torch.device, policy_time: float) -> EpochSums:
        return cls(loss_sum=torch.zeros((), device=device), correct=torch.zeros((), device=device, dtype=torch.long),
                   policy_before=policy_time)

    def to_checkpoint(self, policy_time: float, loop_s: float) -> dict[str, Any]:
        """The partial sums in the checkpoint's ``epoch_acc`` layout."""
        return {"samples": self.samples, "flops_epoch": self.flops, "flops_full": self.flops_full, "loss_sum": self.loss_sum.detach().cpu(),
                "correct": self.correct.cpu(), "policy_s": policy_time - self.policy_before, "loop_s": loop_s}

    @classmethod
    def from_checkpoint(cls, part: dict[str, Any], device: torch.device, policy_time: float) -> EpochSums:
        """The sums of an epoch stopped at a step boundary, to continue it."""
        sums = cls.start(device, policy_time - part["policy_s"])
        sums.samples, sums.flops = part["samples"], part["flops_epoch"]
        sums.flops_full = part.get("flops_full", 0.0)
        sums.loss_sum += part["loss_sum"].to(device)
        sums.correct += part["correct"].to(device)
        sums.loop_before = part["loop_s"]
        return sums
