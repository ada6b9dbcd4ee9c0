"""Run the ``freezebench`` command line and send this process a signal right after optimiser step N.

    python tests/signal_at_step.py STEP SIGNAL train <overrides...>

Used by tests/test_resume.py to kill a training run at an exact point mid-epoch (a real ``SIGKILL``, which
nothing can catch, or a ``SIGTERM``, which the trainer answers with a checkpoint at the step boundary).
"""

from __future__ import annotations

import signal
import sys

import torch

from freezebench import cli
from freezebench.trainer import Trainer
from helpers import THREADS, SignalAt, with_hooks

if __name__ == "__main__":
    step, signame = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(THREADS)  # as the in-process runs of the tests (tests/conftest.py)
    with_hooks(Trainer, lambda: [SignalAt(step, getattr(signal, signame))])
    sys.exit(cli.main(sys.argv[3:]))
