"""Config schema: unknown keys, wrong types and bad values name the key; overrides parse; TOML round-trips."""

import dataclasses
import math
import re
import tomllib

import pytest

from fastft.config import FinetuneConfig, apply_overrides, config_from_dict, load_config, to_toml
from fastft.errors import ConfigError


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    return str(exc.value)


# --------------------------------------------------------------------------------------------------------------------
# Unknown keys


def test_defaults_are_valid_and_equal_the_dataclass_defaults():
    cfg = config_from_dict({})
    assert cfg == FinetuneConfig()
    assert cfg.optim.lr == 0.001 and cfg.data.batch_size == 32 and cfg.model.freeze == "backbone"


def test_unknown_top_level_section_names_it_and_suggests_the_close_one():
    msg = _error({"optimizer": {"lr": 0.1}})
    assert "'optimizer'" in msg
    assert "did you mean optim?" in msg


def test_unknown_key_in_section_names_the_dotted_key_and_suggests_the_close_one():
    msg = _error({"optim": {"lrr": 0.1}})
    assert "'optim.lrr'" in msg
    assert "did you mean optim.lr?" in msg


def test_unknown_key_without_a_close_match_has_no_hint():
    msg = _error({"data": {"zzzzqqq": 1}})
    assert "'data.zzzzqqq'" in msg
    assert "did you mean" not in msg


def test_section_given_a_scalar_is_an_error_naming_the_section():
    msg = _error({"optim": 3})
    assert msg.startswith("optim:")


# --------------------------------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"data": {"batch_size": "32"}}, "data.batch_size"),  # string for int
        ({"data": {"batch_size": 32.0}}, "data.batch_size"),  # float for int, even when integral
        ({"data": {"batch_size": True}}, "data.batch_size"),  # bool is an int subclass in Python, not in the schema
        ({"run": {"seed": False}}, "run.seed"),
        ({"optim": {"lr": "0.1"}}, "optim.lr"),  # string for float
        ({"optim": {"lr": True}}, "optim.lr"),  # bool for float
        ({"model": {"channels_last": 1}}, "model.channels_last"),  # int for bool
        ({"model": {"name": 18}}, "model.name"),  # int for str
        ({"optim": {"betas": 0.9}}, "optim.betas"),  # scalar for list
    ],
)
def test_wrong_type_names_the_key(data, key):
    msg = _error(data)
    assert msg.startswith(f"{key}:"), msg


def test_wrong_list_item_type_names_the_item_index():
    msg = _error({"optim": {"betas": [0.9, "0.999"]}})
    assert msg.startswith("optim.betas[1]:"), msg


def test_wrong_item_in_freeze_pattern_list_names_model_freeze():
    # freeze is `str | list[str]`: neither arm accepts a list holding an int
    msg = _error({"model": {"freeze": ["layer1.*", 3]}})
    assert msg.startswith("model.freeze:"), msg


def test_ints_are_accepted_for_floats_and_become_floats():
    cfg = config_from_dict({"optim": {"lr": 1, "betas": [0, 0], "weight_decay": 0}, "model": {"head_dropout": 0}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.0, 0.0] and all(isinstance(b, float) for b in cfg.optim.betas)
    assert isinstance(cfg.optim.weight_decay, float)


def test_freeze_accepts_a_pattern_list():
    cfg = config_from_dict({"model": {"freeze": ["layer1.*", "conv1.*"]}})
    assert cfg.model.freeze == ["layer1.*", "conv1.*"]


# --------------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"optim": {"lr": 0.0}}, "optim.lr"),
        ({"optim": {"lr": -0.1}}, "optim.lr"),
        ({"optim": {"lr": math.nan}}, "optim.lr"),
        ({"data": {"val_fraction": 0.0}}, "data.val_fraction"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"data": {"workers": -1}}, "data.workers"),
        ({"data": {"loader": "ffcv"}}, "data.loader"),
        ({"precision": {"dtype": "fp8"}}, "precision.dtype"),
        ({"model": {"freeze": "layers"}}, "model.freeze"),
        ({"model": {"freeze": "until:"}}, "model.freeze"),  # a module name is required after until:
        ({"model": {"head_dropout": 1.0}}, "model.head_dropout"),
        ({"run": {"device": "gpu"}}, "run.device"),
        ({"run": {"device": "cuda:x"}}, "run.device"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas"),
        ({"optim": {"name": "lamb"}}, "optim.name"),
        ({"optim": {"grad_accum": 0}}, "optim.grad_accum"),
        ({"optim": {"momentum": 1.0}}, "optim.momentum"),
        ({"parallel": {"zero_stage": 4}}, "parallel.zero_stage"),
        ({"parallel": {"zero_stage": 3}}, "parallel.zero_stage"),
        ({"checkpoint": {"best_mode": "up"}}, "checkpoint.best_mode"),
    ],
)
def test_out_of_range_value_names_the_key(data, key):
    msg = _error(data)
    assert msg.startswith(f"{key}:"), msg


