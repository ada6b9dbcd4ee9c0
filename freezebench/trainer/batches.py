"""Batch adapters: what differs between image and text batches, in one small object the trainer holds.

The trainer picks one at setup from the data (:func:`adapter_for`) and calls it unconditionally, so the loop has
no image / text branches:

* :class:`ImageBatches`: ``(x, y, idx)`` with ``x`` an image tensor; zoo models (:data:`~freezebench.registry.MODELS`);
  unit FLOPs from one trace (:func:`freezebench.units.partition`), a step costs ``CostModel.step_flops``.
* :class:`TextBatches`: ``(inputs, y, idx)`` with ``inputs`` a dict of ``input_ids``, ``attention_mask`` (and
  ``token_type_ids``), padded per batch (:mod:`freezebench.zoo.text_data`); text models
  (:data:`~freezebench.registry.TEXT_MODELS`, :mod:`freezebench.zoo.text`). A transformer's FLOPs depend on the
  sequence length ``L``: every unit's forward FLOPs per sample are exactly ``c0 + c1 L + c2 L^2`` (linear
  layers are linear in ``L``, attention scores and weighted values quadratic, the pooler and classifier read
  one token), so :class:`LengthCost` traces the model at three lengths and interpolates exactly. Each step is
  counted at its batch's padded length (what was actually trained, padding included); the units' ``flops``
  (what policies and the unit table see, ``units.gflops_per_sample_full``) are at the longest sequence of the
  data (the logged parameter ``units.flops_length``). Sparse training (``sparsity.*``) rewrites the unit FLOPs
  from the module FLOPs, which :class:`LengthCost` fits the same way, so sparse text steps are exact too
  (:meth:`TextBatches.sparse_cost`).

Both give the batch preparation (channels-last images), the forward (``model(x)``: a text model takes the
input dict), the per-sample losses (cross-entropy), the model, the units and their FLOPs, the step's FLOPs,
the evaluation's confusion counts and task metrics, and the features a modality cannot have (:meth:`check`:
one line naming the key to change).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from .. import metrics as M
from ..cost import CostModel
from ..errors import ConfigError, UnknownNameError
from ..units import Partition, partition


class ImageBatches:
    """Image tensors ``(x, y, idx)`` (every dataset of :mod:`freezebench.zoo.data` but the text ones)."""

    modality = "image"

    def __init__(self, info: Any):
        self.info = info
        self.channels_last = False  # set by the trainer (trainer.channels_last on CUDA)

    def prepare(self, x: Any) -> Any:
        """The batch's inputs as the model takes them (images: channels_last when asked for)."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, model: torch.nn.Module, x: Any) -> torch.Tensor:
        """The logits (a text model takes the input dict itself, :class:`freezebench.zoo.text.TextClassifier`)."""
        return model(x)

    def losses(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "none") -> torch.Tensor:
        """Per-sample cross-entropy (``reduction="sum"``: their sum), in float32."""
        return F.cross_entropy(out.float(), y, reduction=reduction)

    def check(self, cfg: Any, world_size: int) -> None:
        pass

    def build_model(self, cfg: Any) -> torch.nn.Module:
        from ..registry import MODELS, TEXT_MODELS
        from ..zoo.models import build_model

        mc, info = cfg.model, self.info
        if mc.name in TEXT_MODELS.names():
            raise ConfigError(f"model.name={mc.name} is a text model but data.name={cfg.data.name} is images: use "
                              f"text data (data.name=text_demo or glue) or an image model (freezebench list)")
        MODELS.get(mc.name)  # clear error for unknown names before anything else
        return build_model(mc.name, num_classes=info.num_classes, in_channels=info.in_channels,
                           image_size=info.image_size, pretrained=mc.pretrained, checkpoint=mc.checkpoint,
                           reinit_head=mc.reinit_head)

    def partition(self, model: torch.nn.Module, example: Any, granularity: str) -> Partition:
        return partition(model, example, granularity)

    def sparse_cost(self, sparsity: Any, partition: Partition) -> CostModel:
        """The cost model of sparse training (``sparsity.*``): every masked layer's FLOPs scaled by its density
        (:meth:`freezebench.features.sparsity.Sparsity.unit_flops`); ``cost/tflops_full`` stays dense."""
        return CostModel(sparsity.unit_flops(partition), partition.other_flops)

    def account(self, trainer: Any, x: Any, n: int, sums: Any) -> None:
        """Add the step's training FLOPs (``n`` samples) to the epoch's sums."""
        sums.flops += trainer.step_cost * n  # step_cost changes only when the frozen set does

    def epoch_full_flops(self, trainer: Any, sums: Any) -> float:
        """What full (unfrozen, dense) training of the epoch's samples would spend."""
        return trainer.dense_full_step_flops * sums.samples

    def confusion(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None  # images: accuracy only (the trainer counts it)

    def val_metrics(self, confusion: list[float] | None) -> dict[str, float]:
        return {}

    def log_params(self) -> dict[str, Any]:
        return {}

    def payload(self) -> dict[str, Any]:
        return {}


class LengthCost:
    """Per-sample unit FLOPs as exact quadratics in the sequence length, and a :class:`CostModel` per length.

    ``modules`` (per length: each module's inclusive FLOPs, ``Partition.module_flops``) are fitted the same way,
    so a rule that rewrites unit FLOPs from module FLOPs (sparse training: :meth:`set_scale`) applies at every
    length exactly: :meth:`at` is the dense cost model, :meth:`trained_at` the one a step is counted with.
    """

    LENGTHS = (2, 3, 4)

    def __init__(self, per_length: dict[int, tuple[list[float], float]],
                 modules: dict[int, dict[str, float]] | None = None):
        xs = sorted(per_length)
        cols = [[Fraction(v) for v in per_length[L][0]] + [Fraction(per_length[L][1])] for L in xs]
        self.coeffs = [self._fit(xs, [c[j] for c in cols]) for j in range(len(cols[0]))]
        names = sorted(set().union(*modules.values())) if modules else []
        self.module_coeffs = {n: self._fit(xs, [Fraction(modules[L].get(n, 0.0)) for L in xs]) for n in names}
        self._models: dict[int, CostModel] = {}
        self._scale: Any = None
        self._trained: dict[int, CostModel] = {}

    @staticmethod
    def _fit(xs: list[int], ys: list[Fraction]) -> tuple[Fraction, Fraction, Fraction]:
        """The quadratic through three points (Lagrange), exactly."""
        (a, b, c), (ya, yb, yc) = xs, ys
        c2 = ((yc - yb) / (c - b) - (yb - ya) / (b - a)) / (c - a)
        c1 = (yb - ya) / (b - a) - c2 * (a + b)
        return ya - c1 * a - c2 * a * a, c1, c2

    def flops(self, length: int) -> tuple[list[float], float]:
        """(unit FLOPs, other FLOPs) per sample at ``length`` tokens."""
        vals = [float(c0 + c1 * length + c2 * length * length) for c0, c1, c2 in self.coeffs]
        return vals[:-1], vals[-1]

    def module_flops(self, length: int) -> dict[str, float]:
        """Each traced module's inclusive forward FLOPs per sample at ``length`` tokens."""
        return {n: float(c0 + c1 * length + c2 * length * length) for n, (c0, c1, c2) in self.module_coeffs.items()}

    def at(self, length: int) -> CostModel:
        """The dense cost model at ``length`` tokens (``cost/tflops_full``)."""
        cm = self._models.get(length)
        if cm is None:
            cm = self._models[length] = CostModel(*self.flops(length))
        return cm

    def set_scale(self, scale: Any) -> None:
        """``scale(unit_flops, module_flops) -> unit_flops`` rewrites the dense unit FLOPs at every length (sparse
        training: :meth:`freezebench.features.sparsity.Sparsity.scaled_flops`); ``None``: dense."""
        self._scale = scale
        self._trained = {}

    def trained_at(self, length: int) -> CostModel:
        """The cost model a step at ``length`` tokens is counted with (``cost/tflops``): :meth:`at` rewritten by
        the scale of :meth:`set_scale`, if any."""
        if self._scale is None:
            return self.at(length)
        cm = self._trained.get(length)
        if cm is None:
            units, other = self.flops(length)
            cm = self._trained[length] = CostModel(self._scale(units, self.module_flops(length)), other)
        return cm


class TextBatches(ImageBatches):
    """Text batches ``(inputs, y, idx)`` (:mod:`freezebench.zoo.text_data`) for the text models."""

    modality = "text"

    def __init__(self, info: Any):
        super().__init__(info)
        self.lengths: LengthCost | None = None
        self.hf_path: str | None = None

    def check(self, cfg: Any, world_size: int) -> None:
        tc = cfg.trainer
        if tc.cache_frozen_prefix:
            raise ConfigError("trainer.cache_frozen_prefix stores one fixed-shape output per sample, but text batches "
                              "are padded per batch (variable sequence lengths): set trainer.cache_frozen_prefix=false")
        if tc.compile:
            raise ConfigError("trainer.compile=true would recompile for every padded sequence length of a text "
                              "batch; set trainer.compile=false on text")
        if cfg.model.pretrained:
            raise ConfigError("model.pretrained=true loads torchvision weights; a pretrained text model is "
                              "model.name=hf model.hf_path=<folder or cache name>")

    def build_model(self, cfg: Any) -> torch.nn.Module:
        from ..registry import MODELS, TEXT_MODELS
        from ..zoo.text import build_text_model

        mc, info = cfg.model, self.info
        self.hf_path = mc.hf_path
        if mc.name not in TEXT_MODELS.names():
            kind = "an image model" if mc.name in MODELS.names() else "not a text model"
            raise UnknownNameError(f"model.name={mc.name} is {kind} but data.name={cfg.data.name} is text: use one of "
                                   f"{', '.join(TEXT_MODELS.names())}")
        return build_text_model(mc.name, num_classes=info.num_classes, vocab_size=info.vocab_size,
                                max_length=info.max_length, hf_path=mc.hf_path, checkpoint=mc.checkpoint,
                                reinit_head=mc.reinit_head)

    @staticmethod
    def _example(probe: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        """Two sequences of ``length`` tokens shaped like ``probe`` (the values do not change FLOPs)."""
        ref = probe["input_ids"]
        ex = {"input_ids": torch.ones(2, length, dtype=ref.dtype, device=ref.device),
              "attention_mask": torch.ones(2, length, dtype=torch.long, device=ref.device)}
        if "token_type_ids" in probe:
            ex["token_type_ids"] = torch.zeros(2, length, dtype=torch.long, device=ref.device)
        return ex

    def partition(self, model: torch.nn.Module, example: Any, granularity: str) -> Partition:
        per_length, modules = {}, {}
        names = None
        for L in LengthCost.LENGTHS:
            part = partition(model, self._example(example, L), granularity)
            if names is None:
                names = [u.name for u in part.units]
            per_length[L] = ([u.flops for u in part.units], part.other_flops)
            modules[L] = part.module_flops
        self.lengths = LengthCost(per_length, modules)
        ref = partition(model, self._example(example, self.info.max_length), granularity)
        assert [u.name for u in ref.units] == names
        flops, other = self.lengths.flops(self.info.max_length)
        for u, f in zip(ref.units, flops):
            u.flops = f
        ref.other_flops = other
        ref.module_flops = self.lengths.module_flops(self.info.max_length)
        return ref

    def sparse_cost(self, sparsity: Any, partition: Partition) -> CostModel:
        """Every step from now on counted with the sparse unit FLOPs at its own padded length (the image rule of
        :meth:`ImageBatches.sparse_cost` applied at each length); returns the cost model at the units' length."""
        units = partition.units
        self.lengths.set_scale(lambda flops, modules: sparsity.scaled_flops(flops, modules, units))
        return self.lengths.trained_at(self.info.max_length)

    def account(self, trainer: Any, x: Any, n: int, sums: Any) -> None:
        L = int(x["input_ids"].shape[1])
        sums.flops += self.lengths.trained_at(L).step_flops(trainer.freezer.frozen) * n
        sums.flops_full += self.lengths.at(L).full_step_flops * n  # dense, unfrozen

    def epoch_full_flops(self, trainer: Any, sums: Any) -> float:
        return sums.flops_full

    def confusion(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.info.num_classes
        return torch.bincount(y * k + pred, minlength=k * k)

    def val_metrics(self, confusion: list[float] | None) -> dict[str, float]:
        from ..zoo.text_data import task_metrics

        if confusion is None:
            return {}
        k = self.info.num_classes
        out = task_metrics(self.info.task, torch.tensor(confusion, dtype=torch.float64).view(k, k))
        out.pop(M.VAL_ACC, None)  # the trainer's own
        return out

    def log_params(self) -> dict[str, Any]:
        return {"units.flops_length": self.info.max_length,
                "cost.flops_counted_at": "each batch's padded sequence length"}

    def payload(self) -> dict[str, Any]:
        return {"modality": "text", "vocab_size": self.info.vocab_size, "max_length": self.info.max_length,
                "task": self.info.task, "hf_path": self.hf_path}


def adapter_for(info: Any) -> ImageBatches:
    """The batch adapter of a dataset (its ``DataInfo.modality``)."""
    return TextBatches(info) if getattr(info, "modality", "image") == "text" else ImageBatches(info)
