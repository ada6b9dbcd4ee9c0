"""Start-up: the light commands import neither torch nor torchvision nor the zoo (checked in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from freezebench.registry import BUILTIN_DATASETS, BUILTIN_MODELS, DATASETS, MODELS

HEAVY = ("torch", "torchvision", "mlflow", "sklearn", "matplotlib", "optuna", "freezebench.zoo.models",
         "freezebench.zoo.data", "freezebench.trainer.loop")

PROBE = """
import json, sys
args = json.loads(sys.argv[1])
from freezebench.cli import main
try:
    rc = main(args)
except SystemExit as e:
    rc = e.code
print("PROBE " + json.dumps({"rc": rc, "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _loaded(args: list[str], tmp_path) -> tuple[int, list[str], str]:
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(line[-1][len("PROBE "):])
    return res["rc"], res["loaded"], p.stdout


@pytest.mark.parametrize("args", [["--help"], ["list"], ["compare", "--help"], ["sweep", "--help"],
                                  ["suite", "--help"], ["predictor", "--help"], ["train", "--help"]])
def test_light_commands_import_nothing_heavy(args, tmp_path):
    rc, loaded, out = _loaded(args, tmp_path)
    assert rc == 0
    assert loaded == [], f"{' '.join(args)} imported {loaded}"


def test_list_names_without_importing_the_zoo(tmp_path):
    rc, loaded, out = _loaded(["list"], tmp_path)
    assert rc == 0 and loaded == []
    assert f"models: {', '.join(sorted(BUILTIN_MODELS))}" in out
    assert f"datasets: {', '.join(sorted(BUILTIN_DATASETS))}" in out
    assert "policies: " in out and "smartfrz" in out and "full" in out


def test_config_needs_no_torchvision_nor_zoo(tmp_path):
    rc, loaded, out = _loaded(["config", "policy=static"], tmp_path)
    assert rc == 0 and "name: static" in out
    assert not {"torchvision", "freezebench.zoo.models", "freezebench.zoo.data", "mlflow"} & set(loaded), loaded


def test_manifests_match_what_the_zoo_registers():
    import freezebench.zoo.data  # noqa: F401
    import freezebench.zoo.models  # noqa: F401

    assert set(MODELS._items) == set(BUILTIN_MODELS)
    assert set(DATASETS._items) == set(BUILTIN_DATASETS)
    assert MODELS.names() == sorted(BUILTIN_MODELS)


def test_unknown_model_still_lists_the_known_names_from_a_fresh_registry():
    from freezebench.errors import UnknownNameError
    from freezebench.registry import Registry

    reg = Registry("model", group="freezebench.models", builtin_modules=("freezebench.zoo.models",),
                   builtin_names=BUILTIN_MODELS)
    assert reg.names() == sorted(BUILTIN_MODELS) and not reg._loaded  # names() imported nothing
    with pytest.raises(UnknownNameError) as e:
        reg.get("resnet21")
    assert "Known model names: " + ", ".join(sorted(BUILTIN_MODELS)) in str(e.value)


def test_digits_without_sklearn_equal_sklearn():
    """The digits and their split, computed without importing sklearn, are exactly sklearn's."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from freezebench.zoo.data import _load_digits, _split

    images, target = _load_digits()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target) and images.dtype == d.images.dtype
    synthetic = np.arange(160) % 4
    for labels in (target, synthetic, np.arange(513) % 7):
        n = len(labels)
        for frac in (0.2, 0.25, 0.33, 0.5, 0.9):
            for seed in range(6):
                ref_tr, ref_va = train_test_split(np.arange(n), test_size=frac, random_state=seed, stratify=labels)
                tr, va = _split(n, labels, frac, seed)
                assert np.array_equal(tr, np.sort(ref_tr)) and np.array_equal(va, np.sort(ref_va)), (n, frac, seed)


def test_default_dataset_imports_no_sklearn(tmp_path):
    code = ("import sys\nfrom omegaconf import OmegaConf\nfrom freezebench.config import load_config\n"
            "from freezebench.zoo.data import build_data\n"
            "b = build_data(load_config([]).data, seed=0, device='cpu')\n"
            "print('N', b.info.num_train, b.info.num_val, 'sklearn' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.stdout.split()[-4:] == ["N", "1437", "360", "False"], p.stdout + p.stderr[-2000:]


def test_a_short_tracked_run_imports_only_what_it_uses(tmp_path):
    """A tracked run of a small CNN on the synthetic data: no torchvision, sklearn or pyplot (its figure is still
    logged)."""
    code = ("import sys\nfrom freezebench.cli import main\n"
            "rc = main(['train', 'model.name=tiny', 'data.name=synthetic', 'trainer.epochs=1', "
            "'trainer.max_steps_per_epoch=2', 'policy=static', 'policy.at_step=1', 'trainer.progress=false', "
            "'tracking.system_metrics=false', 'trainer.device=cpu'])\n"
            "mods = ('torchvision', 'sklearn', 'matplotlib.pyplot')\n"
            "print('LOADED', rc, *[m for m in mods if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/m.db"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    [line] = [ln for ln in p.stdout.splitlines() if ln.startswith("LOADED")]
    assert line == "LOADED 0", p.stdout[-2000:] + p.stderr[-2000:]
    assert len(list(tmp_path.glob("mlruns/*/*/artifacts/freeze_timeline.png"))) == 1


# --- the ending: exit without the interpreter's teardown ------------------------------------------------------
def test_exit_now_joins_threads_runs_exit_handlers_and_flushes(tmp_path):
    """exit_now: the status, every non-daemon thread joined, the atexit handlers run, buffered output written."""
    code = ("import atexit, sys, threading, time\n"
            "from freezebench.cli import exit_now\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()\n"
            "sys.stdout.write('buffered, no newline')\n"
            "exit_now(3)\n"
            "print('not reached')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 3, p.stderr
    assert p.stdout == "buffered, no newlinethread done\nhandler ran\n"


def test_python_m_freezebench_exits_with_the_commands_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "freezebench", "list"], capture_output=True, text=True, cwd=tmp_path,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("policies: ")
    bad = subprocess.run([sys.executable, "-m", "freezebench", "config", "trainer.epochs=0"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("freezebench: error: ") and bad.stderr.count("\n") == 1


# --- MLflow in a second process (freezebench train) ------------------------------------------------------------
RUN = ["train", "model.name=tiny", "data.name=synthetic", "data.synthetic_samples=160", "data.batch_size=16",
       "trainer.epochs=2", "trainer.max_steps_per_epoch=4", "policy=static", "policy.at_step=2",
       "trainer.probe_batch_size=16", "trainer.device=cpu"]
WORKER = "from freezebench.trainer.tracking import serve"


def _env(uri: str, process: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FREEZEBENCH_"))}
    env.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "OMP_NUM_THREADS": "2",
                "FREEZEBENCH_TRACKING_PROCESS": "1" if process else "0", **extra})
    return env


def _workers(cwd) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if WORKER in " ".join(proc.info["cmdline"] or ()) and proc.info["cwd"] == str(cwd):
                found.append(proc)
        except (psutil.Error, TypeError):
            continue
    return found


def _no_worker_left(cwd, wait_s: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + wait_s
    while _workers(cwd) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _workers(cwd), "the MLflow tracking process outlived the command"


def _record(client, run_id: str, tmp) -> dict:
    """Everything a run records: params, tags, metric histories, artifact files (bytes)."""
    run = client.get_run(run_id)
    metrics = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
               for k in run.data.metrics if not k.startswith("system/")}  # sampled every 10 s: timing-dependent
    local = client.download_artifacts(run_id, "", str(tmp))
    files = {}
    for root, _, names in os.walk(local):
        for n in names:
            path = os.path.join(root, n)
            files[os.path.relpath(path, local)] = open(path, "rb").read()
    return {"params": run.data.params, "tags": run.data.tags, "metrics": metrics, "files": files,
            "status": run.info.status, "name": run.info.run_name}


@pytest.mark.slow
def test_tracking_process_records_exactly_what_one_process_records(tmp_path):
    """The same command with MLflow in a second process and in the trainer's process: the same params, tags
    (MLflow's source tags included), metric keys, steps and values (the timings and memory aside), artifact
    files (byte for byte: config, units, freeze events, the figure; final.pt's weights tensor for tensor)."""
    import io

    import torch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    ids = {}
    for process in (False, True):
        cwd = tmp_path / ("two" if process else "one")
        cwd.mkdir()
        p = subprocess.run([sys.executable, "-m", "freezebench", *RUN], cwd=cwd, env=_env(uri, process),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        ids[process] = p.stdout.split("MLflow run ")[1].split("(")[1].split(")")[0]
        if process:
            _no_worker_left(cwd)
    client = MlflowClient(uri)
    one, two = (_record(client, ids[k], tmp_path / f"dl{k}") for k in (False, True))
    assert one["status"] == two["status"] == "FINISHED" and one["name"] == two["name"]
    assert one["params"] == two["params"]
    assert one["tags"] == two["tags"]
    assert set(one["metrics"]) == set(two["metrics"])
    for k, hist in one["metrics"].items():
        assert [s for s, _ in hist] == [s for s, _ in two["metrics"][k]], k
        if not k.startswith(("time/", "mem/")):
            assert hist == two["metrics"][k], k
    assert set(one["files"]) == set(two["files"])
    for path, data in one["files"].items():
        if path == "summary.json":  # names the run id and holds the timings
            a, b = json.loads(data), json.loads(two["files"][path])
            assert a["run_id"] == ids[False] and b["run_id"] == ids[True]
            assert {k: v for k, v in a.items() if k not in ("run_id", "metrics")} == \
                   {k: v for k, v in b.items() if k not in ("run_id", "metrics")}
            assert set(a["metrics"]) == set(b["metrics"])
        elif path.endswith(".pt"):
            sa = torch.load(io.BytesIO(data), weights_only=False)["model_state"]
            sb = torch.load(io.BytesIO(two["files"][path]), weights_only=False)["model_state"]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        else:
            assert data == two["files"][path], path


@pytest.mark.slow
def test_tracking_error_through_the_process_is_the_same_one_line(tmp_path):
    """A store MLflow cannot open: exit 2 and the very same one line, with or without the second process."""
    (tmp_path / "bad.db").write_text("not a database\n")
    lines = []
    for process in (False, True):
        p = subprocess.run([sys.executable, "-m", "freezebench", *RUN, "trainer.epochs=1"], cwd=tmp_path,
                           env=_env(f"sqlite:///{tmp_path}/bad.db", process), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
        lines.append(p.stderr)
    assert lines[0] == lines[1]
    assert lines[0].startswith("freezebench: error: cannot start an MLflow run at sqlite:///")
    _no_worker_left(tmp_path)


@pytest.mark.slow
def test_ctrl_c_on_the_terminal_marks_the_run_killed_through_the_process(tmp_path):
    """Ctrl-C reaches the whole foreground process group: the trainer checkpoints and exits 130, the MLflow
    process (in a session of its own, ignoring SIGINT) marks the run KILLED with the error tag, then exits."""
    import signal

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    p = subprocess.Popen([sys.executable, "-m", "freezebench", *RUN, "trainer.epochs=200"], cwd=tmp_path,
                         env=_env(uri, True, FREEZEBENCH_PHASES="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = []
    for line in p.stderr:
        err.append(line)
        if line.startswith("freezebench-phase train-start"):
            break
    assert _workers(tmp_path), "".join(err)
    os.killpg(p.pid, signal.SIGINT)
    out, rest = p.communicate(timeout=300)
    assert p.returncode == 130, "".join(err) + rest
    assert "freezebench: SIGINT: stopped at step" in rest
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED" and run.data.tags["error"].startswith("TrainingInterrupted: SIGINT")
    _no_worker_left(tmp_path)


@pytest.mark.slow
def test_the_process_exits_when_the_trainer_is_killed(tmp_path):
    """SIGKILL of the trainer (FREEZEBENCH_FAULT): the MLflow process sees its pipe close and exits; the run stays
    RUNNING, as a killed process leaves it (the resume continues it, tests/test_fault_points.py)."""
    import signal

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    p = subprocess.run([sys.executable, "-m", "freezebench", *RUN], cwd=tmp_path,
                       env=_env(uri, True, FREEZEBENCH_FAULT="after_epoch_log:1"), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    _no_worker_left(tmp_path)
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]


@pytest.mark.slow
def test_a_command_that_fails_before_its_run_begins_leaves_no_process_nor_store(tmp_path):
    """An error before tracking starts (an unknown model): one line, exit 2, the MLflow process stopped at once,
    no store created."""
    p = subprocess.run([sys.executable, "-m", "freezebench", *RUN, "model.name=nosuch"], cwd=tmp_path,
                       env=_env(f"sqlite:///{tmp_path}/m.db", True), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stderr.startswith("freezebench: error: unknown model 'nosuch'"), p.stderr[-3000:]
    assert p.stderr.count("\n") == 1
    _no_worker_left(tmp_path, wait_s=5.0)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_lost_tracking_process_ends_the_command_with_one_line(tmp_path):
    """The MLflow process killed mid-run: the trainer's next MLflow call fails, the command prints one line
    and exits 2 (no traceback)."""
    import signal

    p = subprocess.Popen([sys.executable, "-m", "freezebench", *RUN, "trainer.epochs=200", "trainer.progress=false"],
                         cwd=tmp_path, env=_env(f"sqlite:///{tmp_path}/m.db", True, FREEZEBENCH_PHASES="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("freezebench-phase train-start"):
            break
    [worker] = _workers(tmp_path)
    worker.send_signal(signal.SIGKILL)
    out, rest = p.communicate(timeout=300)
    lines = [ln for ln in rest.splitlines() if not ln.startswith("freezebench-phase")]
    assert p.returncode == 2 and len(lines) == 1, rest[-3000:]
    assert lines[0] == ("freezebench: error: the MLflow tracking process stopped (exit status -9; any error it "
                        "printed is above); pass tracking.enabled=false to train untracked")
