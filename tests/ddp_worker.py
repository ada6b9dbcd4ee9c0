"""``freezebench train`` under torchrun, each rank then saving what it ended with (for tests/test_ddp.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py DUMP_DIR train <overrides...>

With FB_SIGNAL_AT_STEP=N in the environment, rank 0 sends itself SIGTERM right after step N (the ranks must
agree to stop at one step boundary). After the fit, rank r writes DUMP_DIR/rank{r}.pt: its model state, frozen units, freeze events, the cost
model's full-step FLOPs and its shard of the first epoch.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from freezebench import cli
from freezebench.trainer import Trainer
from helpers import SignalAt, with_hooks

if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit = Trainer.fit

    def fit_and_dump(self):
        self.data.train.set_epoch(0)
        shard = self.data.train.shard().tolist()
        result = fit(self)
        torch.save({"state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                    "frozen": sorted(self.freezer.frozen),
                    "events": [(e.unit, e.step, e.action) for e in self.freezer.events],
                    "full_step_flops": self.cost.full_step_flops, "shard": shard, "run_id": result.run_id,
                    "world_size": self.world_size, "history": result.history,
                    "sieve": self.sieve.state_dict() if self.sieve is not None else None},
                   out / f"rank{self.rank}.pt")
        return result

    Trainer.fit = fit_and_dump
    at = int(os.environ.get("FB_SIGNAL_AT_STEP", "0"))
    if at:
        with_hooks(Trainer, lambda: [SignalAt(at, signal.SIGTERM, when=lambda trainer: trainer.rank == 0)])
    sys.exit(cli.main(sys.argv[2:]))
