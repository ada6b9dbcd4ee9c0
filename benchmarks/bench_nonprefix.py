"""Non-prefix freezing never makes a step slower: model steps with middle units frozen vs none, in CPU time.

    python benchmarks/bench_nonprefix.py                                   # resnet20, 25 and 50% of units
    python benchmarks/bench_nonprefix.py --models resnet20,mobilenet_v2 --fractions 0.25,0.5 --reps 25
    python benchmarks/bench_nonprefix.py --device cuda --models resnet50   # GPU: synchronised wall time

SmartFRZ freezes units in the middle of the network, so the backward pass still runs through them (their
input gradients are needed by the trainable units before them); only their weight gradients, BatchNorm
statistics and optimiser updates are saved. This isolates one optimiser step (forward, cross-entropy,
``zero_grad``, backward, ``SGD.step`` with the trainer's one param group per unit) of the same model and
batch, frozen through :class:`~freezebench.trainer.freezer.Freezer` exactly as the trainer freezes, for:

* ``none``: nothing frozen;
* ``mid``: ``fraction`` of the freezable units, centred, frozen (weights, BatchNorm in eval mode, optimiser);
* ``mid_bn_train``: the same units without gradients but their BatchNorm layers left in training mode (to
  see what eval-mode normalisation costs or saves).

Variants are interleaved step by step; on CPU the time is the thread's CPU time (``time.thread_time``, one
torch thread), which other processes sharing the cores barely disturb; on CUDA synchronised wall time.
Figures: median per-step time and the median paired ratio to ``none`` against the cost model's
``step_flops(frozen) / full_step_flops``. Ends with ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench_step import load_avg, machine_info
from freezebench.cost import CostModel
from freezebench.trainer.freezer import Freezer, param_groups
from freezebench.zoo.models import build_model
from freezebench.trainer import resolve_device
from freezebench.units import example_batch, partition


def variant(m0: torch.nn.Module, which: str, frac: float, device: torch.device) -> tuple:
    m = copy.deepcopy(m0).to(device)
    part = partition(m, example_batch(3, 32).to(device), "layer")
    units = part.units
    opt = torch.optim.SGD(param_groups(units, part.other_params), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fr = Freezer(m, units, opt)
    n_free = len(units) - 1
    n = int(frac * n_free)
    start = (n_free - n) // 2
    frozen = list(range(start, start + n)) if which != "none" else []
    fr.freeze(frozen, 0, 0.0)
    fr.train_mode()
    if which == "mid_bn_train":
        for i in frozen:
            for mod in units[i].norm_modules:
                mod.train()
    cost = CostModel([u.flops for u in units], part.other_flops)
    return m, opt, cost.step_flops(frozen) / cost.full_step_flops, frozen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20")
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    machine = machine_info(device)
    machine["load_avg_start"] = load_avg()
    results: dict = {}
    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        m0 = build_model(name, num_classes=10, in_channels=3, image_size=32)
        for frac in [float(f) for f in args.fractions.split(",")]:
            vs = {k: variant(m0, k, frac, device) for k in ("none", "mid", "mid_bn_train")}

            def step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = clock()
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return clock() - t

            for k in vs:  # warm-up
                step(*vs[k][:2])
                step(*vs[k][:2])
            times: dict[str, list[float]] = {k: [] for k in vs}
            for r in range(args.reps):
                order = list(vs)[r % 3:] + list(vs)[:r % 3]
                for k in order:
                    times[k].append(step(*vs[k][:2]))
            ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["none"])) for k in vs}
            row = {"frozen_units": vs["mid"][3], "predicted_ratio": vs["mid"][2],
                   "ms_per_step": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                   "ratio_to_none": ratio, "raw_s": times}
            results[f"{name}@{frac:g}"] = row
            print(f"{name} middle {frac:g} (units {row['frozen_units'][0]}..{row['frozen_units'][-1]}): "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms_per_step"].items())
                  + f"; mid/none {ratio['mid']:.3f}, mid_bn_train/none {ratio['mid_bn_train']:.3f}, "
                    f"predicted {row['predicted_ratio']:.3f}", flush=True)
    machine["load_avg_end"] = load_avg()
    print("RESULT " + json.dumps({"benchmark": "bench_nonprefix", "settings": vars(args), "machine": machine,
                                  "timing": "thread CPU time" if device.type == "cpu" else "synchronised wall time",
                                  "results": results}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
