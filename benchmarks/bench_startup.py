"""Start-up benchmark: how long the command line takes before and after the work (issue 17).

    python benchmarks/bench_startup.py                    # 5 repeats of everything (~2-3 min on 2 quiet cores)
    python benchmarks/bench_startup.py --repeats 1 --job "policy=full trainer.epochs=1 trainer.max_steps_per_epoch=2"
    python benchmarks/bench_startup.py --python /path/to/other/venv/bin/python   # another install (an older commit)
    FREEZEBENCH_TRACKING_PROCESS=0 python benchmarks/bench_startup.py --no-light  # MLflow in the trainer's process

Whole processes, timed from outside (``time.perf_counter`` around ``subprocess.run``), the median of
``--repeats`` runs each (default 5):

- ``help_s``, ``list_s``, ``compare_help_s``, ``config_s``: ``freezebench --help``, ``freezebench list``,
  ``freezebench compare --help``, ``freezebench config policy=static``;
- the default job, ``freezebench train policy=full`` (``--job`` replaces its overrides), in a scratch folder
  whose MLflow store (``sqlite:///mlflow.db``) an untimed first job created (``job_fresh_store_total_s`` is
  that first job's time: a new store also creates its tables). With ``FREEZEBENCH_PHASES=1`` the trainer
  prints ``freezebench-phase NAME UNIXTIME`` lines (``train-start``: the first training step is next;
  ``train-end``: the last step and its evaluation are done); ``job_start_to_first_step_s`` is launch ->
  train-start, ``job_last_step_to_exit_s`` is train-end -> the process has exited, ``job_training_s`` the
  span between, ``job_total_s`` the whole process. An install without phase lines (before issue 17) gets
  ``null`` phases and its totals only.
- CPU seconds (less sensitive to a loaded machine than wall time, but not the targets): ``job_cpu_total_s``,
  the job's processes together (the trainer, the MLflow process ``freezebench train`` starts, git);
  ``job_cpu_to_first_step_s`` and ``job_cpu_last_step_to_exit_phase_s``, the trainer process's own CPU time up to
  its first step and from its last step to its ``exit`` phase line (the interpreter's teardown after it is in
  the wall time only); ``job_tracking_ready_s``, launch -> the MLflow process has imported MLflow (wall).
  Installs whose phase lines carry no CPU field get ``null`` for the last two.

Every child runs with ``MLFLOW_TRACKING_URI`` unset (the default store in the scratch folder) and
``PYTHONDONTWRITEBYTECODE`` unset (compiled bytecode is cached after the first run, as for a user). The load
average before and after is printed with the figures: measure on a quiet machine. Ends with ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                        "PYTHONDONTWRITEBYTECODE", "FREEZEBENCH_PROGRESS")}
    env["FREEZEBENCH_PHASES"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> tuple[float, float, float, str, float]:
    """(launch unix time, exit unix time, wall seconds, stderr, CPU seconds of the process and the children it
    waited for) of one process; fails loudly on error."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_unix = time.time()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return t_unix, t_unix + wall, wall, p.stderr, cpu


def _phases(stderr: str) -> tuple[dict[str, float], dict[str, float]]:
    """The phase lines' unix times and (where printed, since issue 17's second round) CPU seconds."""
    out: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for line in stderr.splitlines():
        parts = line.strip().split()
        if len(parts) in (3, 4) and parts[0] == "freezebench-phase":
            out.setdefault(parts[1], float(parts[2]))
            if len(parts) == 4:
                cpu.setdefault(parts[1], float(parts[3]))
    return out, cpu


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per command (the median is reported)")
    ap.add_argument("--job", default="policy=full", help="overrides of the default job (space separated)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter whose freezebench is measured")
    ap.add_argument("--no-job", action="store_true", help="time the light commands only")
    ap.add_argument("--no-light", action="store_true", help="time the default job only")
    args = ap.parse_args(argv)
    fb = [args.python, "-m", "freezebench"]
    load_before = os.getloadavg()
    res: dict[str, object] = {"repeats": args.repeats, "job": f"freezebench train {args.job}",
                              "python": args.python}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cwd = Path(tmp)
        light = {"help_s": ["--help"], "list_s": ["list"], "compare_help_s": ["compare", "--help"],
                 "config_s": ["config", "policy=static"]}
        _run([*fb, "--help"], cwd)  # untimed: bytecode compiled, caches warm
        for key, sub in ({} if args.no_light else light).items():
            times = [_run([*fb, *sub], cwd)[2] for _ in range(args.repeats)]
            res[key] = _median(times)
            print(f"{key:<28} median {res[key]:.3f} s  ({', '.join(f'{t:.3f}' for t in times)})", flush=True)
        if not args.no_job:
            job = [*fb, "train", *shlex.split(args.job)]
            first = _run(job, cwd)
            res["job_fresh_store_total_s"] = round(first[2], 4)
            print(f"{'job_fresh_store_total_s':<28} {first[2]:.3f} s (creates the MLflow store)", flush=True)
            starts, ends, trains, totals, ready, cpus, start_cpus, end_cpus = [], [], [], [], [], [], [], []
            for _ in range(args.repeats):
                launch, exit_, wall, err, cpu = _run(job, cwd)
                ph, ph_cpu = _phases(err)
                totals.append(wall)
                cpus.append(cpu)
                if "train-start" in ph and "train-end" in ph:
                    starts.append(ph["train-start"] - launch)
                    trains.append(ph["train-end"] - ph["train-start"])
                    ends.append(exit_ - ph["train-end"])
                if "tracking-ready" in ph:
                    ready.append(ph["tracking-ready"] - launch)
                if "train-start" in ph_cpu and "train-end" in ph_cpu and "exit" in ph_cpu:
                    start_cpus.append(ph_cpu["train-start"])
                    end_cpus.append(ph_cpu["exit"] - ph_cpu["train-end"])
            res["job_total_s"] = _median(totals)
            res["job_start_to_first_step_s"] = _median(starts)
            res["job_training_s"] = _median(trains)
            res["job_last_step_to_exit_s"] = _median(ends)
            res["job_tracking_ready_s"] = _median(ready)
            res["job_cpu_total_s"] = _median(cpus)
            res["job_cpu_to_first_step_s"] = _median(start_cpus)
            res["job_cpu_last_step_to_exit_phase_s"] = _median(end_cpus)
            for key in ("job_total_s", "job_start_to_first_step_s", "job_training_s", "job_last_step_to_exit_s",
                        "job_tracking_ready_s", "job_cpu_total_s", "job_cpu_to_first_step_s",
                        "job_cpu_last_step_to_exit_phase_s"):
                v = res[key]
                print(f"{key:<34} median {'n/a (no such phase lines)' if v is None else f'{v:.3f} s'}", flush=True)
    res["loadavg_before"] = [round(x, 2) for x in load_before]
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["cpus"] = os.cpu_count()
    print(f"load average before {res['loadavg_before']}, after {res['loadavg_after']} ({res['cpus']} CPUs)")
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
