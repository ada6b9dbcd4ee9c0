"""Policy overhead of every registered policy: ``time/policy_s`` against training time, on one model.

    python benchmarks/bench_policy_overhead.py                     # resnet20 on the digits, 3 epochs
    python benchmarks/bench_policy_overhead.py --epochs 2 --policies autofreeze,svcca
    python benchmarks/bench_policy_overhead.py --realistic --epochs 1 --policies full,smartfrz   # 390 steps/epoch
    python benchmarks/bench_policy_overhead.py --device cuda --model resnet50 --policies smartfrz,autofreeze \
        --set data.name=synthetic --set data.synthetic_size=224 --set trainer.precision=bf16   # GPU

Each policy trains the same model from the same seed on the embedded digits with tracking off. The trainer
times everything a policy costs (its signals, ``observe``, ``decide`` and the freezing itself) as
``time/policy_s``, separately from the training loop (``time/train_s``); this prints their ratio per policy
and ends with one line ``RESULT <json>``. Target from the SmartFRZ paper's critique of AutoFreeze (whose
norm computation cost up to 20% of training): AutoFreeze at most 3%.

``--realistic``: a realistic step budget instead of the digits' 45 steps per epoch: resnet20 on seeded
synthetic 3x32x32 images (10 classes), batch 128, 390 steps per epoch (CIFAR-10's), as
:data:`REALISTIC`.

The CKA oracle needs a reference model: a ``full`` run is trained first and its checkpoint passed as
``policy.reference``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import torch

from freezebench.config import load_config
from freezebench.errors import FreezebenchError
from freezebench.registry import POLICIES
from freezebench.trainer import Trainer


#: the realistic step budget: CIFAR-10-sized epochs of 390 steps at batch 128, synthetic 32x32 images
REALISTIC = ["data.name=synthetic", "data.synthetic_size=32", "data.synthetic_channels=3", "data.synthetic_classes=10",
             "data.synthetic_samples=55000", "data.val_fraction=0.0909", "data.batch_size=128",
             "trainer.max_steps_per_epoch=390"]

SETTINGS: list[str] = []  # --set overrides, applied to every run
DEVICE = "cpu"


def run(policy: str, model: str, epochs: int, extra: list[str], outdir: str) -> dict:
    cfg = load_config([f"policy={policy}", f"model.name={model}", f"trainer.epochs={epochs}",
                       "tracking.enabled=false", "trainer.progress=false", f"trainer.output_dir={outdir}",
                       f"trainer.device={DEVICE}", *extra, *SETTINGS])  # --set wins (also over --realistic)
    tr = Trainer(cfg)
    res = tr.fit()
    train_s = sum(h["time/train_s"] for h in res.history)
    policy_s = res.metrics["time/policy_total_s"]
    return {
        "policy": policy,
        "train_s": train_s,
        "policy_s": policy_s,
        "overhead_frac": policy_s / train_s,
        "val_acc": res.metrics["val/acc"],
        "saving_frac": res.metrics["cost/saving_frac"],
        "frozen_units": int(res.metrics["freeze/frozen_units"]),
        "units": len(tr.units) - 1,
        "checkpoint": res.checkpoint,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--policies", default="", help="comma-separated (default: every registered policy)")
    ap.add_argument("--realistic", action="store_true", help="synthetic 32x32, batch 128, 390 steps per epoch")
    ap.add_argument("--device", default="cpu", help="trainer.device (cpu | cuda | cuda:N)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable), e.g. --set data.name=synthetic")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    SETTINGS[:] = args.set
    base = REALISTIC if args.realistic else []
    names = [p for p in args.policies.split(",") if p] or POLICIES.names()
    outdir = tempfile.mkdtemp(prefix="fb-overhead-")
    rows = []
    skipped: dict[str, str] = {}
    reference = None
    order = ["full"] + [n for n in names if n != "full"]
    for name in order:
        extra: list[str] = list(base)
        if name == "cka_oracle":
            if reference is None:
                reference = run("full", args.model, args.epochs, list(base), outdir)["checkpoint"]
            extra.append(f"policy.reference={reference}")
        try:
            row = run(name, args.model, args.epochs, extra, outdir)
        except FreezebenchError as e:  # e.g. smartfrz before predictor weights are shipped
            print(f"{name:<18} skipped: {e}", flush=True)
            skipped[name] = str(e)
            continue
        if name == "full":
            reference = row["checkpoint"]
        if name not in names:
            continue
        row.pop("checkpoint")
        rows.append(row)
        print(f"{name:<18} train {row['train_s']:7.2f}s  policy {row['policy_s']:6.3f}s  "
              f"overhead {100 * row['overhead_frac']:6.2f}%  val/acc {row['val_acc']:.4f}  "
              f"saving {100 * row['saving_frac']:5.1f}%  frozen {row['frozen_units']}/{row['units']}", flush=True)
    result = {
        "benchmark": "policy_overhead",
        "model": args.model,
        "dataset": "synthetic-32x32-390-steps" if args.realistic else next(
            (s.split("=", 1)[1] for s in args.set if s.startswith("data.name=")), "digits"),
        "overrides": args.set,
        "epochs": args.epochs,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
                    "python": sys.version.split()[0], "device": args.device,
                    "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"},
        "rows": rows,
        "skipped": skipped,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
