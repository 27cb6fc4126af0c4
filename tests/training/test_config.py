"""TrainConfig validation: one line per problem, did-you-mean for unknown keys, a settings fingerprint."""

from __future__ import annotations

import pytest

from forgetless.errors import InputError
from forgetless.training import TrainConfig


def test_defaults_are_valid_and_documented():
    config = TrainConfig()
    assert config.lr is None and config.batch_size == 8 and config.mixed_precision == "no"
    assert all(field.description for field in TrainConfig.model_fields.values())


def test_unknown_key_suggests_the_field():
    with pytest.raises(InputError) as caught:
        TrainConfig.from_dict({"warmup": 0.1}, source="methods.0.train")
    message = str(caught.value)
    assert message.startswith("methods.0.train: unknown key 'warmup'. Did you mean 'warmup_ratio'?")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"lr": -1}, "^train: lr: "),
        ({"grad_accum": 0}, "^train: grad_accum: "),
        ({"mixed_precision": "fp8"}, "^train: mixed_precision: "),
        ({"scheduler": "step"}, "^train: scheduler: "),
        ({"warmup_ratio": 2}, "^train: warmup_ratio: "),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(InputError, match=field):
        TrainConfig.from_dict(data)


def test_coerce_accepts_object_mapping_and_none():
    config = TrainConfig(epochs=3)
    assert TrainConfig.coerce(config) is config
    assert TrainConfig.coerce({"epochs": 3}) == config
    assert TrainConfig.coerce(None) == TrainConfig()


def test_fingerprint_ignores_logging_but_not_training_settings():
    base = TrainConfig()
    assert TrainConfig(log_every=1, progress=False, checkpoint_every=7).fingerprint() == base.fingerprint()
    assert TrainConfig(lr=1e-3).fingerprint() != base.fingerprint()
    assert TrainConfig(seed=1).fingerprint() != base.fingerprint()