@pytest.mark.parametrize(
    "data",
    [
        {"data": {"val_fraction": 0.5}},
        {"model": {"freeze": "until:layer3"}},
        {"model": {"freeze": "none"}},
        {"run": {"device": "cuda:1"}},
        {"optim": {"betas": [0.0, 0.5]}},
        {"parallel": {"zero_stage": 2}},
    ],
)
def test_boundary_values_inside_the_range_are_accepted(data):
    cfg = config_from_dict(data)
    ((section, values),) = data.items()
    ((key, value),) = values.items()
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"optim": {"momentum": math.nan}}, "optim.momentum"),
        ({"data": {"val_fraction": math.nan}}, "data.val_fraction"),
    ],
)
def test_nan_is_out_of_range(data, key):
    msg = _error(data)
    assert msg.startswith(f"{key}:"), msg


# --------------------------------------------------------------------------------------------------------------------
# Overrides


def test_override_with_dashes_parses_a_float():
    cfg = load_config(None, ["--optim.lr=0.01"])
    assert cfg.optim.lr == 0.01


def test_override_without_dashes_parses_exponent_notation():
    cfg = load_config(None, ["optim.lr=1e-2"])
    assert cfg.optim.lr == 0.01


def test_override_list_value_becomes_a_list():
    cfg = load_config(None, ['--model.freeze=["layer1.*","conv1.*"]'])
    assert cfg.model.freeze == ["layer1.*", "conv1.*"]


def test_override_numeric_text_for_a_string_field_stays_a_string():
    cfg = load_config(None, ["--run.name=123"])
    assert cfg.run.name == "123"
    # the same for a value TOML would read as a bool
    assert load_config(None, ["--run.name=true"]).run.name == "true"


def test_override_bare_word_that_is_not_toml_is_a_string():
    cfg = load_config(None, ["--model.freeze=until:layer3", "--model.name=resnet50"])
    assert cfg.model.freeze == "until:layer3"
    assert cfg.model.name == "resnet50"


def test_override_of_int_field_with_a_string_is_a_type_error():
    with pytest.raises(ConfigError, match=r"^data\.batch_size:"):
        load_config(None, ["--data.batch_size=big"])


def test_overrides_apply_in_order_over_the_file_values():
    data = {"optim": {"lr": 0.5, "epochs": 3}}
    out = apply_overrides(data, ["--optim.lr=0.1", "--optim.lr=0.2"])
    assert out == {"optim": {"lr": 0.2, "epochs": 3}}


def test_override_through_a_non_section_value_errors():
    # optim.lr holds a float: it cannot be descended into
    with pytest.raises(ConfigError, match=r"optim\.lr\.x.*'lr' is not a section"):
        apply_overrides({"optim": {"lr": 0.1}}, ["--optim.lr.x=1"])
    # without a file value the dict is built, then the schema rejects it, naming the key
    with pytest.raises(ConfigError, match=r"^optim\.lr:"):
        load_config(None, ["--optim.lr.x=1"])
    # a whole section replaced by a scalar
    with pytest.raises(ConfigError, match=r"^optim:"):
        load_config(None, ["--optim=1"])


