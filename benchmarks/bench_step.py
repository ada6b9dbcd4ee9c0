"""Step-time benchmark: trainer overhead and the speed-up freezing really buys, against the cost model.

    python benchmarks/bench_step.py                       # resnet20 + resnet18, 32x32, batch 32 (~5-10 min, 2 CPUs)
    python benchmarks/bench_step.py --quick               # resnet20 only, fewer steps (~1-2 min)
    python benchmarks/bench_step.py --models resnet20 --steps 50 --repeats 7 --device cuda

What it measures, per model (same architecture, same initial weights, same batches, same optimiser):

(a) trainer overhead: the freezebench :class:`~freezebench.trainer.Trainer` (``policy=full``) against a bare
    PyTorch loop (forward, cross-entropy, ``zero_grad``, backward, ``SGD.step``), both iterating the very same
    :class:`~freezebench.zoo.data.TensorLoader` of synthetic CIFAR-shaped tensors. The trainer's time is its own
    per-epoch ``time/train_s`` (the timed training loop, synchronised, without evaluation or policy time)
    divided by the steps; the bare loop is timed over exactly the same span (loader iteration included,
    synchronised before and after). Figure: ``overhead_ratio`` = trainer / bare (target <= 1.03).
(b) freeze speed-up: trainers with ``policy=static policy.at_step=0 policy.fraction=f`` (a prefix of
    ``floor(f * freezable units)`` frozen before the first step) for f = 0.25, 0.5, 0.75, against the
    unfrozen trainer of (a) (f = 0). Figures per fraction: ``measured_ratio`` (step time frozen / full),
    ``predicted_ratio`` = ``CostModel.step_flops(frozen) / CostModel.full_step_flops`` and
    ``efficiency`` = (1 - measured) / (1 - predicted), the share of the predicted saving that materialised.

Method: every variant is built once and warmed up with ``--warmup`` untimed epochs; then ``--repeats`` rounds each time
every variant for one epoch of ``--steps`` steps (``Trainer.train_epoch`` + ``end_epoch`` with ``trainer.epochs=1``, constant
learning rate), in an order rotated every round so that no variant always runs first or last. Ratios are the
median over rounds of the per-round (paired) ratios; step times are medians. All variants train on the same
epoch-0 batch order every round, so the bare model and the trainer's model see the same batches and the same
learning rate: their weights must agree at the end (``weights_max_abs_diff``, a check that both loops really
do the same work).

Shared machines: every timing also records how many CPUs other processes kept busy meanwhile; disturbed
timings are re-measured (bounded) and left out of the medians when enough undisturbed rounds exist (see
benchmarks/README.md, "Noise").

The script prints figures as it goes and ends with one line ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from freezebench.config import load_config
from freezebench.zoo.data import DataBundle, build_data
from freezebench.trainer import Trainer, resolve_device

FRACTIONS = (0.25, 0.5, 0.75)
MIDDLE_FRACTIONS = (0.25, 0.5)  # non-prefix freezing: this share of the freezable units, centred, frozen
NUM_CLASSES = 10
VAL_SAMPLES = 2 * NUM_CLASSES  # keep the evaluation end_epoch() runs after the last epoch small (not timed)
# short timed epochs, many rounds: on a shared machine a burst of contention then spoils few rounds
DEFAULT_STEPS = {"resnet20": 16, "resnet18": 4}  # ~1.5-5 s per timed epoch on 2 CPU cores
QUICK_STEPS = {"resnet20": 8, "resnet18": 2}
OTHER_STEPS, OTHER_QUICK_STEPS = 10, 5
DEFAULT_REPEATS, QUICK_REPEATS = 9, 5


# --- helpers -------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


MAX_OTHER_LOAD = 0.25  # CPUs other processes may keep busy during a measurement before it counts as disturbed
RETRY_SHARE = 0.3  # re-measurements (and waiting for a quiet machine) may add at most this share of time
QUIET_WAIT_S = 5.0  # before a re-measurement, wait up to this long for the other processes to calm down


def contended(busy: float | None, limit: float) -> bool:
    return busy is not None and busy > limit


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent so far (``/proc/stat``, steal time included); None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _HZ


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


LAST_OWN_CPU_S = 0.0  # this process's CPU seconds during the last measure() (user + system, all threads)


def measure(fn: Any) -> tuple[float, float | None, int]:
    """Run ``fn`` (returns seconds per step); also return the CPUs other processes kept busy meanwhile
    (None when unknown) and this process's minor page faults (the allocator returning and re-mapping memory
    is a real cost on CPU that varies from epoch to epoch)."""
    global LAST_OWN_CPU_S
    f0, b0, o0, w0 = _minor_faults(), _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    value = fn()
    b1, o1, w1, f1 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter(), _minor_faults()
    LAST_OWN_CPU_S = o1 - o0
    if b0 is None or b1 is None or w1 - w0 < 0.2:  # /proc/stat counts in 10 ms ticks: too short to tell
        return value, None, f1 - f0
    return value, max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9), f1 - f0


def wait_quiet(limit: float, max_wait: float, window: float = 0.5) -> None:
    """Wait (at most ``max_wait`` s) until other processes keep fewer than ``limit`` CPUs busy."""
    end = time.perf_counter() + max_wait
    while time.perf_counter() < end:
        _, busy, _ = measure(lambda: time.sleep(window))
        if busy is None or busy <= limit:
            return


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- building the variants -----------------------------------------------------------------------------
def overrides(args: argparse.Namespace, model: str, steps: int, policy: list[str]) -> list[str]:
    b = args.batch_size
    # enough training samples for `steps` full batches plus the one batch the loop fetches before it stops;
    # a stratified validation split of VAL_SAMPLES (at least one sample per class)
    samples = (steps + 1) * b + VAL_SAMPLES
    val_fraction = VAL_SAMPLES / samples
    return [
        "tracking.enabled=false", "trainer.progress=false", "trainer.eval_every=0",
        *policy,
        f"model.name={model}",
        "data.name=synthetic", f"data.synthetic_size={args.image_size}", "data.synthetic_channels=3",
        f"data.synthetic_classes={NUM_CLASSES}", f"data.synthetic_samples={samples}",
        f"data.val_fraction={val_fraction!r}", f"data.batch_size={b}", "data.eval_batch_size=512",
        "trainer.epochs=1", f"trainer.max_steps_per_epoch={steps}", f"trainer.device={args.device}",
        "trainer.seed=0", "schedule.name=constant", "schedule.warmup_epochs=0",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.nesterov=false", "optim.weight_decay=5e-4",
    ]


class Bare:
    """The reference: a plain PyTorch training loop over the same loader, model copy and optimiser settings."""

    def __init__(self, model: torch.nn.Module, cfg: Any, data: DataBundle, steps: int, device: torch.device,
                 groups: bool = False):
        self.model, self.data, self.steps, self.device = model, data, steps, device
        o = cfg.optim
        params: Any = model.parameters()
        if groups:  # one param group per unit, as the trainer builds them
            from freezebench.trainer.freezer import param_groups
            from freezebench.units import partition

            probe = data.probe_batch(2, seed=0)[0]
            part = partition(model, probe, "layer")
            params = param_groups(part.units, part.other_params)
        self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=o.weight_decay)

    def epoch(self) -> float:
        """Seconds per step of one epoch, timed over the same span as the trainer's ``time/train_s``."""
        model, opt, loader = self.model, self.opt, self.data.train
        model.train()
        loader.set_epoch(0)
        sync(self.device)
        t0 = time.perf_counter()
        for b, (x, y, _) in enumerate(loader):
            if b >= self.steps:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(self.device)
        t = (time.perf_counter() - t0) / self.steps
        self.evaluate()
        return t

    @torch.no_grad()
    def evaluate(self) -> None:
        """Untimed, like the evaluation ``Trainer.end_epoch()`` runs after the last epoch: it leaves the memory
        allocator in the same state for the next timed epoch of either loop."""
        self.model.eval()
        for x, y, _ in self.data.val:
            F.cross_entropy(self.model(x), y, reduction="sum")
        self.model.train()


