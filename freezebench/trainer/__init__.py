"""The trainer: the training loop and what it owns (checkpoints, data parallelism, the freezer, tracking).

``Trainer``, ``RunResult`` and the loop's helpers are imported lazily, so that importing a light submodule
(say :mod:`freezebench.trainer.tracking`) does not build the whole trainer.
"""

from typing import Any

__all__ = ["Trainer", "RunResult", "build_optimizer", "lr_factor", "peak_memory_mb", "resolve_device",
           "seed_everything"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
