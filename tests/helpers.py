"""Shared test helpers: trainer hooks that stop or signal at an exact step, exact state comparison.

Importable from the tests (pytest puts ``tests/`` on ``sys.path``) and from the scripts in ``tests/`` run as
subprocesses (a script's folder is on its ``sys.path``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from freezebench.trainer.hooks import Hook

#: torch's intra-op threads in every test (tests/conftest.py) and in the subprocesses a test compares with
#: its own runs (a resume under another thread count is not bit-exact): 2, or 1 in each pytest-xdist worker
#: (its subprocesses inherit PYTEST_XDIST_WORKER), so that 2 workers keep 2 cores busy without oversubscribing
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


class StopAt(Hook):
    """Request a stop (SIGTERM's path: checkpoint at this step boundary, then stop) after optimiser step ``step``."""

    name = "test_stop_at"

    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer: Any, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        if step == self.step:
            trainer.request_stop()


class SignalAt(Hook):
    """Send this process ``signum`` right after optimiser step ``step`` (when ``when(trainer)`` holds)."""

    name = "test_signal_at"

    def __init__(self, step: int, signum: int, when: Callable[[Any], bool] = lambda trainer: True):
        self.step, self.signum, self.when = step, signum, when

    def after_step(self, trainer: Any, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        if step == self.step and self.when(trainer):
            os.kill(os.getpid(), self.signum)


class RecordSteps(Hook):
    """Record the step count of every ``after_step`` call."""

    name = "test_record_steps"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def after_step(self, trainer: Any, step: int, losses: torch.Tensor, idx: torch.Tensor) -> None:
        self.steps.append(step)


def with_hooks(trainer_cls: type, make_hooks: Callable[[], list[Hook]]) -> None:
    """Make every ``trainer_cls(...)`` built from now on (e.g. by the CLI in a subprocess) get these hooks."""
    init = trainer_cls.__init__

    def init_with_hooks(self: Any, cfg: Any, **kw: Any) -> None:
        init(self, cfg, **kw, hooks=[*kw.pop("hooks", ()), *make_hooks()])

    trainer_cls.__init__ = init_with_hooks


def differences(a: Any, b: Any, path: str = "state") -> list[str]:
    """Where two nested states (dicts, lists, tuples, tensors, numbers, ...) differ; ``[]``: exactly equal.

    Tensors must agree in dtype, shape and every element (``torch.equal``; NaNs in the same places count as
    equal); floats exactly (NaN equals NaN); containers in type, keys and length.
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point() or a.is_complex():
            same = torch.equal(a, b) or torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) \
                and torch.equal(torch.isnan(a), torch.isnan(b))
        else:
            same = torch.equal(a, b)
        return [] if same else [f"{path}: tensors differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and \
            np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        return [] if same else [f"{path}: arrays differ"]
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (set, frozenset)):
        return [] if a == b else [f"{path}: {sorted(a)} vs {sorted(b)}"]
    if isinstance(a, float):
        return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} vs {b!r}"]
    if hasattr(a, "__dict__") and not isinstance(a, type):  # dataclasses, small records
        return differences(vars(a), vars(b), f"{path}.")
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_state_equal(a: Any, b: Any) -> None:
    """Assert two nested states are exactly equal (see :func:`differences`), naming the first few differences."""
    diff = differences(a, b)
    assert not diff, "; ".join(diff[:5]) + (f"; ... ({len(diff)} in all)" if len(diff) > 5 else "")


def one_line(capsys, code: int) -> str:
    """The one ``freezebench: error:`` line a CLI call printed (exit status 2, no traceback)."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("freezebench: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def assert_freeze_invariants(trainer: Any, initial: dict[int, torch.Tensor]) -> None:
    """What freezing guarantees after ``trainer.fit()``, for any policy (the contract tests, image and text).

    Every frozen unit is not the head, its parameters need no gradient, hold none and are out of the optimizer's
    groups and state, and its norm layers are in eval mode; every unit left trainable still requires gradients
    and moved from ``initial`` (``id(param) -> its value before training``); a policy that does not declare
    ``allows_unfreeze`` only froze.
    """
    frozen = trainer.freezer.frozen
    opt = trainer.optimizer
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    for i in frozen:
        unit = trainer.units[i]
        assert not unit.is_head, unit.name
        for p in unit.parameters:
            assert p.requires_grad is False and p.grad is None, unit.name
            assert id(p) not in in_groups and p not in opt.state, unit.name
        assert all(m.training is False for m in unit.norm_modules), unit.name
    for unit in trainer.units:
        if unit.index not in frozen:
            assert all(p.requires_grad for p in unit.parameters), unit.name
            assert any(not torch.equal(initial[id(p)], p) for p in unit.parameters), unit.name
    if not type(trainer.policy).allows_unfreeze:
        assert all(e.action == "freeze" for e in trainer.freezer.events)
