"""Exactly-once logging across crashes, closing finished runs, and the divergence warning.

**Exactly once.** A run may be ``SIGKILL``ed anywhere (:mod:`freezebench.faults` names the points); after
``resume=`` every metric key must hold exactly one value per step, and no artifact may be doubled. Of the
two ways to get there, freezebench does *both halves of the first*:

1. *The checkpoint is written before the metrics it covers are logged.* An epoch's metrics go to MLflow
   only after the ``last.pt`` that contains that epoch (with ``trainer.checkpoint_every=k > 1`` the
   epochs in between are logged together after the next checkpoint; with ``0`` there is no resume and
   each epoch is logged at once). So MLflow never holds a step that the newest checkpoint does not cover:
   a kill can never make a resumed run train, and log, an epoch a second time.
2. *A resume logs the steps the checkpoint covers and MLflow lacks* (a kill between the checkpoint and
   the log): the checkpoint carries the per-epoch history, and a resumed tracker skips every (key, step)
   the run already holds (:meth:`~freezebench.trainer.tracking.MlflowTracker.skip_held_metrics`).

The alternative, logging first and having resume skip what MLflow holds, would keep values of an epoch
that is then trained again: exact only when the retrained epoch is bit-identical, which another thread
count or device breaks (``checkpoint.check_exactness``). Artifacts are logged under fixed names, so a
second upload replaces the first.

**No orphan before the first epoch.** With checkpoints on, a run writes ``last.pt`` once before its first
step too (the state after any step-0 freezing decision): a kill during the first epoch then resumes the
same MLflow run instead of leaving it RUNNING and starting a second one. It costs one checkpoint write.

**Closing.** The run's end is: the finished checkpoint (``finished=True``, holding the final metrics),
then the last epoch's metrics, the end-of-run artifacts and ``final.pt``, then the MLflow run is closed,
then the marker file :data:`CLOSED` is written next to ``last.pt``. ``resume=auto`` (or ``resume=`` that
checkpoint) on a finished checkpoint without the marker does not train: it restores the state and redoes
the end, logging only what the run lacks, and closes the run FINISHED.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text

CLOSED = "closed"  # marker file next to last.pt: the run's end was logged and its MLflow run closed


def is_closed(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CLOSED).is_file()


def mark_closed(run_dir: str | Path, run_id: str | None) -> None:
    atomic_write_text(f"{run_id or ''}\n", Path(run_dir) / CLOSED)


def chance_accuracy(num_classes: int, num_val: int) -> float:
    """The accuracy below which a classifier is indistinguishable from guessing: 1/C plus three standard
    errors of a guesser's accuracy on ``num_val`` samples (binomial, p = 1/C)."""
    p = 1.0 / max(num_classes, 1)
    return p + 3.0 * math.sqrt(p * (1 - p) / max(num_val, 1))


def divergence(metrics: dict[str, float], num_classes: int, num_val: int) -> str | None:
    """A warning when training diverged without a non-finite loss; ``None`` otherwise.

    Diverged: the final ``val/acc`` is at chance (:func:`chance_accuracy`) while the final ``train/loss``
    is finite and above ``ln C``, the loss of predicting every class with equal probability, so the model
    does worse than knowing nothing (AdamW at lr 1000 gets there; a run that merely has not learnt yet stays
    near ``ln C`` and is not flagged).
    """
    acc, loss = metrics.get("val/acc"), metrics.get("train/loss")
    if acc is None or loss is None or not math.isfinite(loss) or not math.isfinite(acc):
        return None
    chance = chance_accuracy(num_classes, num_val)
    if acc <= chance and loss > math.log(max(num_classes, 2)):
        return (f"training diverged: val/acc {acc:.4f} is at chance (<= {chance:.4f} for {num_classes} classes) "
                f"while train/loss {loss:.4g} is finite and above ln({num_classes}) = "
                f"{math.log(max(num_classes, 2)):.3f}; lower optim.lr")
    return None
