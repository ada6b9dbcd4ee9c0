"""The README's Python example (your own nn.Module, every policy, compare) runs as written; only its size is
shrunk (1 epoch of 3 steps instead of 3 epochs) so the test takes seconds per run."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### Your own model, every policy, one comparison"


def example_code() -> str:
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.S)
    assert block, "the README section lost its python block"
    return block.group(1)


@pytest.mark.slow
def test_readme_example_runs_every_policy_on_a_custom_model(mlflow_uri, tmp_path):
    code = example_code()
    size = '"trainer.epochs=3", '
    assert size in code
    code = code.replace(size, '"trainer.epochs=1", "trainer.max_steps_per_epoch=3", ')
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md example", "exec"), scope)  # noqa: S102 - our own README
    from freezebench.registry import POLICIES

    report = scope["report"]
    assert sorted(r.policy for r in report.rows) == sorted(POLICIES.names())  # one row per policy, no splits
    assert all(r.model == "MyNet" and r.dataset == "digits" and r.seeds == [0, 1] for r in report.rows)
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("mynet")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert names == {f"{p}-MyNet-digits-s{s}" for p in POLICIES.names() for s in (0, 1)}
    assert (tmp_path / "outputs" / "report-mynet" / "table.md").is_file()
