"""Contract tests on text: every registered policy trains bert_tiny on the embedded text task, and a text run
resumes bit for bit (issue 16). The fast tier runs two policies; the slow tier all of them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from freezebench.config import load_config  # noqa: E402
from freezebench.errors import TrainingInterrupted  # noqa: E402
from freezebench.registry import POLICIES  # noqa: E402
from freezebench.trainer import Trainer  # noqa: E402
from helpers import StopAt, assert_freeze_invariants, assert_state_equal  # noqa: E402
from test_contract import SETTINGS, _untimed  # noqa: E402

TEXT = ["data.name=text_demo", "data.text_samples=120", "data.batch_size=16", "data.eval_batch_size=64",
        "model.name=bert_tiny", "trainer.epochs=3", "trainer.max_steps_per_epoch=4", "trainer.progress=false",
        "trainer.probe_batch_size=16", "trainer.device=cpu", "optim.name=adamw", "optim.lr=0.001",
        "schedule.name=linear", "schedule.warmup_fraction=0.1", "tracking.system_metrics=false"]

#: policies that refuse text, with the one line's key (their trainer features have no text form yet)
REFUSED: dict[str, str] = {}
FAST = {"autofreeze", "full"}
TIERED = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in POLICIES.names()]


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory):
    """Final weights of a `full` text run of bert_tiny (the CKA oracle's reference)."""
    out = tmp_path_factory.mktemp("text_reference")
    trainer = Trainer(load_config([*TEXT, "model.granularity=layer", "tracking.enabled=false",
                                   f"trainer.output_dir={out}", "trainer.checkpoint_every=0"]))
    trainer.fit()
    return str(trainer.save_checkpoint(out / "ref.pt"))


def _overrides(name, request):
    over = SETTINGS[name]["overrides"]
    if any("{reference}" in o for o in over):
        over = [o.replace("{reference}", request.getfixturevalue("text_reference")) for o in over]
    if any("{weights}" in o for o in over):
        over = [o.replace("{weights}", request.getfixturevalue("always_freeze_predictor")) for o in over]
    return [f"policy={name}", *TEXT, "model.granularity=layer", *over]


@pytest.mark.parametrize("name", TIERED)
def test_policy_contract_on_text(name, request, tmp_path):
    if name in REFUSED:
        from freezebench.errors import ConfigError

        with pytest.raises(ConfigError, match=REFUSED[name]):
            Trainer(load_config([*_overrides(name, request), "tracking.enabled=false"]))
        return
    cfg = load_config([*_overrides(name, request), "tracking.enabled=false", f"trainer.output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    initial = {id(p): p.detach().clone() for p in trainer.model.parameters()}
    result = trainer.fit()
    frozen = trainer.freezer.frozen
    assert bool(frozen) == SETTINGS[name]["freezes"], name
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    assert_freeze_invariants(trainer, initial)
    assert result.metrics["cost/tflops"] <= result.metrics["cost/tflops_full"]
    state = trainer.policy.state_dict()
    clone = type(trainer.policy)(trainer.policy.cfg)
    clone.setup(trainer.units, trainer.plan)
    clone.load_state_dict(state)
    assert_state_equal(clone.state_dict(), state)


@pytest.mark.parametrize("name", ["autofreeze", pytest.param("smartfrz", marks=pytest.mark.slow),
                                  pytest.param("egeria", marks=pytest.mark.slow),
                                  pytest.param("spfde", marks=pytest.mark.slow)])
def test_text_run_resumes_bit_for_bit(name, request, tmp_path):
    """Stopped mid-epoch and resumed from last.pt, a text run (dropout, bucketing, dynamic padding, linear
    schedule) ends with the weights, metrics and freeze events of an uninterrupted run, bit for bit. spfde: a
    sparse, sieved text run (masks, their updates and the sieve's partial set resume too)."""
    base = [*_overrides(name, request), "tracking.enabled=false", f"trainer.output_dir={tmp_path}",
            "trainer.save_checkpoint=false", *(["sparsity.mask_every=2"] if name == "spfde" else [])]
    ref = Trainer(load_config([*base, "tracking.run_name=ref", "trainer.checkpoint_every=0"]))
    expected = ref.fit()
    cut = Trainer(load_config([*base, "tracking.run_name=cut"]), hooks=[StopAt(6)])
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    resumed = Trainer(load_config([*base, "tracking.run_name=cut", "resume=auto"]))
    assert resumed.step == 6
    result = resumed.fit()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in ref.model.state_dict().items())
    assert [_untimed(h) for h in result.history] == [_untimed(h) for h in expected.history]
    assert result.events == expected.events
    if ref.sparsity is not None:
        assert resumed.sparsity.updates == ref.sparsity.updates > 0  # mask updates ran on both sides of the cut
        assert all(torch.equal(a, b) for a, b in zip(resumed.sparsity.masks, ref.sparsity.masks))


@pytest.mark.slow
def test_text_under_two_gloo_processes(mlflow_uri, tmp_path):
    """DDP on text: each rank trains its own shard (bucketed after sharding), every rank freezes the same units
    and ends with the same model; the evaluation's confusion counts are summed over the ranks."""
    from test_ddp import _torchrun

    args = [*TEXT, "policy=autofreeze", "model.granularity=block", "policy.evals_per_epoch=2",
            "tracking.run_name=ddp-text"]
    proc = _torchrun(2, tmp_path, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["events"] == ranks[1]["events"]
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    assert set(ranks[0]["shard"]).isdisjoint(ranks[1]["shard"])
    assert ranks[0]["history"][-1]["val/acc"] == ranks[1]["history"][-1]["val/acc"]
    assert "val/score" in ranks[0]["history"][-1]
