"""``full``: train every unit for the whole run (the reference every saving is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from freezebench.policy import FreezePolicy, PolicyConfig


@dataclass
class FullConfig(PolicyConfig):
    name: str = "full"


class FullTraining(FreezePolicy):
    """No freezing. Method card: the baseline of every table in the SmartFRZ paper ("Full")."""

    name = "full"
    Config = FullConfig

    def decide_at(self, step: int) -> bool:
        return False
