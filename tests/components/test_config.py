import dataclasses

import pytest

from components.common.config import ConfigError, resolve, valid_keys


def test_overrides_are_typed():
    cfg = resolve("tiny", ["train.max_steps=50", "model.train_vision=true",
                           "eval.ks=10,100", "train.lr=1e-4"])
    assert cfg.train.max_steps == 50 and cfg.model.train_vision is True
    assert cfg.eval.ks == (10, 100) and cfg.train.lr == 1e-4
    assert cfg.model.image_size == 32  # from the preset


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        resolve("tiny", ["train.max_stepz=5"])
    assert "train.max_stepz" in str(e.value) and "train.max_steps" in str(e.value)
    assert "model.variant" in valid_keys()


@pytest.mark.parametrize("bad", ["train.max_steps=many", "model.variant=bert", "noequals"])
def test_bad_values_are_errors(bad):
    with pytest.raises(ConfigError):
        resolve("tiny", [bad])


def test_config_is_frozen_and_presets_checked():
    cfg = resolve("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3
    with pytest.raises(ConfigError, match="presets: tiny"):
        resolve("huge")
