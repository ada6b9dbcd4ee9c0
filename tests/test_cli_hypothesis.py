"""Property: any command line of ``key=value`` overrides yields a valid config or one clear line, never a traceback.

Keys are the real config keys (of every registered policy), near misses, random text and malformed items;
values are numbers, booleans, null, lists, mappings, interpolations, quotes and random text.
"""

from __future__ import annotations

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freezebench.cli import main
from omegaconf import OmegaConf

from freezebench.config import Config, _all_keys, _policy_node
from freezebench.registry import POLICIES

KEYS = sorted(set(_all_keys(OmegaConf.structured(Config)))
              | {f"policy.{k}" for name in POLICIES.names() for k in _all_keys(_policy_node(name))})

keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),  # near misses
    st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0] + ".nope" if "." in k else "nope." + k),
    st.sampled_from(["policy", "resume", "trainer", "model", ".", "..", "a..b", "trainer.", ".epochs", "1", "[0]",
                     "policy.name", "tracking.tags.x", "data.betas.0", "optim.betas[0]", "${x}", " ", "é"]),
    st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s),
)
values = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["true", "false", "True", "null", "None", "~", "", "[]", "{}", "[1, 2]", "[0.9,0.99,1]",
                     "{a: 1}", "${trainer.epochs}", "${nope}", "${oc.env:HOME}", "${oc.env:NOPE_XYZ}", "'",
                     "\"", "'a b'", "[", "{", "]", ":", "- x", "cpu", "cuda:x", "auto", "sgd", "adamw", "layer",
                     "1e-3", "0x10", "1_000", "inf", "-inf", "nan", ".5", "3.", "+3", "resnet20", "tiny"]),
    st.sampled_from(POLICIES.names()),
    st.text(max_size=16),
)
overrides = st.one_of(
    st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=16),  # malformed: no '=', '=value', empty, spaces, quotes
    st.text(alphabet=" '\"=ab.[]{}$:,\\", max_size=12),  # one argument holding several (mlflow run -P style)
    st.sampled_from(["=1", "=", "key", "a b=1", "x='unclosed", 'y="', "trainer.epochs =3", " =3", "a 'b", "trainer=3", "[=", "[0]=1", "a[=1", "a]=1", "{=1"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(overrides, max_size=5))
def test_config_command_line_is_valid_or_one_clear_error(items):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["config", "--", *items])
    text = err.getvalue()
    assert "Traceback" not in text
    if code == 0:
        assert out.getvalue().strip()  # the resolved config was printed
        assert text == ""
    else:
        assert code == 2, (code, text)
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("freezebench: error: ") and len(lines[0]) > 25, text
