"""Declarative ranges for numeric config fields: one table per config, one checker, one message format.

    class FreezeOut(FreezePolicy):
        ranges = {"t0": Range(0, 1, lo_open=True, note="(fraction of training)")}

    check_ranges(cfg, FreezeOut.ranges, prefix="policy.")
    # ConfigError: policy.t0 must be in (0, 1] (fraction of training), got 0.0

A field whose value is ``None`` (an optional field left unset) is not checked; any other value must be a
finite number inside the range (``nan`` and ``inf`` never are). Checks that are not a range (a choice among
names, a file that must exist) stay code next to the table. The same tables serve the policies' fields
(``FreezePolicy.ranges``) and the trainer's, data's and optimiser's (:data:`freezebench.config.RANGES`, keyed by
dotted path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """``lo <= value <= hi`` (either bound may be ``None``: unbounded; ``*_open``: strict)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""  # said after the bound: a unit ("epoch") or a reason ("checks (a slope needs two points)")

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self) -> str:
        """``positive``, ``in (0, 1]``, ``>= 1``, ``< 100``, ..."""
        if self.lo == 0 and self.lo_open and self.hi is None:
            return "positive"
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "a number"

    def check(self, key: str, value: Any) -> None:
        """Raise one :class:`ConfigError` line when ``value`` (not ``None``) is outside the range."""
        if value is None or self.contains(value):
            return
        raise ConfigError(f"{key} must be {self.describe()}{' ' + self.note if self.note else ''}, got {value}")


def check_ranges(cfg: Any, ranges: Mapping[str, Range], prefix: str = "",
                 get: Callable[[Any, str], Any] = getattr) -> None:
    """Check every ``field: Range`` of ``ranges`` on ``cfg`` (a dataclass or config node), in table order;
    ``get(cfg, field)`` reads a field (e.g. ``OmegaConf.select`` for dotted keys)."""
    for name, rng in ranges.items():
        rng.check(prefix + name, get(cfg, name))
