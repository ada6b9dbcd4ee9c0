"""Start-up: the light commands import neither torch nor torchvision nor the zoo (checked in a fresh process)."""

from __future__ import annotations

import json
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
