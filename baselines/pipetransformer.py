"""``pipetransformer``: PipeTransformer's geometric freezing schedule (a cheap, signal-free baseline).

Method card
-----------
Paper: Chaoyang He, Shen Li, Mahdi Soltanolkotabi and Salman Avestimehr, "PipeTransformer: Automated
Elastic Pipelining for Distributed Training of Transformers", ICML 2021 (PMLR 139), arXiv:2102.03161.
Reference code: github.com/Distributed-AI/PipeTransformer (read for the facts; this is our own code).

Rule: after epoch ``e`` (``e = 1, 2, ...``) the first ``F(e)`` freezable units, in forward order, are
frozen (prefix freezing, never unfrozen), with

    F(e) = ceil(L * (1 - (1 - alpha)^e))

the closed form of the recursion ``F(e) = F(e-1) + alpha * (L - F(e-1))`` on unrounded values (each epoch
a fraction ``alpha`` of the still-active layers joins the frozen prefix; the reference code's
``freeze_algorithm`` evaluates the same sum), ``L`` the number of freezable units and ``alpha`` the freeze
ratio. With ``L = 12`` and ``alpha = 1/3``: 4, 7, 9, 10, 11, 11, 12 for e = 1..7.
``F(e) <= L`` always, so the head is never frozen. Decisions are taken at epoch ends only.

``L``: the paper and its code count the transformer's encoder layers (``num_layer = 12`` for ViT-B and
BERT-base). We count every freezable
unit, so embeddings and the final norm are part of the prefix (on ``deit_tiny`` at block granularity: the
class token, the patch projection, the position embedding, 12 encoder blocks and the final LayerNorm,
``L = 16``); the head is not counted and never frozen. This keeps the rule model-agnostic: the schedule
freezes the same *fraction* of the network after each epoch.

Defaults and their source: ``alpha = 1/3``, the setting reported for PipeTransformer's runs in its PyTorch
blog post (one of the reference code's entry scripts defaults to 0.33); the code's ``ConfigArgs`` and its
other scripts default to 0.5 (``policy.alpha=0.5`` for that), and its tuning script sweeps 0.2-0.5.
Granularity ``block`` (PipeTransformer freezes whole transformer layers).

What we changed and why: PipeTransformer's pipelining, elastic data parallelism and activation caching of
the frozen prefix are systems features outside the freezing rule; freezebench compares freezing decisions
under shared mechanics, so only the schedule is implemented. ``ceil`` is taken with a relative tolerance of
1e-9 so that floating-point error cannot add a unit when ``L * (1 - (1 - alpha)^e)`` is an integer in exact
arithmetic (``alpha = 0.5``, ``L = 12``, ``e = 2`` gives 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from freezebench.policy import Decision, FreezePolicy, Plan, PolicyConfig
from freezebench.ranges import Range

_REL_TOL = 1e-9


def frozen_prefix(L: int, alpha: float, epoch: int) -> int:
    """``F(e) = ceil(L * (1 - (1 - alpha)^e))``, the number of leading units frozen after ``epoch`` epochs."""
    if epoch <= 0 or L <= 0:
        return 0
    x = L * (1.0 - (1.0 - alpha) ** epoch)
    return max(0, min(L, math.ceil(x - _REL_TOL * max(1.0, x))))


@dataclass
class PipeTransformerConfig(PolicyConfig):
    name: str = "pipetransformer"
    alpha: float = 1 / 3  # freeze ratio in (0, 1]: share of the still-active units frozen each epoch (code: 0.5)


class PipeTransformerFreezing(FreezePolicy):
    __doc__ = __doc__
    name = "pipetransformer"
    granularity = "block"
    Config = PipeTransformerConfig

    ranges = {"alpha": Range(0, 1, lo_open=True)}

    def setup(self, units, plan: Plan) -> None:
        super().setup(units, plan)
        self.validate_config(self.cfg)
        self.prefix = 0  # F(e) of the last epoch decided

    def decide_at(self, step: int) -> bool:
        assert self.plan is not None
        return step > 0 and step % self.plan.steps_per_epoch == 0

    def decide(self, step: int) -> Decision | None:
        assert self.plan is not None
        epoch = step // self.plan.steps_per_epoch
        self.prefix = frozen_prefix(len(self.freezable), self.cfg.alpha, epoch)
        todo = [u for u in self.freezable[: self.prefix] if u not in self.frozen]
        if not todo:
            return None
        return Decision(freeze=todo, reason=f"geometric schedule: prefix {self.prefix} after epoch {epoch}")

    def state_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prefix = int(state["prefix"])
