"""The exact state comparison the state round-trip tests use (tests/helpers.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import assert_state_equal, differences


def test_large_tensors_that_differ_in_one_element_are_told_apart():
    # repr elides tensors over 1,000 elements: these two printed the same
    a = torch.zeros(2000)
    b = a.clone()
    b[1000] = 1.0
    assert repr(a) == repr(b)
    assert differences({"h": [a]}, {"h": [b]}) == ["state['h'][0]: tensors differ"]
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_state_equal({"h": [a]}, {"h": [b]})


def test_exact_equality_of_nested_states():
    s = {"acc": {1: [torch.arange(5.0), torch.tensor([math.nan, 2.0])]}, "n": 3, "x": 0.5, "t": (1, "a"),
         "np": np.arange(3), "f": math.nan}
    copy = {"acc": {1: [torch.arange(5.0), torch.tensor([math.nan, 2.0])]}, "n": 3, "x": 0.5, "t": (1, "a"),
            "np": np.arange(3), "f": math.nan}
    assert differences(s, copy) == []
    assert differences({"a": torch.zeros(3)}, {"a": torch.zeros(3, dtype=torch.float64)})  # dtype counts
    assert differences({"a": torch.zeros(3)}, {"a": torch.zeros(4)})  # shape counts
    assert differences({"a": 1, "b": 2}, {"b": 2, "a": 1})  # key order counts (as in a state_dict)
    assert differences([1, 2], (1, 2))  # container type counts
    assert differences({"x": 0.5}, {"x": 0.5 + 1e-16})  # floats compare exactly
    assert differences({"np": np.arange(3)}, {"np": np.arange(1, 4)}) == ["state['np']: arrays differ"]
