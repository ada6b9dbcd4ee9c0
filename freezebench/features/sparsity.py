"""Sparse training as a trainer feature any policy can use (``sparsity.*``).

    freezebench train policy=full sparsity.enabled=true sparsity.sparsity=0.8 sparsity.distribution=erk
    freezebench train policy=spfde                      # SpFDE turns it on by default

Unstructured weight masks on the weights of every convolution and linear layer (the classifier head stays
dense unless ``sparsity.dense_head=false``), as in the sparse-training framework of SpFDE (Geng Yuan et al.,
"Layer Freezing & Data Sieving: Missing Pieces of a Generic Framework for Sparse Training", NeurIPS 2022),
which builds on MEST (Yuan et al., "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on
the Edge", NeurIPS 2021):

* **Densities.** ``uniform``: every masked layer keeps ``1 - sparsity`` of its weights. ``erk``
  (Erdos-Renyi-Kernel, Evci et al., "Rigging the Lottery", ICML 2020): layer ``l`` keeps
  ``eps * (sum of its shape) / (product of its shape)`` of its weights, ``eps`` chosen so that the kept
  weights over all masked layers are ``1 - sparsity`` of the total; layers that would exceed 1 are dense and
  ``eps`` is solved again for the rest. Each layer keeps exactly ``round(density * numel)`` weights (at
  least one), and that count never changes.
* **Start.** A seeded random mask per layer (``sparsity.seed``, default ``trainer.seed``); masked weights
  are set to zero.
* **Every step** (:meth:`Sparsity.after_step`, called right after the optimiser step): weights *and*
  their optimiser state (SGD momentum, Adam moments) are multiplied by the mask, so a masked weight is
  exactly zero after every step and no momentum pushes it away from zero at the next one.
* **Mask updates** every ``mask_every`` steps until ``update_until`` of training: in each trainable layer
  prune the ``update_fraction`` share of its kept weights with the smallest magnitude, and regrow as many
  among the weights that were masked before this update, chosen at random (MEST's random growth); regrown
  weights start at zero with zero optimiser state. Frozen units keep their masks and weights (SpFDE:
  frozen layers are not updated at all). The kept count per layer, hence the density, is unchanged.

Cost. Sparse training is simulated with dense kernels (as the MEST/SpFDE PyTorch code does), so wall time
does not shrink; the cost model counts what sparse kernels would execute: a masked layer's forward,
weight-gradient and input-gradient FLOPs scale with its density (:meth:`Sparsity.unit_flops`, exact per
layer: each masked module's own FLOPs as the partition counted them with ``torch.utils.flop_counter``).
``cost/tflops`` therefore reflects the sparsity; ``cost/tflops_full`` stays the dense, unfrozen cost of the
same samples, so ``cost/saving_frac`` includes the saving from sparsity. ``sparsity/density`` is logged
every epoch (kept weights / weights of the masked layers).

Text models (:mod:`freezebench.zoo.text`). The same rule picks the masked modules of a BERT: every
``nn.Linear`` outside the head unit, i.e. the query, key, value, attention-output, intermediate and output
projections of each encoder layer (and, at ``layer`` granularity, the pooler's dense layer, which is a unit of
its own there; at ``block`` granularity it belongs to the head with the classifier and stays dense). Not
masked: the embeddings (``nn.Embedding``: a lookup, no multiply-adds to skip and no conv / linear weight),
the LayerNorms (1-D weights; ``torch.utils.flop_counter`` counts no FLOPs for them either) and the attention
scores and weighted values (``Q K^T`` and ``softmax(.) V`` multiply activations by activations: no weight,
nothing to mask), so their FLOPs stay dense. A text step is counted at its batch's padded length ``L``
(:class:`freezebench.trainer.batches.LengthCost`): with ``F_l(L)`` and ``F_m(L)`` the exact dense unit and
module FLOPs at ``L`` (quadratics in ``L`` fitted exactly from three traces; a linear layer's are linear in
``L``), the sparse unit FLOPs are ``F_l(L) - sum_m F_m(L) * (1 - d_m)``, the image rule at that length, and
the step costs what :class:`freezebench.cost.CostModel` makes of them (forward, weight and input gradients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

MASKED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Every layer keeps ``density`` of its weights."""
    return [float(density)] * len(shapes)


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020): ``eps * sum(shape) / prod(shape)``, capped at 1.

    ``eps`` makes the kept weights ``density`` of the total; capped layers are dense and ``eps`` is solved
    again for the others (the RigL reference procedure).
    """
    numel = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numel)]
    total = sum(numel)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        budget = density * total - sum(numel[i] for i in dense)
        divisor = sum(raw[i] * numel[i] for i in rest)
        if not rest or divisor <= 0:
            break
        eps = budget / divisor
        over = [i for i in rest if eps * raw[i] > 1.0]
        if not over:
            break
        worst = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == worst)
    return [1.0 if i in dense else min(1.0, eps * raw[i]) for i in range(len(shapes))]


def keep_count(numel: int, density: float) -> int:
    """Weights a layer of ``numel`` weights keeps at ``density`` (at least one)."""
    return max(1, min(numel, int(round(density * numel))))


class Sparsity:
    """Masks of the masked layers of one model; see the module docstring."""

    def __init__(self, cfg: Any, model: nn.Module, units: Sequence[Any], optimizer: torch.optim.Optimizer,
                 total_steps: int, seed: int):
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = total_steps
        head = {id(m) for u in units if u.is_head for m in u.modules} if cfg.dense_head else set()
        self.names: list[str] = []
        self.modules: list[nn.Module] = []
        for name, m in model.named_modules():
            if isinstance(m, MASKED_TYPES) and m.weight is not None and m.weight.dim() >= 2 and id(m) not in head:
                self.names.append(name)
                self.modules.append(m)
        if not self.modules:
            raise ConfigError("sparsity.enabled=true but the model has no convolution or linear weights to mask"
                              + (" outside the head (try sparsity.dense_head=false)" if head else ""))
        self.params: list[nn.Parameter] = [m.weight for m in self.modules]
        shapes = [tuple(p.shape) for p in self.params]
        dens = erk_densities if cfg.distribution == "erk" else uniform_densities
        self.densities = dens(shapes, 1.0 - cfg.sparsity)
        self.kept = [keep_count(p.numel(), d) for p, d in zip(self.params, self.densities)]
        self.gen = torch.Generator().manual_seed(int(cfg.seed if cfg.seed is not None else seed) * 7_919 + 1)
        self.masks: list[torch.Tensor] = []
        for p, k in zip(self.params, self.kept):
            mask = torch.zeros(p.numel(), dtype=p.dtype)
            mask[torch.randperm(p.numel(), generator=self.gen)[:k]] = 1
            self.masks.append(mask.view_as(p).to(p.device))
        self.updates = 0
        self.apply()

    # --- masking ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights and their optimiser state."""
        torch._foreach_mul_(self.params, self.masks)
        state = self.optimizer.state
        bufs, masks = [], []
        for p, m in zip(self.params, self.masks):
            st = state.get(p)
            if st:
                for key in _STATE_KEYS:
                    t = st.get(key)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape:
                        bufs.append(t)
                        masks.append(m)
        if bufs:
            torch._foreach_mul_(bufs, masks)

    def update_due(self, step: int) -> bool:
        c = self.cfg
        return bool(c.mask_every) and step % c.mask_every == 0 and step <= c.update_until * self.total_steps

    def after_step(self, step: int) -> None:
        """Call after every optimiser step ``step`` (1-based count): re-mask, and update the masks when due."""
        if self.update_due(step):
            self.update()
        self.apply()

    @torch.no_grad()
    def update(self) -> None:
        """Prune the smallest-magnitude share ``update_fraction`` of each trainable layer's kept weights and
        regrow as many at random among the weights masked before the update (frozen layers untouched)."""
        for p, mask, kept in zip(self.params, self.masks, self.kept):
            if not p.requires_grad:
                continue
            flat = mask.view(-1)
            inactive = (flat == 0).nonzero().view(-1)
            k = min(int(round(self.cfg.update_fraction * kept)), inactive.numel(), kept)
            if k <= 0:
                continue
            score = p.detach().abs().view(-1).float().masked_fill(flat == 0, float("inf"))
            prune = torch.topk(score, k, largest=False).indices
            grow = inactive[torch.randperm(inactive.numel(), generator=self.gen)[:k].to(inactive.device)]
            flat[prune] = 0
            flat[grow] = 1
            p.view(-1)[grow] = 0  # regrown weights start at zero (they were masked, so they are zero already)
        self.updates += 1

    # --- figures ---------------------------------------------------------------------------------------
    def density(self) -> float:
        """Kept weights / weights over the masked layers (exact counts of the current masks)."""
        kept = sum(int(m.count_nonzero()) for m in self.masks)
        return kept / sum(m.numel() for m in self.masks)

    def layer_densities(self) -> dict[str, float]:
        return {n: int(m.count_nonzero()) / m.numel() for n, m in zip(self.names, self.masks)}

    def unit_flops(self, partition: Any) -> list[float]:
        """Each unit's forward FLOPs per sample with its masked layers at their densities.

        ``F_l - sum over masked modules m of unit l of F_m * (1 - d_m)``, with ``F_m`` the module's own FLOPs
        that :func:`freezebench.units.partition` counted with ``torch.utils.flop_counter``.
        """
        return self.scaled_flops([u.flops for u in partition.units], partition.module_flops, partition.units)

    def scaled_flops(self, unit_flops: Sequence[float], module_flops: Mapping[str, float],
                     units: Sequence[Any]) -> list[float]:
        """:meth:`unit_flops` for given dense unit FLOPs and module FLOPs of ``units`` (the same units at another
        input size: a text batch's padded length, :class:`freezebench.trainer.batches.LengthCost`)."""
        unit_of = {id(m): u.index for u in units for m in u.modules}
        flops = [float(f) for f in unit_flops]
        for name, m, kept, p in zip(self.names, self.modules, self.kept, self.params):
            i = unit_of.get(id(m))
            if i is None:
                continue
            d = kept / p.numel()
            flops[i] -= module_flops.get(name, 0.0) * (1.0 - d)
        return [max(0.0, f) for f in flops]

    # --- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.detach().bool().cpu() for n, m in zip(self.names, self.masks)},
                "updates": self.updates, "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, n in enumerate(self.names):
            self.masks[i] = state["masks"][n].to(self.params[i].device, self.params[i].dtype)
        self.updates = int(state["updates"])
        self.gen.set_state(state["generator"])
        self.apply()


def build_sparsity(cfg: Any, model: nn.Module, units: Sequence[Any], optimizer: torch.optim.Optimizer,
                   total_steps: int, seed: int) -> Sparsity | None:
    """The trainer's sparse-training feature, or ``None`` when ``sparsity.enabled`` is false."""
    if not cfg.enabled:
        return None
    return Sparsity(cfg, model, units, optimizer, total_steps, seed)
