"""A model passed to the trainer keeps its own identity.

``Trainer(cfg, model=m)`` trains ``m``, not the zoo model ``cfg.model.name`` names, so the run must not be
named, tagged or checkpointed as that zoo model (``compare`` would merge a ShuffleNet and a custom
transformer into one "resnet20" row). :func:`adopt_model` gives the run the name the user set in
``model.name`` (free text: a passed model needs no registry entry), else the module's class name; applies
``model.checkpoint`` to the passed model (``model.reinit_head`` as for zoo models); and refuses
``model.pretrained``, whose ImageNet weights exist for the zoo's torchvision models only.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError


def model_identity(cfg: Any, model: nn.Module) -> str:
    """``model.name`` when the user set it (anything but the default zoo name), else the class name."""
    name = str(cfg.model.name)
    return type(model).__name__ if name == ModelConfig().name else name


def adopt_model(cfg: Any, model: nn.Module) -> Any:
    """A copy of ``cfg`` with ``model.name`` set to the passed model's identity, its checkpoint loaded."""
    from ..zoo.models import load_checkpoint

    name = model_identity(cfg, model)
    if cfg.model.pretrained:
        raise ConfigError(f"model.pretrained=true cannot apply to a model passed in ({name}): load its pretrained "
                          "weights yourself before passing it, or pass model.checkpoint=<file>")
    if cfg.model.checkpoint is not None:
        load_checkpoint(model, name, str(cfg.model.checkpoint), reinit_head=bool(cfg.model.reinit_head))
    cfg = copy.deepcopy(cfg)
    cfg.model.name = name
    return cfg
