"""Declarative config field ranges (freezebench.ranges) and the policies' tables of them."""

from __future__ import annotations

import math
import re

import pytest

from freezebench.config import load_config
from freezebench.errors import ConfigError
from freezebench.ranges import Range


def test_range_bounds_and_messages():
    r = Range(0, 1, lo_open=True, note="(fraction of training)")
    assert [r.contains(v) for v in (0.0, 1e-9, 1.0, 1.0 + 1e-9, math.nan)] == [False, True, True, False, False]
    assert Range(2).describe() == ">= 2" and Range(0, lo_open=True).describe() == "positive"
    assert not Range(0, lo_open=True).contains(math.inf) and not Range().contains(-math.inf)  # finite only
    assert not Range(0).contains(True)  # a flag is not a number
    assert Range(0, 1, hi_open=True).describe() == "in [0, 1)" and Range(hi=5).describe() == "<= 5"
    with pytest.raises(ConfigError) as e:
        r.check("policy.t0", 0.0)
    assert str(e.value) == "policy.t0 must be in (0, 1] (fraction of training), got 0.0"
    Range(0).check("policy.units", None)  # an optional field left unset is not checked


@pytest.mark.parametrize("override, message", [
    ("policy=freezeout_linear policy.t0=0", "policy.t0 must be in (0, 1] (fraction of training), got 0.0"),
    ("policy=pipetransformer policy.alpha=1.5", "policy.alpha must be in (0, 1], got 1.5"),
    ("policy=static policy.fraction=1.5", "policy.fraction must be in [0, 1], got 1.5"),
    ("policy=static policy.units=-1", "policy.units must be >= 0, got -1"),
    ("policy=autofreeze policy.percentile=101", "policy.percentile must be in [0, 100], got 101.0"),
    ("policy=egeria policy.window=1", "policy.window must be >= 2 checks (a slope needs two points), got 1"),
    ("policy=egeria policy.tolerance=nan", "policy.tolerance must be >= 0, got nan"),
    ("policy=egeria policy.precision=fp64", "policy.precision='fp64' is not one of"),
    ("policy=svcca policy.max_points=1", "policy.max_points must be >= 2, got 1"),
    ("policy=spfde policy.target_flops_reduction=1", "policy.target_flops_reduction must be in [0, 1), got 1.0"),
])
def test_policy_ranges_refuse_with_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(override.split())
