"""Named fault points for tests: ``FREEZEBENCH_FAULT=POINT[:EPOCH]`` SIGKILLs the process there.

``FREEZEBENCH_FAULT_SIGNAL=SIGTERM`` (or ``SIGINT``) sends that signal instead, once: the process's own
handlers run (the trainer stops at the next step boundary with a checkpoint), as under a scheduler's
``kill``, a pre-empted node or Ctrl-C.

    FREEZEBENCH_FAULT=mid_step:2 freezebench train ...            # killed in the middle of epoch 2
    FREEZEBENCH_FAULT=after_final_checkpoint freezebench train ...
    FREEZEBENCH_FAULT=mid_trial freezebench sweep SPACE ...        # a worker lost in the middle of a trial

Test-only. A real ``SIGKILL`` (no handler, no ``finally``, no flush) is what a lost machine, the OOM killer
or ``kill -9`` does; the tests (``tests/test_fault_points.py``) kill at every point and check that a resume
ends exactly where an uninterrupted run ends. The points, in the order a run meets them:

==========================  ===========================================================================
``mid_step``                between ``backward`` and the optimiser step of the middle batch of an epoch
``after_epoch_log``         after an epoch's checkpoint and its metrics are logged (the next epoch not begun)
``mid_checkpoint_write``    a checkpoint's temporary file is written, before its fsync and rename
``after_final_checkpoint``  the finished run's checkpoint is written; the last epoch's metrics, the
                            end-of-run artifacts and the closing of the MLflow run are not done yet
``mid_trial``               sweeps: ``mid_step`` inside a sweep trial (the worker dies mid-trial)
==========================  ===========================================================================

``EPOCH`` (1-based) restricts a point to that epoch (``mid_checkpoint_write:3``: the checkpoint written at
the end of epoch 3); without it the first time the point is reached kills. The variable is read once, at
import: when it is unset, :data:`ARMED` is ``False`` and the call sites (``if faults.ARMED: ...``) cost one
attribute read.
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = ("mid_step", "after_epoch_log", "mid_checkpoint_write", "after_final_checkpoint", "mid_trial")
ENV = "FREEZEBENCH_FAULT"
SIGNAL_ENV = "FREEZEBENCH_FAULT_SIGNAL"


def parse(text: str | None) -> tuple[str | None, int | None]:
    """``POINT[:EPOCH]`` -> (point, epoch); ``(None, None)`` when unset. Unknown points are refused loudly."""
    if not text:
        return None, None
    point, _, epoch = text.partition(":")
    if point not in POINTS:
        raise SystemExit(f"{ENV}={text!r}: unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if epoch and not epoch.isdigit():
        raise SystemExit(f"{ENV}={text!r}: the epoch after ':' must be a positive integer")
    return point, (int(epoch) if epoch else None)


def parse_signal(text: str | None) -> signal.Signals:
    """The signal a fault point sends: ``SIGKILL`` unless :data:`SIGNAL_ENV` names ``SIGTERM`` or ``SIGINT``."""
    if not text:
        return signal.SIGKILL
    name = text.strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in ("SIGKILL", "SIGTERM", "SIGINT"):
        raise SystemExit(f"{SIGNAL_ENV}={text!r}: choose SIGKILL, SIGTERM or SIGINT")
    return signal.Signals[name]


POINT, EPOCH = parse(os.environ.get(ENV))
SIGNAL = parse_signal(os.environ.get(SIGNAL_ENV))
ARMED = POINT is not None
_in_trial = False  # set by the sweep runner while a trial trains: arms mid_trial at the mid_step site


def set_in_trial(active: bool) -> None:
    global _in_trial
    _in_trial = active


def at(point: str, epoch: int | None = None) -> None:
    """SIGKILL this process (or send it :data:`SIGNAL`, once) if ``point`` (in 1-based ``epoch``) is the
    armed fault point."""
    global ARMED
    if not ARMED:
        return
    armed = POINT == point or (POINT == "mid_trial" and point == "mid_step" and _in_trial)
    if not armed or (EPOCH is not None and epoch != EPOCH):
        return
    sys.stderr.write(f"freezebench: fault point {POINT}" + (f" (epoch {epoch})" if epoch else "") + f": {SIGNAL.name}\n")
    sys.stderr.flush()
    if SIGNAL != signal.SIGKILL:
        ARMED = False  # a signal the process survives is sent once (a second one would mean "stop at once")
    os.kill(os.getpid(), SIGNAL)
