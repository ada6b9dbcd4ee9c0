"""Compiled against eager training step time, side by side, under four freeze patterns (``trainer.compile``).

    python benchmarks/bench_compile.py --quick            # resnet20, CPU, 32x32 synthetic (< 5 min on 2 quiet CPUs)
    python benchmarks/bench_compile.py                    # more steps and rounds, FreezeOut's whole schedule
    python benchmarks/bench_compile.py --device cuda --model resnet50 --image-size 224 --batch-size 64 \\
        --precision bf16 --channels-last                  # GPU

Every pattern trains two trainers built from the same seed on the same synthetic data (``--steps`` full
batches per epoch, SGD lr 0.05 constant, momentum 0.9, wd 5e-4): one eager, one with ``trainer.compile=true``
(:mod:`freezebench.features.compile`). Patterns:

* ``full``: nothing frozen;
* ``static_prefix``: ``policy=static``, a prefix of ``--fraction`` of the freezable units frozen after the
  first epoch: the first compiled epoch compiles the full graph, the second recompiles for the frozen set;
* ``nonprefix``: a block of ``--fraction`` of the units in the middle frozen before the first step (the
  SmartFRZ-like pattern: frozen units still run forward, only their backward is skipped);
* ``freezeout_linear``: the real FreezeOut schedule (block granularity), units freezing one after another
  while the timed epochs run (``--quick``: the schedule's first 75 %, i.e. its first freeze events).

Method. Epochs are one ``Trainer.train_epoch`` + ``end_epoch`` each (as in ``bench_step.py``; every epoch the
same batches), the eager and the compiled epoch of a pattern interleaved in an order rotated every round. A
compiled epoch's
``time/train_s`` excludes its compile time, which the trainer reports as ``time/compile_s``. For ``full``,
``static_prefix`` and ``nonprefix``: the compile epochs, then ``--warmup`` untimed epochs, then ``--repeats``
timed rounds; ``compiled_over_eager`` is the median paired ratio of step times. For ``freezeout_linear`` each
epoch is one round (its frozen set changes over them) and the ratio is that of the summed training times.
``break_even_steps`` = compile seconds / (eager - compiled seconds per step): the steps after which the
compiled run has caught up, compile time included (none when compiled is not faster).

Compile caches: inductor's on-disk caches go to a fresh temporary folder (unless ``--warm-cache``), so the
first compile is a cold one; later compiles in the same run may hit what earlier ones stored (the
``static_prefix`` pattern's first, unfrozen graph is the ``full`` pattern's), as they would in real use.

Ends with one line ``RESULT <json>`` holding ``compiled_over_eager`` (steady state, full training),
``recompiles`` (over all compiled runs), ``freeze_events``, ``fallbacks`` and the per-pattern figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

import bench_step
from bench_step import load_avg, machine_info
from freezebench import metrics as M
from freezebench.config import load_config
from freezebench.trainer import Trainer, resolve_device
from freezebench.zoo.data import build_data

PATTERNS = ("full", "static_prefix", "nonprefix", "freezeout_linear")


def base_overrides(args: argparse.Namespace, policy: list[str]) -> list[str]:
    o = bench_step.overrides(args, args.model, args.steps, policy)
    o += [f"trainer.precision={args.precision}", f"trainer.channels_last={str(args.channels_last).lower()}",
          "trainer.checkpoint_every=0", "trainer.save_checkpoint=false"]
    return o


def compile_overrides(args: argparse.Namespace) -> list[str]:
    return ["trainer.compile=true", f"trainer.compile_backend={args.backend}", f"trainer.compile_mode={args.mode}"]


def one_epoch(trainer: Trainer, steps: int) -> tuple[float, float]:
    """(seconds per step, compile seconds) of one epoch (``train_epoch`` + ``end_epoch``, as bench_step), from
    the trainer's own metrics; every epoch is epoch 0 (the same batches), the step count goes on."""
    m = trainer.end_epoch(0, trainer.train_epoch(0))
    return m[M.TIME_TRAIN_S] / steps, m.get(M.TIME_COMPILE_S, 0.0)


def single_epoch_plan(trainer: Trainer) -> None:
    """Make every epoch the trainer's last (evaluated, as in bench_step) while the policy keeps the plan it
    was set up with (FreezeOut's schedule spans the planned epochs)."""
    trainer.plan = dataclasses.replace(trainer.plan, epochs=1)


def build_pair(args: argparse.Namespace, data: Any, policy: list[str], epochs: int = 1) -> tuple[Trainer, Trainer]:
    extra = [f"trainer.epochs={epochs}"]
    eager = Trainer(load_config([*base_overrides(args, policy), *extra]), data=data)
    comp = Trainer(load_config([*base_overrides(args, policy), *extra, *compile_overrides(args)]), data=data)
    for a, b in zip(eager.model.parameters(), comp.model.parameters()):
        if not torch.equal(a, b):
            raise SystemExit("internal error: the eager and the compiled trainer start from different weights")
    single_epoch_plan(eager)
    single_epoch_plan(comp)
    return eager, comp


