import pytest
from omegaconf import OmegaConf

from freezebench.config import flatten, load_config
from freezebench.errors import ConfigError, UnknownNameError


def test_defaults_and_overrides():
    cfg = load_config(["trainer.epochs=3", "optim.lr=0.1", "optim.name=adamw"])
    assert cfg.trainer.epochs == 3 and cfg.optim.lr == 0.1 and cfg.optim.name == "adamw"
    assert cfg.policy.name == "full" and cfg.data.name == "digits"


def test_policy_selects_its_config_group():
    cfg = load_config(["policy=static", "policy.fraction=0.25", "policy.at_step=7"])
    assert cfg.policy.name == "static"
    assert cfg.policy.fraction == 0.25 and cfg.policy.at_step == 7
    assert OmegaConf.to_object(cfg.policy).__class__.__name__ == "StaticConfig"


def test_policy_knob_of_other_policy_is_unknown():
    with pytest.raises(ConfigError, match=r"unknown config key 'policy.fraction'"):
        load_config(["policy=full", "policy.fraction=0.3"])


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(["trainer.epoch=3"])
    assert "'trainer.epoch'" in str(e.value) and "'trainer.epochs'" in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.progress=maybe", "trainer.progress"),
        ("optim.name=sgdd", "Did you mean 'sgd'"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.epochs=0", "must be positive"),
        ("trainer.device=tpu", "trainer.device"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config([override])


def test_unknown_policy_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        load_config(["policy=stati"])
    msg = str(e.value)
    assert "'stati'" in msg and "Did you mean 'static'" in msg and "full" in msg


def test_preset_then_command_line(tmp_path):
    p = tmp_path / "preset.yaml"
    p.write_text("policy: static\ntrainer:\n  epochs: 4\noptim:\n  lr: 0.2\n")
    cfg = load_config(["optim.lr=0.3"], preset=str(p))
    assert cfg.policy.name == "static" and cfg.trainer.epochs == 4 and cfg.optim.lr == 0.3
    cfg = load_config(["policy=full"], preset=str(p))
    assert cfg.policy.name == "full"


def test_preset_unknown_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  epohcs: 4\n")
    with pytest.raises(ConfigError, match="trainer.epohcs"):
        load_config([], preset=str(p))


def test_repo_presets_load():
    cfg = load_config([], preset="digits_resnet20")
    assert cfg.data.name == "digits" and cfg.model.name == "resnet20"


def test_missing_preset():
    with pytest.raises(ConfigError, match="not found"):
        load_config([], preset="no_such_preset")


def test_flatten_is_dotted_leaves():
    flat = flatten(load_config(["policy=static"]))
    assert flat["policy.name"] == "static" and flat["trainer.epochs"] == 10
    assert flat["optim.betas"] == "[0.9, 0.999]"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_readme_config_reference_is_current():
    from pathlib import Path

    from freezebench.config import reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate with `freezebench config --reference`"
