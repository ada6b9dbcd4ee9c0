"""SmartFRZ's own cost: one freezing stage (the predictor over every active unit) and one snapshot record.

    python benchmarks/bench_predictor.py                  # resnet20 and resnet50 unit counts, CPU
    python benchmarks/bench_predictor.py --device cuda

For each model the units are those of freezebench's partition (layer granularity, 32x32 inputs). Times are
medians over repeats: a *stage* is one batched predictor call on every freezable unit's full window (the
paper's Appendix C claims < 0.1 % of training time; 0.12 GFLOPs per inference at window 30), a *record*
is one tailored snapshot of every unit into the on-device history. Ends with one line ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from freezebench.zoo.models import build_model
from freezebench.predictors.history import HistoryBuffer
from freezebench.predictors.model import predictor_flops
from freezebench.predictors.tailoring import Tailor
from freezebench.predictors.weights import DEFAULT_WEIGHTS, load_predictor
from freezebench.units import partition


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    dev = torch.device(args.device)
    predictor, meta = load_predictor(DEFAULT_WEIGHTS, device=dev)
    window, tailor_size = int(meta["window"]), int(meta["tailor_size"])
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        model = build_model(name, num_classes=10, in_channels=3, image_size=32).to(dev)
        units = partition(model, torch.randn(2, 3, 32, 32, device=dev)).units[:-1]
        tailor = Tailor([u.parameters for u in units], tailor_size=tailor_size, seed=0, device=dev)
        hist = HistoryBuffer(len(units), window, tailor_size, device=dev)
        params = [u.parameters for u in units]
        ids = list(range(len(units)))
        for _ in range(window):
            hist.record(ids, tailor.snapshot_all(params))
        windows = hist.windows(ids)
        with torch.no_grad():
            predictor(windows)  # warm-up
            stage_s = timed(lambda: predictor(windows), args.repeats, dev)
        record_s = timed(lambda: hist.record(ids, tailor.snapshot_all(params)), args.repeats, dev)
        row = {"model": name, "units": len(units), "stage_ms": 1e3 * stage_s, "record_ms": 1e3 * record_s,
               "stage_gflops": predictor_flops(window) * len(units) / 1e9, "history_mb": hist.nbytes / 2**20}
        rows.append(row)
        print(f"{name:<10} {len(units):>3} units  stage {row['stage_ms']:8.2f} ms ({row['stage_gflops']:.2f} GFLOPs)  "
              f"record {row['record_ms']:6.3f} ms  history {row['history_mb']:.1f} MB", flush=True)
    print("RESULT " + json.dumps({"benchmark": "smartfrz_predictor", "device": str(dev), "window": window,
                                  "tailor_size": tailor_size, "cpus": os.cpu_count(),
                                  "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
