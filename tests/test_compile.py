"""trainer.compile (freezebench.features.compile): compiled training that survives freezing.

Compiling is CPU-expensive, so the fast tier uses the ``aot_eager`` backend (dynamo + AOT autograd: the same
guards, recompiles and frozen-parameter-aware backward graphs as inductor, without generating C++) and the
``eager`` backend (dynamo only); inductor itself runs in the tests marked slow.

Tolerance of compiled vs eager weights. A compiled step computes the same function with its floating-point
operations reordered and fused, so compiled and eager fp32 training are two roundings of one computation.
Measuring how far eager fp32 training lands from the same training in fp64 (``d64``) gives this run's own
rounding scale: if the compiled run is within ``c * d64`` of the exact result, the triangle inequality gives
``|compiled - eager| <= (1 + c) * d64``. We allow ``c = 9`` (a compiled kernel may round up to 9 times worse
than eager's; in practice it is comparable), i.e. a tolerance of ``10 * d64``, never below 1e-6 (fp32's
resolution at weights of order 1, 8 ulps). Measured on this test's run (12 steps, 2 freezes): d64 = 1.7e-7;
compiled vs eager 0 with aot_eager (bit-identical) and 6.0e-8 with inductor (0.36 d64).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.features.compile import CompiledTraining
from freezebench.policy import Decision, FreezePolicy
from freezebench.trainer import Trainer

# 3 epochs x 4 steps; unit 1 frozen after step 3 (not a prefix), unit 0 after step 6 (a prefix of 2)
SCRIPT = {3: [1], 6: [0]}


class Scripted(FreezePolicy):
    """Freezes the units of :data:`SCRIPT` at its steps and keeps their weights at that moment."""

    name = "scripted"

    def __init__(self, script=SCRIPT):
        super().__init__()
        self.script = dict(script)
        self.snapshots: dict[int, list[torch.Tensor]] = {}

    def decide_at(self, step):
        return step in self.script

    def decide(self, step):
        for i in self.script[step]:
            self.snapshots[i] = [p.detach().clone() for p in self.units[i].parameters]
        return Decision(freeze=self.script[step], reason="scripted")


class ToDouble(nn.Module):
    """Runs a model in fp64 (inputs cast up, logits cast back): the near-exact reference of the tolerance."""

    def __init__(self, model):
        super().__init__()
        self.model = model.double()

    def forward(self, x):
        return self.model(x.double()).float()


def _cfg(tiny_overrides, *extra):
    return load_config([*tiny_overrides, "model.granularity=layer", "tracking.enabled=false",
                        "trainer.save_checkpoint=false", "trainer.checkpoint_every=0", *extra])


def _train(tiny_overrides, *extra, fp64=False):
    from freezebench.zoo.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, in_channels=3, image_size=8)  # the synthetic data of TINY
    if fp64:
        model = ToDouble(model)
    policy = Scripted()
    trainer = Trainer(_cfg(tiny_overrides, *extra), model=model, policy=policy)
    result = trainer.fit()
    return trainer, policy, result


def _params(trainer):
    return [p.detach().double() for p in trainer.model.parameters()]


@pytest.mark.parametrize("backend,cache", [
    pytest.param("aot_eager", False, id="aot_eager"),
    pytest.param("aot_eager", True, id="aot_eager-cache"),
    pytest.param("inductor", False, id="inductor", marks=pytest.mark.slow),
    pytest.param("inductor", True, id="inductor-cache", marks=pytest.mark.slow),
])
def test_compiled_training_matches_eager_through_freezing(backend, cache, tiny_overrides):
    # with a cache, every epoch sees the whole training set (64 samples, 4 steps): epochs 2-3 fill the cache
    # after the prefix freezes at step 6, epoch 4 is served from it
    extra = ["trainer.cache_frozen_prefix=true", "trainer.cache_dtype=fp32", "data.synthetic_samples=80",
             "trainer.epochs=4"] if cache else []
    eager, _, _ = _train(tiny_overrides, *extra)
    # an fp32 cache trains as without one, so the fp64 reference runs uncached (fp64 values are not stored)
    exact, _, _ = _train(tiny_overrides, *extra[2:], fp64=True)
    comp, policy, result = _train(tiny_overrides, *extra, "trainer.compile=true",
                                  f"trainer.compile_backend={backend}")
    assert eager.compiler is None and comp.compiler is not None
    assert [(e.unit, e.step) for e in comp.freezer.events] == [(1, 3), (0, 6)]

    d64 = max((a - b).abs().max().item() for a, b in zip(_params(eager), _params(exact)))
    tol = max(10 * d64, 1e-6)
    diff = max((a - b).abs().max().item() for a, b in zip(_params(eager), _params(comp)))
    assert d64 > 0 and diff <= tol, (diff, d64)

    # frozen units did not move after their freeze (bit for bit), the others trained
    for i, snap in policy.snapshots.items():
        assert all(torch.equal(a, b) for a, b in zip(snap, comp.units[i].parameters))
    # one compile per frozen set: the initial graph and one per freeze event, never an eager fall-back
    last = result.history[-1]
    assert last["compile/compiles"] == 3 and last["compile/recompiles"] == 2 <= len(comp.freezer.events)
    assert last["compile/fallbacks"] == 0 and last["compile/graph_breaks"] == 0
    # compile seconds are counted apart from training seconds
    first = result.history[0]
    assert first["time/compile_s"] > 0
    assert first["time/train_s"] + first["time/compile_s"] + first["time/policy_s"] <= first["time/epoch_s"] + 1e-9
    assert sum(h["time/compile_s"] for h in result.history) == pytest.approx(last["time/compile_total_s"])
    if cache:
        assert last["cache/served_samples"] > 0


class _Freezer:
    def __init__(self):
        self.frozen: set[int] = set()
        self.events: list[object] = []


class _Branchy(nn.Module):
    """A Python branch on a string attribute: every new value fails dynamo's guards (a recompile)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.tag = "a0"

    def forward(self, x):
        if self.tag.endswith(("0", "2", "4", "6", "8")):
            return self.lin(x) * 2
        return self.lin(x)


