"""Frozen-prefix cache benchmark: epoch time and memory with the prefix cached, against the alternatives.

    python benchmarks/bench_cache.py                                   # resnet20, half the units frozen, CPU
    python benchmarks/bench_cache.py --models resnet20,resnet18 --fraction 0.5 --repeats 7 --threads 1
    python benchmarks/bench_cache.py --device cuda --precision bf16 --channels-last --models resnet50 \\
        --batch-size 256 --steps 40                                    # GPU: images/s full / frozen / cached

Per model, all from the same seed and the same synthetic CIFAR-shaped data (``--steps`` full batches, the
whole training set every epoch, so that after the first epoch every sample is cached), SGD (lr 0.05
constant, momentum 0.9, wd 5e-4):

* ``full``: the trainer, nothing frozen;
* ``frozen``: the trainer with ``policy=static policy.at_step=0 policy.fraction=f`` (a prefix frozen, no cache);
* ``cached``: the same with ``trainer.cache_frozen_prefix=true`` (``--cache-dtype``, ``--cache-location``);
  its untimed warm-up epochs fill the cache, so the timed epochs serve every sample from it;
* ``suffix``: the lower bound: a bare PyTorch loop training only the part of the network after the frozen
  prefix (``ModelSplit.segment(k, None)``) on its inputs precomputed once (fp32, held on the device), same
  batches, same optimiser on the trainable parameters.

Figures: ``cached_vs_suffix`` (median paired ratio of epoch times; target <= 1.1), ``cached_vs_frozen`` and
``cached_vs_full``; ``images_per_s`` per variant; memory: ``saved_activation_mb`` (bytes autograd saves for
the backward pass in one step, counted with ``saved_tensors_hooks``: the activation memory freezing and
caching remove, on any device) and, on CUDA, ``peak_allocated_mb`` (``torch.cuda.max_memory_allocated``
over a timed epoch) and the cache's own size ``cache_mb``. Timed epochs are interleaved in an order rotated
every round, as in ``bench_step.py``; medians over rounds. Ends with one line ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

import bench_step
from bench_step import load_avg, machine_info, measure, sync
from freezebench.config import load_config
from freezebench.zoo.data import build_data
from freezebench.trainer import Trainer, resolve_device

NUM_CLASSES = 10
VAL_SAMPLES = 20


def overrides(args: argparse.Namespace, model: str, policy: list[str]) -> list[str]:
    samples = args.steps * args.batch_size + VAL_SAMPLES
    return [
        "tracking.enabled=false", "trainer.progress=false", "trainer.eval_every=0", "trainer.save_checkpoint=false",
        *policy, f"model.name={model}",
        "data.name=synthetic", f"data.synthetic_size={args.image_size}", "data.synthetic_channels=3",
        f"data.synthetic_classes={NUM_CLASSES}", f"data.synthetic_samples={samples}",
        f"data.val_fraction={VAL_SAMPLES / samples!r}", f"data.batch_size={args.batch_size}",
        "trainer.epochs=1", f"trainer.device={args.device}", f"trainer.precision={args.precision}",
        f"trainer.channels_last={str(args.channels_last).lower()}", "trainer.seed=0",
        "schedule.name=constant", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
    ]


class Suffix:
    """A bare loop training the suffix after cut ``k`` on inputs precomputed once (the cache's lower bound)."""

    def __init__(self, trainer: Trainer, k: int, args: argparse.Namespace):
        from freezebench.features.cache import ModelSplit

        self.model = copy.deepcopy(trainer.model)
        self.device = trainer.device
        units = trainer.units
        named = dict(self.model.named_parameters())
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        for u in units[:k]:
            for p in u.parameters:
                named[names[id(p)]].requires_grad_(False)
        copy_units = [copy.copy(u) for u in units]
        mods = dict(self.model.named_modules())
        for u in copy_units:
            u.modules = [mods[n] for n in u.module_names]
        split = ModelSplit(self.model, copy_units)
        self.model.eval()  # precompute with the prefix as it runs frozen (BatchNorm in eval mode)
        loader = trainer.data.train
        with torch.no_grad():
            vals = [split.segment(0, k)(loader.unaugmented(torch.arange(i, min(i + 512, loader.num_samples)))[0])
                    for i in range(0, loader.num_samples, 512)]
        self.inputs = [torch.cat([v[j] for v in vals]).float() for j in range(len(vals[0]))]
        if args.channels_last and self.device.type == "cuda":
            self.inputs = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in self.inputs]
        self.suffix = split.segment(k, None)
        self.model.train()
        self.frozen_norms = [mods[n] for u in units[:k] for n in u.module_names
                             if isinstance(mods[n], torch.nn.modules.batchnorm._NormBase)]
        for m in self.frozen_norms:  # frozen units' norm layers stay in eval mode, as the freezer keeps them
            m.eval()
        self.val = trainer.data.val
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.loader = loader
        self.steps = args.steps
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def epoch(self) -> float:
        self.loader.set_epoch(0)
        sync(self.device)
        t0 = time.perf_counter()
        for b, (_x, y, idx) in enumerate(self.loader):
            if b >= self.steps:
                break
            ins = [t.index_select(0, idx) for t in self.inputs]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out = self.suffix(*ins)
            loss = F.cross_entropy(out.float(), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        sync(self.device)
        t = (time.perf_counter() - t0) / self.steps
        self.evaluate()
        return t

    @torch.no_grad()
    def evaluate(self) -> None:
        """Untimed, like the evaluation each trainer's ``end_epoch()`` runs after its epoch (so CPU times compare)."""
        self.model.eval()
        for x, y, _ in self.val:
            F.cross_entropy(self.model(x), y, reduction="sum")
        self.model.train()
        for m in self.frozen_norms:
            m.eval()


def trainer_epoch(t: Trainer, steps: int) -> float:
    return t.end_epoch(0, t.train_epoch(0))["time/train_s"] / steps


def saved_activation_bytes(fn: Any) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (parameters excluded)."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def one_step_loss(t: Trainer | Suffix) -> None:
    """One forward (no backward, no update) of a trainer's or the suffix loop's first batch."""
    if isinstance(t, Suffix):
        t.loader.set_epoch(0)
        _x, y, idx = next(iter(t.loader))
        with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
            F.cross_entropy(t.suffix(*[v.index_select(0, idx) for v in t.inputs]).float(), y)
        return
    t.data.train.set_epoch(0)
    x, y, idx = next(iter(t.train_batches()))
    with t.autocast():
        out = t.forward(x, idx)
    F.cross_entropy(out.float(), y)


def bench_model(args: argparse.Namespace, model: str, device: torch.device) -> dict[str, Any]:
    cfg_full = load_config(overrides(args, model, ["policy=full"]))
    data = build_data(cfg_full.data, seed=0, device=device)
    static = ["policy=static", "policy.at_step=0", f"policy.fraction={args.fraction}"]
    full = Trainer(cfg_full, data=data)
    frozen = Trainer(load_config(overrides(args, model, static)), data=data)
    cached = Trainer(load_config(overrides(args, model, static + [
        "trainer.cache_frozen_prefix=true", f"trainer.cache_dtype={args.cache_dtype}",
        f"trainer.cache_location={args.cache_location}"])), data=data)
    for t in (frozen, cached):
        t.initial_decision()  # the static freeze at step 0, before building the suffix loop
    k = frozen.freezer.frozen_prefix()
    suffix = Suffix(frozen, k, args)
    variants = {"full": lambda: trainer_epoch(full, args.steps), "frozen": lambda: trainer_epoch(frozen, args.steps),
                "cached": lambda: trainer_epoch(cached, args.steps), "suffix": suffix.epoch}
    names = list(variants)
    print(f"\n== {model}: {len(full.units)} units, prefix of {k} frozen (fraction {args.fraction}), batch "
          f"{args.batch_size}, {args.steps} steps per epoch, {args.repeats} rounds", flush=True)
    for _ in range(args.warmup):  # the first cached epoch fills the cache
        for n in names:
            variants[n]()
    assert cached.cache is not None
    assert (cached.cache.level == k).all(), "internal error: not every sample is cached after the warm-up"
    mem: dict[str, dict[str, float]] = {n: {} for n in names}
    for n, obj in (("full", full), ("frozen", frozen), ("cached", cached), ("suffix", suffix)):
        mem[n]["saved_activation_mb"] = saved_activation_bytes(lambda o=obj: one_step_loss(o)) / 2**20
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # this process's CPU seconds per step (see bench_step)
    others: dict[str, list[float | None]] = {n: [] for n in names}
    for r in range(args.repeats):
        j = r % len(names)
        for n in names[j:] + names[:j]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            v, busy, _ = measure(variants[n])
            if device.type == "cuda":
                mem[n]["peak_allocated_mb"] = max(mem[n].get("peak_allocated_mb", 0.0),
                                                  torch.cuda.max_memory_allocated(device) / 2**20)
            times[n].append(v)
            cpu[n].append(bench_step.LAST_OWN_CPU_S / args.steps)
            others[n].append(busy)
        print(f"round {r + 1}/{args.repeats} (ms/step)  " + "  ".join(f"{n} {times[n][-1] * 1e3:7.1f}" for n in names),
              flush=True)

    def paired(a: str, b: str) -> float:
        return statistics.median(times[a][r] / times[b][r] for r in range(args.repeats))

    def paired_cpu(a: str, b: str) -> float:
        return statistics.median(cpu[a][r] / cpu[b][r] for r in range(args.repeats))

    med = {n: statistics.median(times[n]) for n in names}
    cost = cached.cost
    fz = cached.freezer.frozen
    res = {
        "units": len(full.units), "prefix_units": k, "fraction": args.fraction,
        "ms_per_step": {n: med[n] * 1e3 for n in names},
        "epoch_s": {n: med[n] * args.steps for n in names},
        "images_per_s": {n: args.batch_size / med[n] for n in names},
        "cached_vs_suffix": paired("cached", "suffix"),
        "cached_vs_frozen": paired("cached", "frozen"),
        "cached_vs_full": paired("cached", "full"),
        "frozen_vs_full": paired("frozen", "full"),
        "cpu_time": {"cached_vs_suffix": paired_cpu("cached", "suffix"), "cached_vs_frozen": paired_cpu("cached", "frozen"),
                     "cached_vs_full": paired_cpu("cached", "full"), "frozen_vs_full": paired_cpu("frozen", "full"),
                     "ms_per_step": {n: statistics.median(cpu[n]) * 1e3 for n in names}},
        "predicted": {"frozen_vs_full": cost.step_flops(fz) / cost.full_step_flops,
                      "cached_vs_full": cost.step_flops(fz, k) / cost.full_step_flops},
        "memory": mem,
        "cache_mb": cached.cache.nbytes / 2**20,
        "cache_values_per_sample": len(cached.cache.levels[k].buffers),
        "raw_s_per_step": times, "raw_cpu_s_per_step": cpu, "raw_other_cpus": others,
    }
    print(f"-- {model}: cached/suffix {res['cached_vs_suffix']:.3f} (target <= 1.1), cached/frozen "
          f"{res['cached_vs_frozen']:.3f}, cached/full {res['cached_vs_full']:.3f} (predicted "
          f"{res['predicted']['cached_vs_full']:.3f}), frozen/full {res['frozen_vs_full']:.3f} (predicted "
          f"{res['predicted']['frozen_vs_full']:.3f}); images/s " +
          ", ".join(f"{n} {v:.0f}" for n, v in res["images_per_s"].items()), flush=True)
    c = res["cpu_time"]
    print(f"   cpu-time: cached/suffix {c['cached_vs_suffix']:.3f}, cached/frozen {c['cached_vs_frozen']:.3f}, "
          f"cached/full {c['cached_vs_full']:.3f}, frozen/full {c['frozen_vs_full']:.3f}", flush=True)
    print(f"   memory: " + "; ".join(f"{n} " + ", ".join(f"{kk} {vv:.1f}" for kk, vv in m.items())
                                    for n, m in mem.items()) + f"; cache {res['cache_mb']:.1f} MiB", flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the freezable units frozen (a prefix)")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch (the training set is steps x batch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cache-dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--cache-location", default="device", choices=("device", "cpu", "disk"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = machine_info(device)
    machine["load_avg_start"] = load_avg()
    t0 = time.perf_counter()
    results = {m.strip(): bench_model(args, m.strip(), device) for m in args.models.split(",") if m.strip()}
    machine["load_avg_end"] = load_avg()
    out = {"benchmark": "bench_cache", "settings": vars(args), "machine": machine,
           "elapsed_s": time.perf_counter() - t0, "results": results}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
