"""Shared fixtures: a temporary MLflow store, tiny configs, a small sequential model; the suite's default
worker processes (pytest-xdist)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from helpers import THREADS

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# Hypothesis keeps no example database, and its caches go to a temporary folder (not ./.hypothesis)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "freezebench-hypothesis"))
try:
    from hypothesis import settings

    settings.register_profile("freezebench", database=None)
    settings.load_profile("freezebench")
except ImportError:
    pass


#: worker processes for a run of the whole suite (or a tier of it) when pytest-xdist is installed (the test
#: extra) and no ``-n`` is given: one per core, at most 4
WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

#: test files whose tests share one worker, each group building its expensive fixture once: compare_runs
#: (session), like_runs and collected (module); every other test goes to whichever worker is free
GROUPS = {"tests/test_report.py": "compare_runs", "tests/test_browser.py": "compare_runs",
          "tests/test_compare_like.py": "like_runs", "tests/test_predictor_pipeline.py": "collected"}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """``python -m pytest -q`` and ``-m "not slow"`` (no paths named) run on WORKERS pytest-xdist workers,
    ``--dist loadgroup`` (GROUPS: see pytest_xdist_make_scheduler). Naming files or tests (the edit-test loop),
    ``-n 0``, ``-p no:xdist``, ``--pdb`` or ``--collect-only`` keep one process; ``-n N`` sets the count.
    Runs before xdist's own hook (a conftest registers later)."""
    from _pytest.config import Config

    opt = config.option
    if (not config.pluginmanager.hasplugin("xdist") or getattr(opt, "numprocesses", 0) is not None
            or config.args_source == Config.ArgsSource.ARGS or opt.usepdb or opt.collectonly
            or getattr(opt, "tx", None) or os.environ.get("PYTEST_XDIST_WORKER") or WORKERS < 2):
        return
    opt.numprocesses = WORKERS
    if opt.dist == "no":
        opt.dist = "loadgroup"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` by GROUPS: the files of a group form one unit of work, every other test is a unit of
    its own. (xdist's own ``xdist_group`` marks do not reach the scheduler under pytest 9: it renames the tests
    through ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.option.dist != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class FileGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return GROUPS[file] if file in GROUPS else super()._split_scope(nodeid)

    return FileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """In xdist workers, the ``slow`` tests (the long ones) come first, so that the workers finish together
    instead of one of them starting a long test at the end. One process keeps the files' order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store, its tables created: MLflow's schema migrations on a new file cost seconds,
    so the run makes it once (the first xdist worker to get here, the others wait on a file lock in the run's
    shared temporary folder) and each store is a copy of it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one folder per run, shared by its workers
    path = root / "mlflow-template.db"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            import mlflow

            building = root / f"mlflow-template-{os.getpid()}.db"
            mlflow.tracking.MlflowClient(f"sqlite:///{building}").search_experiments()
            os.replace(building, path)
    return path


def fresh_mlflow_store(template, folder) -> str:
    """A new MLflow store in ``folder`` (``mlflow.db``, a copy of the template): as a new file, without the wait."""
    shutil.copyfile(template, os.path.join(folder, "mlflow.db"))
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


@pytest.fixture(scope="session")
def _mlflow_store(_mlflow_template, tmp_path_factory):
    """One sqlite store for the session (of this worker)."""
    return fresh_mlflow_store(_mlflow_template, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def fresh_mlflow_uri(_mlflow_template, tmp_path):
    """A store of this test's own, ``tmp_path/mlflow.db`` (e.g. for a subprocess that must find no other runs)."""
    return fresh_mlflow_store(_mlflow_template, tmp_path)


@pytest.fixture
def mlflow_uri(_mlflow_store, tmp_path, monkeypatch):
    """The session's sqlite MLflow store as tracking URI, and the working directory moved to tmp_path."""
    uri = _mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    yield uri
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


# A run small enough for unit tests: tiny CNN, synthetic 8x8 data, few steps.
TINY = [
    "model.name=tiny",
    "data.name=synthetic",
    "data.synthetic_samples=160",
    "data.batch_size=16",
    "trainer.epochs=3",
    "trainer.max_steps_per_epoch=4",
    "trainer.progress=false",
    "trainer.probe_batch_size=16",
    "tracking.system_metrics=false",
    "trainer.device=cpu",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)  # 2, or 1 per xdist worker (tests/helpers.py)
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_in_tmp(tmp_path_factory):
    """Session- and module-scoped fixtures (reference runs, predictor data) run in a temporary folder too."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: runs that keep the default ``trainer.output_dir=outputs``
    (or MLflow's default ``sqlite:///mlflow.db``) write there, never into the repository."""
    monkeypatch.chdir(tmp_path)


COMPARE_POLICIES = {"full": [], "static": ["policy.at_step=4"], "freezeout_linear": []}


@pytest.fixture(scope="session")
def compare_runs(_mlflow_store, tmp_path_factory):
    """Real tiny runs for the report and browser tests: 3 policies x 2 seeds tagged suite=t, plus one run
    of another suite, in experiment ``compare-test`` of the session store."""
    from freezebench.config import load_config
    from freezebench.trainer import Trainer

    work = tmp_path_factory.mktemp("compare")
    old = os.getcwd()
    os.chdir(work)  # checkpoints (off) and any stray output stay out of the repository
    try:
        base = [*TINY, f"tracking.uri={_mlflow_store}", "tracking.experiment=compare-test",
                "trainer.save_checkpoint=false"]
        ids: dict[tuple[str, int], str] = {}
        for policy, extra in COMPARE_POLICIES.items():
            for seed in (0, 1):
                cfg = load_config([*base, f"policy={policy}", *extra, f"trainer.seed={seed}", "tracking.tags.suite=t"])
                ids[(policy, seed)] = Trainer(cfg).fit().run_id
        other = load_config([*base, "policy=full", "trainer.seed=7", "tracking.tags.suite=other"])
        ids[("other", 7)] = Trainer(other).fit().run_id
    finally:
        os.chdir(old)
    return {"uri": _mlflow_store, "experiment": "compare-test", "ids": ids}


@pytest.fixture(scope="session")
def always_freeze_predictor(tmp_path_factory):
    """A SmartFRZ predictor file (window 2) whose output always favours the freeze class."""
    from freezebench.predictors.model import SmartFRZPredictor
    from freezebench.predictors.weights import save_predictor

    model = SmartFRZPredictor(tailor_size=1024)
    with torch.no_grad():
        model.mlp_z[-1].weight.zero_()
        model.mlp_z[-1].bias.copy_(torch.tensor([-10.0, 10.0]))
    path = tmp_path_factory.mktemp("predictor") / "always_freeze.pt"
    save_predictor(path, model, metadata={"window": 2, "provenance": {"source": "test fixture"}})
    return str(path)
