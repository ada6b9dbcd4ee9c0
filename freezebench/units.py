"""Freezable units: partition any ``nn.Module`` into the things a policy can freeze, in forward order.

A *unit* is the smallest thing a policy freezes. Units are found generically from one traced forward
pass (module hooks), so any ``nn.Module`` works, not only the zoo:

* granularity ``layer`` (default): every module that owns parameters directly (a conv, a linear, an
  attention block's projections, an embedding...) is an op; a normalisation layer whose input *is* the
  output of the op just executed (conv -> BatchNorm, linear -> LayerNorm) joins that op's unit, as in the
  SmartFRZ paper, which freezes a conv and its BatchNorm together. A norm layer fed by anything else (a
  pre-norm transformer's LayerNorm reading the residual stream) is a unit of its own.
* granularity ``block``: layer units are grouped by their *block*: the outermost enclosing module whose
  parent is an ``nn.Sequential``/``nn.ModuleList``/``nn.ModuleDict`` (a ResNet ``BasicBlock``, a ViT
  ``EncoderBlock``, a MobileNet ``InvertedResidual``). Ops outside any container stay units of their own.
  A model may declare its blocks itself: a method ``freezebench_blocks()`` returning a list of blocks, each
  a list of qualified module names (a module belongs to the first block naming it or an ancestor; the
  block's output is its last named module's). The text models do (:mod:`freezebench.zoo.text`): a BERT's
  blocks are its embeddings, each encoder layer, and the pooler with the classifier as the head. Likewise
  ``freezebench_layer_units()`` names modules kept whole at layer granularity (a BERT's embeddings: word,
  position and segment embeddings and their LayerNorm are one unit, whose output is per input).

The last unit in forward order is the classifier head and is never frozen. Parameters of modules that
never ran in the traced forward (e.g. ``MultiheadAttention.out_proj``, used functionally) join the unit of
their nearest traced ancestor; parameters with no traced ancestor are kept in ``Partition.other`` (always
trained, reported).

Each unit carries its forward FLOPs per sample counted by ``torch.utils.flop_counter`` on one traced batch
(2 FLOPs per multiply-add; matmul/conv/attention kernels only, as the counter defines them), in a
*training-mode* forward (:func:`training_trace`): an eval-mode trace would send ``nn.MultiheadAttention``
down PyTorch's fused fast path, which the counter does not see. FLOPs of a
module are *exclusive* of nested ops that form units of their own; the FLOPs of a parameterless module that
calls units (a Hugging Face self-attention's scores and weighted values) join the unit of the last one it ran.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError

log = logging.getLogger(__name__)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
GRANULARITIES = ("layer", "block")


@dataclass
class Unit:
    """One freezable unit."""

    index: int  # position in forward order, 0..L-1
    name: str  # qualified name of its first module ("layer1.0.conv1", or the block's name)
    module_names: list[str]
    modules: list[nn.Module] = field(repr=False)
    param_names: list[str]
    parameters: list[nn.Parameter] = field(repr=False)
    norm_modules: list[nn.Module] = field(repr=False)  # put in eval mode when the unit is frozen
    flops: float = 0.0  # forward FLOPs per sample
    is_head: bool = False  # the classifier head: never frozen
    output_module: nn.Module | None = field(default=None, repr=False)  # whose output is the unit's output

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters)


@dataclass
class Partition:
    """A model cut into units, with the FLOPs nobody owns (always paid in the forward pass)."""

    units: list[Unit]
    granularity: str
    other_params: list[nn.Parameter] = field(default_factory=list, repr=False)
    other_flops: float = 0.0  # forward FLOPs per sample outside every unit
    # forward FLOPs per sample of every module (qualified name, sub-modules included), from the same pass
    module_flops: dict[str, float] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __getitem__(self, i: int) -> Unit:
        return self.units[i]

    @property
    def total_params(self) -> int:
        return sum(u.num_params for u in self.units) + sum(p.numel() for p in self.other_params)

    def table(self) -> str:
        """A human-readable table of the units."""
        rows = [f"{'#':>3}  {'unit':<40} {'params':>10} {'MFLOPs/sample':>14}"]
        for u in self.units:
            head = "  (head)" if u.is_head else ""
            rows.append(f"{u.index:>3}  {u.name:<40} {u.num_params:>10,} {u.flops / 1e6:>14.3f}{head}")
        return "\n".join(rows)


def _owns_params(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES)


def _parent_name(name: str) -> str | None:
    if name == "":
        return None
    return name.rpartition(".")[0]


@contextlib.contextmanager
def training_trace(model: nn.Module) -> Iterator[None]:
    """Run a forward of ``model`` as training runs it, then put everything back as it was.

    The trace must see the kernels a *training* step executes: in eval mode under ``no_grad``,
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take PyTorch's fused fast path
    (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``), which
    ``FlopCounterMode`` does not count, so attention FLOPs came out as zero. So the model runs in training
    mode with autograd on; what that changes is restored afterwards: every module's own training flag (the
    freezer keeps frozen norm layers in eval mode), every buffer (BatchNorm running statistics and
    ``num_batches_tracked``) and the random number generators dropout draws from (CPU and the CUDA devices
    the model lives on).
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b in [*model.parameters(), *model.buffers()] if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            model.train()
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag


