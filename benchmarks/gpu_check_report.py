"""Collect the sections of ``benchmarks/gpu_check.sh`` into one JSON file, with the figures against targets.

    python benchmarks/gpu_check_report.py --logs gpu_check_logs --out gpu_check.json

Reads ``sections.tsv`` (name, status, exit code, seconds, command per line) and each section's log: the
last ``RESULT <json>`` line of a benchmark, pytest's final counts for the tests. A section whose log holds
neither is kept with its status and the tail of its log. The summary picks the figures issue 15 asks for;
one missing (its section failed or was skipped) is null, never a guess.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

# figure -> (comparison, target) from issue 15 (reported against, not asserted)
TARGETS = {
    "trainer_over_bare": ("<=", 1.03),
    "freeze_efficiency_prefix": (">=", 0.9),
    "cached_over_suffix": ("<=", 1.1),
    "compiled_over_eager_big": ("<=", 0.8),
    "smartfrz_overhead_frac": ("<=", 0.005),
    "autofreeze_overhead_frac": ("<=", 0.03),
}


def read_result(log: str) -> Any:
    for line in reversed(log.splitlines()):
        if line.startswith("RESULT "):
            try:
                return json.loads(line[len("RESULT "):])
            except json.JSONDecodeError:
                return None
    return None


def pytest_counts(log: str) -> dict[str, int] | None:
    for line in reversed(log.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found and ("passed" in line or "skipped" in line or "failed" in line or "error" in line):
            return {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
    return None


def first(results: dict[str, Any]) -> dict[str, Any] | None:
    return next(iter(results.values()), None) if results else None


def summary(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def res(name: str) -> Any:
        s = sections.get(name)
        return s.get("result") if s else None

    out: dict[str, Any] = {}
    for size in ("big", "small"):
        step = res(f"step_{size}")
        if step:
            r = first(step["results"])
            batch = step["settings"]["batch_size"]
            half = [row for row in r["freeze"] if row["fraction"] == 0.5]
            out[f"step_{size}"] = {
                "model": next(iter(step["results"])), "trainer_over_bare": r["overhead_ratio"],
                "freeze_efficiency_prefix": {str(row["fraction"]): row["efficiency"] for row in r["freeze"][1:]},
                "freeze_efficiency_nonprefix": {str(row["fraction"]): row["efficiency"] for row in r["middle"]},
                "images_per_s_trainer": batch / (r["trainer_ms_per_step"] / 1e3),
                "images_per_s_bare": batch / (r["bare_ms_per_step"] / 1e3),
                "prefix_half_efficiency": half[0]["efficiency"] if half else None,
            }
        cache = res(f"cache_{size}")
        if cache:
            r = first(cache["results"])
            out[f"cache_{size}"] = {"model": next(iter(cache["results"])), "cached_over_suffix": r["cached_vs_suffix"],
                                    "cached_over_full": r["cached_vs_full"], "images_per_s": r["images_per_s"]}
        comp = res(f"compile_{size}")
        if comp:
            out[f"compile_{size}"] = {
                "model": comp["settings"]["model"], "compiled_over_eager": comp["compiled_over_eager"],
                "recompiles": comp["recompiles"], "freeze_events": comp["freeze_events"],
                "fallbacks": comp["fallbacks"],
                "patterns": {k: {"compiled_over_eager": v["compiled_over_eager"], "compile_s": v["compile_s"],
                                 "recompile_s": v["recompile_s"], "break_even_steps": v["break_even_steps"],
                                 "eager_images_per_s": v["eager_images_per_s"],
                                 "compiled_images_per_s": v["compiled_images_per_s"]}
                             for k, v in comp["patterns"].items()},
            }
    for name in ("overhead", "policies"):
        r = res(name)
        if r:
            rows = {row["policy"]: row for row in r["rows"]}
            out[name] = {p: {"overhead_frac": row["overhead_frac"], "val_acc": row["val_acc"],
                             "frozen_units": row["frozen_units"]} for p, row in rows.items()}
            if r.get("skipped"):
                out[name + "_skipped"] = r["skipped"]
    ov = out.get("overhead") or out.get("policies") or {}
    figures = {
        "trainer_over_bare": out.get("step_big", {}).get("trainer_over_bare"),
        "freeze_efficiency_prefix": out.get("step_big", {}).get("prefix_half_efficiency"),
        "cached_over_suffix": out.get("cache_big", {}).get("cached_over_suffix"),
        "compiled_over_eager_big": out.get("compile_big", {}).get("compiled_over_eager"),
        "smartfrz_overhead_frac": ov.get("smartfrz", {}).get("overhead_frac"),
        "autofreeze_overhead_frac": ov.get("autofreeze", {}).get("overhead_frac"),
    }
    checks = {}
    for k, v in figures.items():
        op, target = TARGETS[k]
        checks[k] = {"value": v, "target": f"{op} {target}",
                     "meets": None if v is None else (v <= target if op == "<=" else v >= target)}
    out["targets"] = checks
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--logs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--elapsed", type=float, default=None)
    ap.add_argument("--mode", default="gpu")
    args = ap.parse_args(argv)
    logs = Path(args.logs)
    sections: dict[str, dict[str, Any]] = {}
    for line in (logs / "sections.tsv").read_text().splitlines():
        name, status, rc, seconds, command = (line.split("\t") + [""] * 5)[:5]
        entry: dict[str, Any] = {"status": status, "rc": None if rc == "-" else int(rc),
                                 "seconds": float(seconds), "command": command}
        log_file = logs / f"{name}.log"
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        if name == "gpu_tests":
            entry["result"] = pytest_counts(text)
        elif name != "setup":
            entry["result"] = read_result(text)
        else:
            entry["result"] = text.strip().splitlines()[-3:] if text.strip() else None
        if status != "ok" or entry["result"] is None:
            entry["log_tail"] = text.splitlines()[-30:]
        sections[name] = entry
    device = None
    for s in sections.values():
        r = s.get("result")
        if isinstance(r, dict) and isinstance(r.get("machine"), dict):
            device = r["machine"].get("device_name") or device
            if device:
                break
    out = {
        "check": "freezebench gpu_check", "mode": args.mode, "device_name": device,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget,
        "elapsed_s": args.elapsed, "host": platform.node(),
        "sections_ok": sorted(k for k, v in sections.items() if v["status"] == "ok"),
        "sections_not_ok": {k: v["status"] for k, v in sections.items() if v["status"] != "ok"},
        "summary": None, "sections": sections,
    }
    try:
        out["summary"] = summary(sections)
    except Exception as e:  # noqa: BLE001 - a result of an unexpected shape must not lose the sections
        out["summary"] = {"error": f"{type(e).__name__}: {e}", "targets": {}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    t = out["summary"]["targets"]
    for k, v in t.items():
        print(f"  {k:<26} {v['value'] if v['value'] is None else round(v['value'], 4)!s:>10}  target "
              f"{v['target']:<8} {'' if v['meets'] is None else ('ok' if v['meets'] else 'MISSED')}")
    return None


if __name__ == "__main__":
    sys.exit(main())