def compile_counts(trainer: Trainer) -> dict[str, float]:
    c = trainer.compiler
    assert c is not None
    return {"compiles": c.compiles, "recompiles": c.recompiles, "shape_recompiles": c.shape_recompiles,
            "fallbacks": c.fallbacks, "compile_total_s": c.compile_seconds,
            "freeze_events": len({e.step for e in trainer.freezer.events}),  # decisions that changed the set
            "frozen_unit_events": len(trainer.freezer.events)}


def weights_diff(a: Trainer, b: Trainer) -> float:
    return max((p.detach().float() - q.detach().float()).abs().max().item()
               for p, q in zip(a.model.parameters(), b.model.parameters()))


def break_even(compile_s: float, eager_step: float, comp_step: float) -> float | None:
    saved = eager_step - comp_step
    return compile_s / saved if saved > 0 else None


def steady(args: argparse.Namespace, name: str, eager: Trainer, comp: Trainer, compile_epochs: int) -> dict[str, Any]:
    """Compile epochs, warm-up, then interleaved timed rounds of one frozen set."""
    steps = args.steps
    compile_s: list[float] = []
    for _ in range(compile_epochs):
        one_epoch(eager, steps)
        compile_s.append(one_epoch(comp, steps)[1])
    for _ in range(args.warmup):
        one_epoch(eager, steps)
        compile_s.append(one_epoch(comp, steps)[1])
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    late_compile = 0.0  # compile seconds during timed epochs: should be 0 (the frozen set no longer changes)
    for r in range(args.repeats):
        order = [("eager", eager), ("compiled", comp)]
        for label, tr in (order if r % 2 == 0 else order[::-1]):
            t, c = one_epoch(tr, steps)
            times[label].append(t)
            late_compile += c
        print(f"  {name:<16} round {r + 1}/{args.repeats}: eager {times['eager'][-1] * 1e3:7.1f} ms/step  "
              f"compiled {times['compiled'][-1] * 1e3:7.1f} ms/step", flush=True)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    ratio = statistics.median(a / b for a, b in zip(times["compiled"], times["eager"]))
    first = compile_s[0]
    recompile = sum(compile_s[1:compile_epochs]) if compile_epochs > 1 else 0.0
    return {
        "eager_ms_per_step": e * 1e3, "compiled_ms_per_step": c * 1e3, "compiled_over_eager": ratio,
        "eager_images_per_s": args.batch_size / e, "compiled_images_per_s": args.batch_size / c,
        "compile_s": first, "recompile_s": recompile, "warmup_compile_s": sum(compile_s[compile_epochs:]),
        "timed_compile_s": late_compile, "break_even_steps": break_even(first + recompile, e, c),
        "frozen_units": sorted(comp.freezer.frozen), "counts": compile_counts(comp),
        "weights_max_abs_diff": weights_diff(eager, comp),
        "raw_s_per_step": times, "raw_compile_s": compile_s,
    }


def freezeout(args: argparse.Namespace, data: Any) -> dict[str, Any]:
    """FreezeOut's schedule over ``--freezeout-epochs`` planned epochs; each epoch one interleaved round."""
    plan_epochs = args.freezeout_epochs
    run_epochs = max(1, round(plan_epochs * (0.75 if args.quick else 1.0)))
    eager, comp = build_pair(args, data, ["policy=freezeout_linear", "model.granularity=block"], plan_epochs)
    rows = []
    for ep in range(run_epochs):
        order = [("eager", eager), ("compiled", comp)]
        res: dict[str, tuple[float, float]] = {}
        for label, tr in (order if ep % 2 == 0 else order[::-1]):
            res[label] = one_epoch(tr, args.steps)
        if sorted(eager.freezer.frozen) != sorted(comp.freezer.frozen):
            raise SystemExit("internal error: eager and compiled FreezeOut froze different units")
        rows.append({"epoch": ep + 1, "frozen_units": len(comp.freezer.frozen),
                     "eager_ms_per_step": res["eager"][0] * 1e3, "compiled_ms_per_step": res["compiled"][0] * 1e3,
                     "compile_s": res["compiled"][1]})
        print(f"  freezeout_linear epoch {ep + 1}/{run_epochs}: {len(comp.freezer.frozen)} units frozen; eager "
              f"{rows[-1]['eager_ms_per_step']:7.1f} ms/step  compiled {rows[-1]['compiled_ms_per_step']:7.1f} "
              f"ms/step  compile {rows[-1]['compile_s']:.1f} s", flush=True)
    e = sum(r["eager_ms_per_step"] for r in rows) / len(rows) / 1e3
    c = sum(r["compiled_ms_per_step"] for r in rows) / len(rows) / 1e3
    counts = compile_counts(comp)
    return {
        "planned_epochs": plan_epochs, "run_epochs": run_epochs, "epochs": rows,
        "eager_ms_per_step": e * 1e3, "compiled_ms_per_step": c * 1e3, "compiled_over_eager": c / e,
        "eager_images_per_s": args.batch_size / e, "compiled_images_per_s": args.batch_size / c,
        "compile_s": rows[0]["compile_s"], "recompile_s": sum(r["compile_s"] for r in rows[1:]),
        "break_even_steps": break_even(counts["compile_total_s"], e, c),
        "counts": counts, "weights_max_abs_diff": weights_diff(eager, comp),
    }