def test_fallback_to_eager_is_logged_and_counted(caplog):
    freezer = _Freezer()
    ct = CompiledTraining(freezer, backend="eager")
    m = _Branchy()
    x = torch.randn(3, 4)
    try:
        with caplog.at_level(logging.WARNING, logger="freezebench.features.compile"):
            for i in range(8):  # more guard failures than a region's recompile limit
                m.tag = f"a{i}"
                out = ct(m)(x)
                assert torch.equal(out, m.lin(x) * (2 if i % 2 == 0 else 1))  # eager or not: right values
        assert ct.fallbacks >= 1
        assert ct.metrics(0.0)["compile/fallbacks"] == ct.fallbacks
        assert any("runs it eagerly" in r.getMessage() for r in caplog.records)
        # a new frozen set is a new region: compiled again, no fall-back there
        freezer.frozen, freezer.events = {0}, [object()]
        before = ct.fallbacks
        ct(m)(x)
        assert ct.fallbacks == before and ct.compiles == 2 and ct.recompiles == 1
    finally:
        ct.close()


def test_compile_config_is_validated(tiny_overrides):
    with pytest.raises(ConfigError, match="trainer.compile_backend='nonsense' is not a torch.compile backend"):
        Trainer(_cfg(tiny_overrides, "trainer.compile=true", "trainer.compile_backend=nonsense"))
    with pytest.raises(ConfigError, match="compile_mode"):
        _cfg(tiny_overrides, "trainer.compile=true", "trainer.compile_mode=fast")


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated-regions", "shared-cache"])
def test_more_frozen_sets_than_dynamos_default_cache(isolate, monkeypatch):
    """12 frozen sets (more than dynamo's default recompile_limit of 8) compile 12 times and never fall
    back; ``shared-cache`` is the path for torch < 2.14, where the one cache is sized for the freeze events."""
    import freezebench.features.compile as fc
    import torch._dynamo.config as dcfg

    monkeypatch.setattr(fc, "_ISOLATES", isolate)
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)])
    freezer = _Freezer()
    ct = CompiledTraining(freezer, backend="eager")
    x = torch.randn(2, 3)
    try:
        with dcfg.patch(recompile_limit=8, accumulated_recompile_limit=256):  # the defaults, restored after
            for i in range(12):
                if i:
                    model[i - 1].requires_grad_(False)
                    freezer.frozen = set(range(i))
                    freezer.events.append(object())
                model.zero_grad(set_to_none=True)
                ct(model)(x).sum().backward()
                assert all(p.grad is None for p in model[:i].parameters())  # the frozen ones got no gradient
                assert all(p.grad is not None for p in model[i:].parameters())
        assert ct.compiles == 12 and ct.recompiles == 11 and ct.fallbacks == 0 and ct.shape_recompiles == 0
    finally:
        ct.close()


# every registered policy under trainer.compile, with the contract test's settings (dynamo with the eager
# backend: the guards, regions and recompiles of inductor, without generating code)
from test_contract import SETTINGS, reference_checkpoint  # noqa: E402,F401 - the fixture is used below
from freezebench.registry import POLICIES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_trains_compiled(name, tiny_overrides, reference_checkpoint, always_freeze_predictor):
    setting = SETTINGS[name]
    overrides = [o.replace("{reference}", reference_checkpoint).replace("{weights}", always_freeze_predictor)
                 for o in setting["overrides"]]
    trainer = Trainer(_cfg(tiny_overrides, f"policy={name}", *overrides, "trainer.compile=true",
                           "trainer.compile_backend=eager"))
    at_freeze: dict[int, list[torch.Tensor]] = {}
    freeze = trainer.freezer.freeze

    def spy(indices, step, epoch, reason=""):
        events = freeze(indices, step, epoch, reason)
        for ev in events:
            at_freeze[ev.unit] = [p.detach().clone() for p in trainer.units[ev.unit].parameters]
        return events

    trainer.freezer.freeze = spy
    result = trainer.fit()
    assert bool(trainer.freezer.frozen) == setting["freezes"]
    for i in trainer.freezer.frozen:
        assert all(torch.equal(a, b) for a, b in zip(at_freeze[i], trainer.units[i].parameters))
    last = result.history[-1]
    changes = len({e.step for e in trainer.freezer.events})  # decisions that changed the frozen set
    assert last["compile/fallbacks"] == 0
    assert 1 <= last["compile/compiles"] and last["compile/recompiles"] <= changes
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