def data_only(data: DataBundle, steps: int, device: torch.device) -> float:
    """Seconds per step spent by the loader alone (both loops pay it; reported for reference)."""
    loader = data.train
    loader.set_epoch(0)
    sync(device)
    t0 = time.perf_counter()
    for b, _batch in enumerate(loader):
        if b >= steps:
            break
    sync(device)
    return (time.perf_counter() - t0) / steps


def trainer_epoch(trainer: Trainer, steps: int) -> float:
    """Seconds per step of one trainer epoch, from the trainer's own ``time/train_s``."""
    m = trainer.end_epoch(0, trainer.train_epoch(0))  # epoch 0 of 1: end_epoch evaluates, as a fit's last
    return m["time/train_s"] / steps


# --- one model ---------------------------------------------------------------------------------------------
def bench_model(args: argparse.Namespace, model: str, steps: int, device: torch.device) -> dict[str, Any]:
    t_build = time.perf_counter()
    cfg_full = load_config(overrides(args, model, steps, ["policy=full"]))
    data = build_data(cfg_full.data, seed=cfg_full.trainer.seed, device=device)
    if len(data.train.x) < steps * args.batch_size:
        raise SystemExit(f"internal error: {len(data.train.x)} training samples < {steps} x {args.batch_size}")
    full = Trainer(cfg_full, data=data)
    bare = Bare(copy.deepcopy(full.model), cfg_full, data, steps, device)  # same initial weights
    init = [p.detach().clone() for p in full.model.parameters()]

    frozen_trainers: dict[float, Trainer] = {}
    for f in FRACTIONS:
        cfg = load_config(overrides(args, model, steps, ["policy=static", "policy.at_step=0", f"policy.fraction={f}"]))
        t = Trainer(cfg, data=data)
        t.initial_decision()  # static freezing at step 0
        if any(not torch.equal(a, p.detach()) for a, p in zip(init, t.model.parameters())):
            raise SystemExit(f"{model}: static f={f} trainer does not start from the same weights as the full one")
        frozen_trainers[f] = t
    middle_trainers: dict[float, Trainer] = {}
    for f in MIDDLE_FRACTIONS:  # SmartFRZ-style non-prefix freezing: a block of units in the middle
        t = Trainer(cfg_full, data=data)
        n_free = len(t.units) - 1
        n = int(f * n_free)
        start = (n_free - n) // 2
        t.freezer.freeze(range(start, start + n), step=0, epoch=0.0, reason="benchmark: middle units")
        middle_trainers[f] = t
    # the bare loop with the trainer's optimiser layout (one param group per unit): what the groups cost
    bare_groups = Bare(copy.deepcopy(full.model), cfg_full, data, steps, device, groups=True)
    del init
    cost = full.cost
    freezable = len(full.units) - 1
    print(f"\n== {model}: {len(full.units)} units ({freezable} freezable), "
          f"{cost.forward_flops() / 1e9:.3f} GFLOPs/sample forward, {cost.full_step_flops / 1e9:.3f} "
          f"GFLOPs/sample per training step; batch {args.batch_size}, {steps} steps per timed epoch, "
          f"{args.repeats} rounds (built in {time.perf_counter() - t_build:.1f}s)", flush=True)

    variants: dict[str, Any] = {
        "bare": bare.epoch,
        "trainer": lambda: trainer_epoch(full, steps),
        **{f"f{f:g}": (lambda t=t: trainer_epoch(t, steps)) for f, t in frozen_trainers.items()},
        **{f"m{f:g}": (lambda t=t: trainer_epoch(t, steps)) for f, t in middle_trainers.items()},
        "bare_groups": bare_groups.epoch,
        "data": lambda: data_only(data, steps, device),
    }
    names = list(variants)

    # warm-up: untimed epochs of every variant (lazy imports, the freeze itself, kernel selection, and the
    # allocator's thresholds, which keep changing over the first epochs on CPU)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        for name in names:
            variants[name]()
    # sanity: both loops did the same training (same batches, lr, momentum, weight decay): identical weights
    diff = max((a.detach() - b.detach()).abs().max().item()
               for a, b in zip(full.model.parameters(), bare.model.parameters()))
    scale = max(p.detach().abs().max().item() for p in full.model.parameters())
    print(f"warm-up ({args.warmup} epochs) done in {time.perf_counter() - t0:.1f}s; weights max |trainer - bare| "
          f"after it {diff:.2e} (max |w| {scale:.2f})", flush=True)

    times: dict[str, list[float]] = {n: [] for n in names}
    others: dict[str, list[float | None]] = {n: [] for n in names}  # CPUs busy elsewhere meanwhile
    page_faults: dict[str, list[int]] = {n: [] for n in names}
    # CPU seconds this process used per step: with one torch thread, the work done, nearly insensitive to
    # other processes taking turns on the cores (wall time is not); it includes the untimed evaluation
    # pass each variant runs after its epoch (the same small validation split for all)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    retried = 0
    spent = {"first": 0.0, "retry": 0.0}  # re-measuring may cost at most RETRY_SHARE of the measuring time

    def busy_at(v: str, r: int) -> bool:
        return contended(others[v][r], args.max_other_load)

    for r in range(args.repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order every round
            t_m = time.perf_counter()
            value, busy, faults = measure(variants[name])
            spent["first"] += time.perf_counter() - t_m
            for _ in range(args.retries):  # another process took CPU time meanwhile: measure again
                if not contended(busy, args.max_other_load) or spent["retry"] > RETRY_SHARE * spent["first"]:
                    break
                t_m = time.perf_counter()
                wait_quiet(args.max_other_load, QUIET_WAIT_S)
                retried += 1
                value, busy, faults = measure(variants[name])
                spent["retry"] += time.perf_counter() - t_m
            times[name].append(value)
            cpu[name].append(LAST_OWN_CPU_S / steps)
            others[name].append(busy)
            page_faults[name].append(faults)
        line = "  ".join(f"{n} {times[n][-1] * 1e3:7.1f}{'*' if busy_at(n, -1) else ' '}" for n in names)
        print(f"round {r + 1}/{args.repeats} (ms/step)  {line}", flush=True)

    # statistics over the rounds measured without interference (all rounds when too few were)
    def undisturbed(*vs: str) -> list[int]:
        return [r for r in range(args.repeats) if not any(busy_at(v, r) for v in vs)]

    def clean_rounds(*vs: str) -> list[int]:
        """The undisturbed rounds; when fewer than half were, the least disturbed half of the rounds."""
        ok = undisturbed(*vs)
        need = min(args.repeats, max(2, (args.repeats + 1) // 2))
        if len(ok) >= need:
            return ok
        load = [max((others[v][r] or 0.0) for v in vs) for r in range(args.repeats)]
        return sorted(sorted(range(args.repeats), key=load.__getitem__)[:need])

    def med(v: str) -> float:
        return median([times[v][r] for r in clean_rounds(v)])

    def paired(a: str, b: str) -> float:
        return median([times[a][r] / times[b][r] for r in clean_rounds(a, b)])

    def best(a: str, b: str) -> float:  # ratio of the fastest rounds: least disturbed by other processes
        return min(times[a]) / min(times[b])

    def paired_cpu(a: str, b: str) -> float:
        return median([cpu[a][r] / cpu[b][r] for r in range(args.repeats)])

    bare_ms, trainer_ms = med("bare") * 1e3, med("trainer") * 1e3
    overhead = paired("trainer", "bare")

    freeze_rows = [{"fraction": 0.0, "frozen_units": 0, "frozen_param_frac": 0.0, "step_ms": trainer_ms,
                    "measured_ratio": 1.0, "predicted_ratio": 1.0, "efficiency": None,
                    "measured_ratio_of_minima": 1.0}]
    for f, t in frozen_trainers.items():
        frozen = sorted(t.freezer.frozen)
        predicted = cost.step_flops(frozen) / cost.full_step_flops
        measured = paired(f"f{f:g}", "trainer")
        eff = (1 - measured) / (1 - predicted) if predicted < 1 else None
        freeze_rows.append({
            "fraction": f, "frozen_units": len(frozen), "frozen_param_frac": t.freezer.frozen_param_fraction,
            "step_ms": med(f"f{f:g}") * 1e3, "measured_ratio": measured,
            "predicted_ratio": predicted, "efficiency": eff,
            "measured_ratio_of_minima": best(f"f{f:g}", "trainer"),
            "measured_ratio_cpu": paired_cpu(f"f{f:g}", "trainer"),
        })

    middle_rows = []
    for f, t in middle_trainers.items():
        frozen = sorted(t.freezer.frozen)
        predicted = cost.step_flops(frozen) / cost.full_step_flops
        measured = paired(f"m{f:g}", "trainer")
        middle_rows.append({
            "fraction": f, "frozen_units": frozen, "frozen_param_frac": t.freezer.frozen_param_fraction,
            "step_ms": med(f"m{f:g}") * 1e3, "measured_ratio": measured, "predicted_ratio": predicted,
            "efficiency": (1 - measured) / (1 - predicted) if predicted < 1 else None,
            "measured_ratio_of_minima": best(f"m{f:g}", "trainer"),
            "measured_ratio_cpu": paired_cpu(f"m{f:g}", "trainer"),
        })
    groups_ratio = paired("bare_groups", "bare")
    for row in freeze_rows[1:] + middle_rows:
        row["efficiency_cpu"] = ((1 - row["measured_ratio_cpu"]) / (1 - row["predicted_ratio"])
                                 if row["predicted_ratio"] < 1 else None)

    print(f"-- {model}: (a) trainer overhead: bare {bare_ms:.1f} ms/step, trainer {trainer_ms:.1f} ms/step, "
          f"ratio {overhead:.3f} (target <= 1.03; fastest rounds {best('trainer', 'bare'):.3f}); "
          f"loader alone {med('data') * 1e3:.2f} ms/step; {len(undisturbed('trainer', 'bare'))} undisturbed "
          f"rounds of {args.repeats}, {retried} re-measurements")
    if len(undisturbed("trainer", "bare")) < (args.repeats + 1) // 2:
        print("   WARNING: other processes kept the CPUs busy during most rounds; the figures use the least "
              "disturbed half of the rounds and are unreliable: rerun on a quieter machine", flush=True)
    print(f"-- {model}: (b) freeze speed-up vs cost model")
    print(f"   {'frac':>5} {'frozen':>6} {'params':>7} {'ms/step':>8} {'measured':>9} {'predicted':>9} {'effic.':>7}"
          f" {'cpu-time':>9} {'effic.':>7}")
    for row in freeze_rows:
        eff = "-" if row["efficiency"] is None else f"{row['efficiency']:.2f}"
        mc = row.get("measured_ratio_cpu", 1.0)
        ec = "-" if row.get("efficiency_cpu") is None else f"{row['efficiency_cpu']:.2f}"
        print(f"   {row['fraction']:>5.2f} {row['frozen_units']:>6} {row['frozen_param_frac']:>7.1%} "
              f"{row['step_ms']:>8.1f} {row['measured_ratio']:>9.3f} {row['predicted_ratio']:>9.3f} {eff:>7}"
              f" {mc:>9.3f} {ec:>7}", flush=True)

    print(f"-- {model}: (c) non-prefix (middle) freezing vs cost model")
    for row in middle_rows:
        eff = "-" if row["efficiency"] is None else f"{row['efficiency']:.2f}"
        print(f"   {row['fraction']:>5.2f} units {row['frozen_units'][0]}..{row['frozen_units'][-1]} "
              f"{row['frozen_param_frac']:>7.1%} {row['step_ms']:>8.1f} ms  measured {row['measured_ratio']:.3f} "
              f"predicted {row['predicted_ratio']:.3f} efficiency {eff}; cpu-time {row['measured_ratio_cpu']:.3f} "
              f"efficiency {row['efficiency_cpu']:.2f}", flush=True)
    print(f"-- {model}: (d) one param group per unit vs one group (bare loops): ratio {groups_ratio:.3f}, "
          f"cpu-time {paired_cpu('bare_groups', 'bare'):.3f}", flush=True)
    print(f"-- {model}: cpu-time per step (ms): " + ", ".join(f"{n} {median(cpu[n]) * 1e3:.1f}" for n in names)
          + f"; trainer/bare cpu-time {paired_cpu('trainer', 'bare'):.3f}", flush=True)

    return {
        "steps": steps,
        "units": len(full.units),
        "middle": middle_rows,
        "param_groups_ratio": groups_ratio,
        "param_groups_ratio_cpu": paired_cpu("bare_groups", "bare"),
        "overhead_ratio_cpu": paired_cpu("trainer", "bare"),
        "cpu_ms_per_step": {n: median(cpu[n]) * 1e3 for n in names},
        "raw_cpu_s_per_step": cpu,
        "bare_groups_ms_per_step": med("bare_groups") * 1e3,
        "freezable_units": freezable,
        "forward_gflops_per_sample": cost.forward_flops() / 1e9,
        "full_step_gflops_per_sample": cost.full_step_flops / 1e9,
        "bare_ms_per_step": bare_ms,
        "trainer_ms_per_step": trainer_ms,
        "data_ms_per_step": med("data") * 1e3,
        "overhead_ratio": overhead,
        "overhead_ratio_of_medians": trainer_ms / bare_ms,
        "overhead_ratio_of_minima": best("trainer", "bare"),
        "overhead_ms_per_step": trainer_ms - bare_ms,
        "weights_max_abs_diff": diff,  # after the warm-up epochs; 0 means both loops trained identically
        "freeze": freeze_rows,
        "undisturbed_rounds_overhead": len(undisturbed("trainer", "bare")),  # < repeats/2: unreliable
        "remeasured": retried,
        "raw_s_per_step": times,
        "raw_other_cpus": others,
        "raw_minor_page_faults": page_faults,
    }


# --- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma-separated zoo names (default: resnet20,resnet18; --quick: resnet20)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per timed epoch (default per model: {DEFAULT_STEPS}, others {OTHER_STEPS}; "
                        f"--quick: {QUICK_STEPS}, others {OTHER_QUICK_STEPS})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds per variant (default {DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (timings synchronise the device)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up epochs per variant (default 2; --quick: 1)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-measure a timing up to this many times when other processes used the CPUs meanwhile")
    p.add_argument("--max-other-load", type=float, default=MAX_OTHER_LOAD,
                   help="CPUs other processes may keep busy during a timing before it counts as disturbed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps and rounds, resnet20 only")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "resnet20" if args.quick else "resnet20,resnet18"
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.repeats < 1 or args.warmup < 1 or (args.steps is not None and args.steps < 1):
        p.error("--steps, --repeats and --warmup must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    table, other = (QUICK_STEPS, OTHER_QUICK_STEPS) if args.quick else (DEFAULT_STEPS, OTHER_STEPS)
    steps_of = {m: args.steps or table.get(m, other) for m in models}
    machine = machine_info(device)
    settings = {"models": models, "steps": steps_of, "repeats": args.repeats, "batch_size": args.batch_size,
                "image_size": args.image_size, "device": str(device), "quick": args.quick,
                "warmup": args.warmup, "retries": args.retries, "max_other_load": args.max_other_load,
                "threads": torch.get_num_threads(),
                "fractions": [0.0, *FRACTIONS], "optimizer": "sgd lr=0.05 momentum=0.9 wd=5e-4 (constant lr)",
                "data": f"synthetic {NUM_CLASSES} classes, 3x{args.image_size}x{args.image_size}",
                "timing": "trainer: history time/train_s / steps; bare: same span; medians / median paired ratios"}
    print(f"bench_step: {machine['device_name']} ({machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
          f"threads), torch {machine['torch_version']}; load average {load_avg()}", flush=True)
    t0 = time.perf_counter()
    load_start = load_avg()
    results = {m: bench_model(args, m, steps_of[m], device) for m in models}
    elapsed = time.perf_counter() - t0
    machine["load_avg_start"], machine["load_avg_end"] = load_start, load_avg()

    print(f"\nsummary ({elapsed:.0f}s):")
    print(f"  {'model':<10} {'bare ms':>8} {'trainer ms':>10} {'overhead':>8}   "
          + "   ".join(f"f={f:g}: meas/pred/eff" for f in FRACTIONS))
    for m, r in results.items():
        cells = "   ".join(f"{row['measured_ratio']:.2f}/{row['predicted_ratio']:.2f}/"
                           + ("-" if row["efficiency"] is None else f"{row['efficiency']:.2f}")
                           for row in r["freeze"][1:])
        print(f"  {m:<10} {r['bare_ms_per_step']:>8.1f} {r['trainer_ms_per_step']:>10.1f} "
              f"{r['overhead_ratio']:>8.3f}   {cells}")
    out = {"benchmark": "bench_step", "settings": settings, "machine": machine, "elapsed_s": elapsed,
           "results": results}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