def run_pattern(args: argparse.Namespace, name: str, data: Any) -> dict[str, Any]:
    if name == "freezeout_linear":
        return freezeout(args, data)
    if name == "full":
        eager, comp = build_pair(args, data, ["policy=full"])
        return steady(args, name, eager, comp, compile_epochs=1)
    if name == "static_prefix":  # frozen at the end of the first epoch: the second compiled epoch recompiles
        eager, comp = build_pair(args, data, ["policy=static", f"policy.at_step={args.steps}",
                                              f"policy.fraction={args.fraction}"])
        return steady(args, name, eager, comp, compile_epochs=2)
    eager, comp = build_pair(args, data, ["policy=full"])  # nonprefix: a middle block frozen from the start
    n_free = len(eager.units) - 1
    n = max(1, int(args.fraction * n_free))
    start = (n_free - n) // 2
    for tr in (eager, comp):
        tr.freezer.freeze(range(start, start + n), step=0, epoch=0.0, reason="benchmark: middle units")
    return steady(args, name, eager, comp, compile_epochs=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated subset of {', '.join(PATTERNS)}")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (default 12; --quick: 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per pattern (default 7; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs after the compile epochs")
    p.add_argument("--freezeout-epochs", type=int, default=None,
                   help="FreezeOut's planned epochs (default 8; --quick: 4, of which the first 3 run)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the freezable units frozen")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (trainer.compile_backend)")
    p.add_argument("--mode", default="default", help="inductor mode (trainer.compile_mode)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk cache (default: a "
                                                             "fresh one, so compile times are cold)")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds, FreezeOut's first freeze events")
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 12)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.freezeout_epochs = args.freezeout_epochs or (4 if args.quick else 8)
    args.patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    bad = sorted(set(args.patterns) - set(PATTERNS))
    if bad:
        p.error(f"unknown pattern(s) {', '.join(bad)}; known: {', '.join(PATTERNS)}")
    if min(args.steps, args.repeats, args.freezeout_epochs) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --freezeout-epochs must be positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.warm_cache:  # before anything is compiled: inductor reads the variable when it first caches
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fb-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = machine_info(device)
    print(f"bench_compile: {args.model} {args.image_size}px batch {args.batch_size}, {args.steps} steps/epoch, "
          f"{args.repeats} rounds, on {machine['device_name']} ({machine['torch_threads']} torch threads), torch "
          f"{machine['torch_version']}, backend {args.backend}; load average {load_avg()}", flush=True)
    cfg = load_config(base_overrides(args, ["policy=full"]))
    data = build_data(cfg.data, seed=cfg.trainer.seed, device=device)
    load_start, t0 = load_avg(), time.perf_counter()
    patterns: dict[str, Any] = {}
    for name in args.patterns:
        t_p = time.perf_counter()
        patterns[name] = run_pattern(args, name, data)
        patterns[name]["elapsed_s"] = time.perf_counter() - t_p
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t0
    machine["load_avg_start"], machine["load_avg_end"] = load_start, load_avg()

    print(f"\nsummary ({elapsed:.0f}s): {'pattern':<16} {'eager ms':>9} {'compiled ms':>11} {'ratio':>6} "
          f"{'compile s':>9} {'recompile s':>11} {'recompiles':>10} {'events':>6} {'break-even':>10}")
    for name, r in patterns.items():
        be = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
        print(f"  {'':<14}{name:<16} {r['eager_ms_per_step']:>9.1f} {r['compiled_ms_per_step']:>11.1f} "
              f"{r['compiled_over_eager']:>6.3f} {r['compile_s']:>9.1f} {r['recompile_s']:>11.1f} "
              f"{r['counts']['recompiles']:>10} {r['counts']['freeze_events']:>6} {be:>10}")
    out = {
        "benchmark": "bench_compile",
        "settings": {k: v for k, v in vars(args).items()},
        "machine": machine, "elapsed_s": elapsed,
        "compiled_over_eager": patterns["full"]["compiled_over_eager"] if "full" in patterns else None,
        "recompiles": sum(r["counts"]["recompiles"] for r in patterns.values()),
        "freeze_events": sum(r["counts"]["freeze_events"] for r in patterns.values()),
        "fallbacks": sum(r["counts"]["fallbacks"] for r in patterns.values()),
        "patterns": patterns,
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
