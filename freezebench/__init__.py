"""freezebench: every layer-freezing policy on one trainer, measured the same way, tracked in MLflow.

The public API, imported lazily (``import freezebench`` itself loads neither torch nor the zoo)::

    from freezebench import Trainer, load_config
    result = Trainer(load_config(["policy=static", "trainer.epochs=3"])).fit()

- :class:`Trainer`, :class:`RunResult`: the shared training loop (:mod:`freezebench.trainer`);
- :func:`load_config`: presets plus ``key=value`` overrides, validated (:mod:`freezebench.config`);
- :class:`FreezePolicy`, :class:`Decision`, :class:`Plan`, :class:`Signal`, :class:`Signals`: the policy
  interface (:mod:`freezebench.policy`);
- :func:`partition`, :class:`Unit`: freezable units and their FLOPs (:mod:`freezebench.units`);
- :data:`POLICIES`, :data:`MODELS`, :data:`DATASETS`: the plug-in registries (:mod:`freezebench.registry`).

Layout: the interfaces live at the top level (``config``, ``policy``, ``units``, ``cost``, ``registry``,
``errors``, ``cli``); ``trainer/`` holds the loop and what it owns (checkpoint, distributed, freezer,
tracking); ``features/`` the optional trainer features (cache, sparsity, sieve); ``zoo/`` the built-in models
and datasets; ``analysis/`` similarity measures, the comparison report and the plots.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "Trainer": "freezebench.trainer.loop",
    "RunResult": "freezebench.trainer.loop",
    "load_config": "freezebench.config",
    "FreezePolicy": "freezebench.policy",
    "Decision": "freezebench.policy",
    "Plan": "freezebench.policy",
    "Signal": "freezebench.policy",
    "Signals": "freezebench.policy",
    "partition": "freezebench.units",
    "Unit": "freezebench.units",
    "POLICIES": "freezebench.registry",
    "MODELS": "freezebench.registry",
    "DATASETS": "freezebench.registry",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'freezebench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
