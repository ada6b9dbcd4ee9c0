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