def partition(model: nn.Module, example: torch.Tensor, granularity: str = "layer") -> Partition:
    """Cut ``model`` into units by tracing one forward pass on ``example`` (a batch of inputs).

    The trace is a training-mode forward (:func:`training_trace`), so each unit's FLOPs are those a training
    step executes; the model's training flags, buffers (BatchNorm statistics) and random states are left
    unchanged.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    named = dict(model.named_modules())
    names_of = {id(m): n for n, m in named.items()}
    candidates = {n for n, m in named.items() if _owns_params(m) or _is_norm(m)}

    order: list[str] = []  # candidate modules in order of first call
    follows: dict[str, str] = {}  # norm module -> op whose output it consumed
    last_outputs: dict[int, str] = {}  # id(output tensor) -> op module name
    keep_alive: list[torch.Tensor] = []
    handles = []

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        name = names_of[id(mod)]
        if name not in candidates or name in order:
            return
        order.append(name)
        if _is_norm(mod) and args and isinstance(args[0], torch.Tensor) and id(args[0]) in last_outputs:
            follows[name] = last_outputs[id(args[0])]

    def post_hook(mod: nn.Module, args: tuple, out: object) -> None:
        name = names_of[id(mod)]
        if name in candidates and isinstance(out, torch.Tensor) and not _is_norm(mod):
            last_outputs[id(out)] = name
            keep_alive.append(out)

    for m in named.values():
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(post_hook))
    if isinstance(example, dict):  # a text batch: {input_ids, attention_mask} (freezebench.zoo.text)
        batch = next(iter(example.values())).shape[0]
    elif example.shape[0] < 2:  # training-mode BatchNorm needs two values per channel
        example = torch.cat([example, example])
    try:
        with training_trace(model), FlopCounterMode(display=False) as counter:
            model(example)
    except RuntimeError as e:  # the model cannot take inputs of this shape (data.image_size, channels)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shape = tuple(next(iter(example.values())).shape[1:]) if isinstance(example, dict) else tuple(example.shape[1:])
        raise ConfigError(f"{type(model).__name__} cannot take inputs of shape {shape}: {first} "
                          "(check data.image_size and the model's input size)") from None
    finally:
        for h in handles:
            h.remove()
    batch = next(iter(example.values())).shape[0] if isinstance(example, dict) else example.shape[0]
    root = type(model).__name__
    inclusive = {
        (k[len(root) + 1 :] if k.startswith(root + ".") else ("" if k == root else None)): float(sum(v.values()))
        for k, v in counter.get_flop_counts().items()
        if k != "Global"
    }
    inclusive.pop(None, None)
    total_flops = float(counter.get_total_flops())

    # --- layer units: ops, each followed by the norm layer that consumed its output ----------------------
    groups: list[list[str]] = []
    group_of: dict[str, int] = {}
    for name in order:
        if name in follows and follows[name] in group_of:
            g = group_of[follows[name]]
            groups[g].append(name)
        else:
            g = len(groups)
            groups.append([name])
        group_of[name] = g

    # modules with parameters that never ran: join the nearest traced ancestor's group
    other_params: list[nn.Parameter] = []
    for name in candidates:
        if name in group_of:
            continue
        anc = _parent_name(name)
        while anc is not None and anc not in group_of:
            anc = _parent_name(anc)
        if anc is None:
            if any(True for _ in named[name].parameters(recurse=False)):
                log.warning("parameters of %r never ran in the traced forward: trained, never frozen", name)
                other_params.extend(named[name].parameters(recurse=False))
            continue
        groups[group_of[anc]].append(name)
        group_of[name] = group_of[anc]

    ran = set(order)
    declared = model.freezebench_blocks() if callable(getattr(model, "freezebench_blocks", None)) else None
    layer_groups = model.freezebench_layer_units() if callable(getattr(model, "freezebench_layer_units", None)) \
        else None
    if granularity == "block" and declared:
        groups, group_names, outputs = _declared_blocks(groups, named, declared)
    elif granularity == "block":
        groups, group_names = _merge_blocks(groups, named)
        outputs = [named[n if n != "<root>" else ""] for n in group_names]
    elif layer_groups:  # modules the model keeps whole at layer granularity too (a BERT's embeddings)
        groups, group_names, outputs = _declared_blocks(groups, named, layer_groups,
                                                        own_output=lambda g: named[[n for n in g if n in ran][-1]])
    else:
        group_names = [g[0] or "<root>" for g in groups]
        outputs = [named[[n for n in g if n in ran][-1]] for g in groups]

    # --- FLOPs: exclusive of nested ops that are units (or parts of units) of their own ------------------
    member = {n for g in groups for n in g}

    def exclusive(name: str) -> float:
        own = inclusive.get(name, 0.0)
        prefix = name + "." if name else ""
        nested = [n for n in member if n != name and n.startswith(prefix)]
        # subtract only the outermost nested members (their inclusive counts contain the deeper ones)
        outer = [n for n in nested if not any(o != n and n.startswith(o + ".") for o in nested)]
        return own - sum(inclusive.get(n, 0.0) for n in outer)

    # FLOPs of parameterless modules outside every unit that call units (a Hugging Face self-attention: the
    # attention scores and weighted values between its query/key/value projections and the output) join the
    # unit of the last unit op they ran, so that a training step counts their backward pass too
    final_of = {n: i for i, g in enumerate(groups) for n in g}
    ran_members = [n for n in order if n in final_of]
    extra = [0.0] * len(groups)
    for name in inclusive:
        if not name or name in final_of or any(name.startswith(m + ".") for m in member if m):
            continue
        inner = [k for k in inclusive if k and k.startswith(name + ".")]  # modules that ran (a ModuleList never does)
        outer = [k for k in inner if not any(k.startswith(o + ".") for o in inner)]
        own = inclusive[name] - sum(inclusive[k] for k in outer)
        desc = [n for n in ran_members if n.startswith(name + ".")]
        if own > 0 and desc:
            extra[final_of[desc[-1]]] += own

    units: list[Unit] = []
    seen_params: set[int] = set()
    for i, g in enumerate(groups):
        params, pnames, norms = [], [], []
        for n in g:
            mod = named[n]
            if _is_norm(mod):
                norms.append(mod)
            for pn, p in mod.named_parameters(recurse=False):
                if id(p) in seen_params:  # shared (tied) parameter: owned by its first unit
                    continue
                seen_params.add(id(p))
                params.append(p)
                pnames.append(f"{n}.{pn}" if n else pn)
        flops = (sum(exclusive(n) for n in g) + extra[i]) / batch
        units.append(
            Unit(
                index=i,
                name=group_names[i],
                module_names=list(g),
                modules=[named[n] for n in g],
                param_names=pnames,
                parameters=params,
                norm_modules=norms,
                flops=flops,
                output_module=outputs[i],
            )
        )
    if not units:
        raise ConfigError(f"{root} has no parameterised modules: nothing to train or freeze")
    units[-1].is_head = True
    attributed = sum(u.flops for u in units)
    other = max(0.0, total_flops / batch - attributed)
    return Partition(units=units, granularity=granularity, other_params=other_params, other_flops=other,
                     module_flops={k: v / batch for k, v in inclusive.items()})


def _block_owner(name: str, named: dict[str, nn.Module]) -> str:
    """Outermost enclosing module (or itself) whose parent is a container; else the module itself."""
    owner = name
    cur = name
    while cur:
        parent = _parent_name(cur)
        if parent is not None and isinstance(named[parent], _CONTAINERS):
            owner = cur
        cur = parent or ""
    return owner


def _merge_blocks(groups: list[list[str]], named: dict[str, nn.Module]) -> tuple[list[list[str]], list[str]]:
    merged: list[list[str]] = []
    owners: list[str] = []
    index: dict[str, int] = {}
    for g in groups:
        owner = _block_owner(g[0], named)
        if owner in index:
            merged[index[owner]].extend(g)
        else:
            index[owner] = len(merged)
            merged.append(list(g))
            owners.append(owner or "<root>")
    return merged, owners


def _declared_blocks(groups: list[list[str]], named: dict[str, nn.Module], blocks: Sequence[Sequence[str]],
                     own_output: Any = None) -> tuple[list[list[str]], list[str], list[nn.Module]]:
    """Layer groups merged into the blocks a model declares (``freezebench_blocks()`` or, at layer granularity,
    ``freezebench_layer_units()``); groups no block names stay units of their own (output: ``own_output(g)``,
    by default the group's first module)."""
    def block_of(name: str) -> int | None:
        for b, prefixes in enumerate(blocks):
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                return b
        return None

    merged: list[list[str]] = []
    names: list[str] = []
    outputs: list[nn.Module] = []
    index: dict[Any, int] = {}
    for g in groups:
        b = block_of(g[0])
        key = ("block", b) if b is not None else ("own", g[0])
        if key in index:
            merged[index[key]].extend(g)
            continue
        index[key] = len(merged)
        merged.append(list(g))
        if b is None:
            names.append(g[0] or "<root>")
            outputs.append(own_output(g) if own_output is not None else named[g[0]])
        else:
            names.append("+".join(blocks[b]))
            outputs.append(named[blocks[b][-1]])
    return merged, names, outputs


def capture_outputs(model: nn.Module, units: Sequence[Unit], indices: Iterable[int], x: torch.Tensor,
                    autocast: Any = None) -> dict[int, torch.Tensor]:
    """Outputs of ``units[i]`` for ``i`` in ``indices`` on input ``x``, flattened per input, as float32.

    Runs ``model`` in eval mode under ``torch.no_grad`` (``autocast``: an optional context manager) and
    restores its training flag (not the per-module flags: callers re-apply their own modes).
    """
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in indices:
        def hook(_m: nn.Module, _a: Any, o: Any, i: int = i) -> None:
            t = o[0] if isinstance(o, (tuple, list)) else o
            out[i] = t.detach().float().reshape(t.shape[0], -1)

        handles.append(units[i].output_module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (autocast if autocast is not None else contextlib.nullcontext()):
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def example_batch(in_channels: int, image_size: int, batch: int = 2) -> torch.Tensor:
    """A deterministic input batch for tracing a model."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, in_channels, image_size, image_size, generator=g)