def test_override_without_equals_sign_errors():
    with pytest.raises(ConfigError, match=r"expected --section\.key=value"):
        apply_overrides({}, ["--optim.lr"])


def test_override_of_unknown_key_errors_with_hint():
    with pytest.raises(ConfigError, match=r"'optim\.momentun'.*did you mean optim\.momentum\?"):
        load_config(None, ["--optim.momentun=0.5"])


# --------------------------------------------------------------------------------------------------------------------
# TOML files


def _non_default_config() -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name = "efficientnet_b0"
    cfg.model.weights = "none"
    cfg.model.num_classes = 7
    cfg.model.freeze = ["layer1.*", "conv1.*"]
    cfg.model.head_hidden = 256
    cfg.model.head_dropout = 0.25
    cfg.model.channels_last = False
    cfg.data.root = 'C:\\data\\my "images"'  # backslashes and quotes must be escaped
    cfg.data.val_fraction = 0.1
    cfg.data.batch_size = 8
    cfg.optim.name = "adamw"
    cfg.optim.lr = 3e-05  # repr gives an exponent form that must still be valid TOML
    cfg.optim.betas = [0.8, 0.95]
    cfg.optim.weight_decay = 0.05
    cfg.precision.dtype = "bf16"
    cfg.compile.target = "head"
    cfg.parallel.zero_stage = 2
    cfg.checkpoint.best_mode = "min"
    cfg.checkpoint.best_metric = "loss"
    cfg.log.tensorboard = False
    cfg.run.name = "123"
    cfg.run.device = "cuda:1"
    cfg.run.seed = 42
    return cfg.validate()


def test_toml_round_trip_of_a_non_default_config(tmp_path):
    cfg = _non_default_config()
    assert cfg != FinetuneConfig()
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    loaded = load_config(path)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert loaded.run.name == "123" and isinstance(loaded.run.name, str)


def test_toml_file_values_are_overridden_by_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlr = 0.5\nepochs = 2\n\n[model]\nname = "resnet50"\n')
    cfg = load_config(path, ["--optim.lr=0.25"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.name) == (0.25, 2, "resnet50")


def test_toml_round_trip_of_a_string_with_a_newline(tmp_path):
    cfg = FinetuneConfig()
    cfg.run.name = "a\nb"
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path).run.name == "a\nb"


def test_to_toml_output_is_parseable_and_has_every_section():
    text = to_toml(_non_default_config())
    parsed = tomllib.loads(text)
    assert set(parsed) == {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_missing_config_file_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_binary_config_file_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "model.toml"
    path.write_bytes(b"\x80\x81\xff[optim]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_invalid_value_in_a_file_names_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[precision]\ndtype = 'fp8'\n")
    with pytest.raises(ConfigError, match=r"^precision\.dtype:.*'fp8'"):
        load_config(path)


def _float_fields() -> list[str]:
    import typing

    out = []
    sections = typing.get_type_hints(FinetuneConfig)
    for section in dataclasses.fields(FinetuneConfig):
        hints = typing.get_type_hints(sections[section.name])
        for f in dataclasses.fields(sections[section.name]):
            tp = hints[f.name]
            if tp is float or tp == list[float]:
                out.append(f"{section.name}.{f.name}")
    return out


@pytest.mark.parametrize("key", _float_fields())
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_no_numeric_field_takes_an_infinite_value(key, value):
    # optim.lr = inf used to pass validation and fail at the first step (with a NaN message)
    section, name = key.split(".")
    default = getattr(FinetuneConfig(), section).__dict__[name]
    data = {section: {name: [*default[:-1], value] if isinstance(default, list) else value}}
    with pytest.raises(ConfigError, match=re.escape(key)):
        config_from_dict(data)


def test_an_infinite_unfreeze_lr_factor_is_refused():
    with pytest.raises(ConfigError, match=r"optim\.unfreeze\[0\]"):
        config_from_dict({"optim": {"unfreeze": ["2:layer4:inf"]}})
