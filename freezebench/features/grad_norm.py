"""The gradient norm per epoch as a metric (``trainer.grad_norm_metric=true``): a trainer hook in one module.

    freezebench train policy=autofreeze trainer.grad_norm_metric=true

After every optimiser step, the L2 norm of the gradients of all trained parameters (frozen units have
none; under DDP the gradients are already averaged over ranks, so every rank sees the same norm) is added
to a running sum on the device (no host synchronisation per step). At the end of the epoch
``train/grad_norm`` is the mean over the epoch's steps (``nan``, hence not logged, for an epoch without a
gradient). The running sum and step count are the hook's state, so a run stopped mid-epoch and resumed
logs the same mean as an uninterrupted one.

This feature is the worked example of :mod:`freezebench.trainer.hooks`: it touches this module, one
config default (``TrainerConfig.grad_norm_metric``) and the trainer's hook assembly (an import and one entry
in ``Trainer._build_hooks``); the checkpoint stores its state under its name without being told.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import metrics as M
from ..trainer.hooks import Hook

METRIC = M.GRAD_NORM  # "train/grad_norm"


class GradNormHook(Hook):
    """Mean L2 norm of the step's gradients over each epoch (see the module docstring)."""

    name = "grad_norm"

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        self.params = params
        self.device = device
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.steps = 0

    @classmethod
    def from_trainer(cls, trainer: Any) -> GradNormHook | None:
        """The hook when ``trainer.grad_norm_metric`` is on, else ``None``."""
        if not trainer.cfg.trainer.grad_norm_metric:
            return None
        return cls([p for p in trainer.model.parameters()], trainer.device)

    def after_step(self, trainer: Any, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2.0)
            self.total += torch.linalg.vector_norm(torch.stack(norms).double(), 2.0)
            self.steps += 1

    def epoch_metrics(self) -> dict[str, float]:
        return {METRIC: self.total.item() / self.steps if self.steps else float("nan")}

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.total.zero_()  # the next epoch's sum starts afresh
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.detach().cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["total"].to(self.device, torch.float64).clone()
        self.steps = int(state["steps"])
