"""Quantization configs: validation, dict/JSON round trips, type dispatch, stable cache keys."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fastgen.core.config import field_docs
from fastgen.errors import InvalidArgumentError
from fastgen.quant import (
    CONFIG_TYPES,
    DEFAULT_SKIP,
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    config_from_dict,
)

CONFIGS = [
    Int8WeightOnlyConfig(),
    Int4WeightOnlyConfig(),
    Int4WeightOnlyConfig(group_size=32, skip=("*to_q",)),
    Int8DynamicConfig(),
    Int8DynamicConfig(smoothquant=True, alpha=0.8),
    Int8StaticConfig(smoothquant=True),
    Fp8DynamicConfig(skip=()),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_dict_and_json_round_trip(config):
    data = config.to_dict()
    assert data["type"] == type(config).__name__ and data["version"] == type(config).VERSION
    assert config_from_dict(data) == config
    assert type(config).from_dict(data) == config
    again = config_from_dict(json.loads(json.dumps(data)))
    assert again == config and again.cache_key() == config.cache_key()


def test_cache_key_is_stable_and_distinguishes_configs():
    keys = {c.cache_key() for c in CONFIGS}
    assert len(keys) == len(CONFIGS)
    # Same math, different class: the two int8 weight formats must never share an engine.
    assert Int8WeightOnlyConfig().cache_key() != Int8DynamicConfig().cache_key()
    # A golden value: changing a config's serialised form must be deliberate (bump VERSION).
    assert Int8DynamicConfig().cache_key() == "2b66ecd87dc48fd9b53c987a3fb95123f44067bae71e382cb3a5453f31d14cd7"
    assert Int8DynamicConfig().to_dict() == {"type": "Int8DynamicConfig", "skip": None, "version": 1,
                                             "smoothquant": False, "alpha": 0.5}


def test_every_field_has_a_docstring():
    for cls in CONFIG_TYPES.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Int8DynamicConfig().alpha = 0.3  # type: ignore[misc]


@pytest.mark.parametrize(("make", "argument"), [
    (lambda: Int4WeightOnlyConfig(group_size=48), "group-size"),
    (lambda: Int4WeightOnlyConfig(group_size=True), "group-size"),
    (lambda: Int8DynamicConfig(alpha=1.5), "alpha"),
    (lambda: Int8DynamicConfig(alpha=float("nan")), "alpha"),
    (lambda: Int8StaticConfig(smoothquant="yes"), "smoothquant"),
    (lambda: Int8WeightOnlyConfig(version=2), "version"),
    (lambda: Fp8DynamicConfig(skip=("",)), "skip"),
    (lambda: Fp8DynamicConfig(skip="*to_q"), "skip"),
    (lambda: QuantConfig(), "config"),
])
def test_bad_values_raise_naming_the_argument(make, argument):
    with pytest.raises(InvalidArgumentError) as e:
        make()
    assert e.value.argument == argument
    assert "\n" not in str(e.value)


def test_config_from_dict_rejects_unknown_types_and_fields():
    with pytest.raises(InvalidArgumentError, match="Int8DynamicConfig"):
        config_from_dict({"type": "Int3Config"})
    with pytest.raises(InvalidArgumentError):
        config_from_dict({"alpha": 0.5})  # no type
    with pytest.raises(InvalidArgumentError):
        config_from_dict({"type": "Int8DynamicConfig", "beta": 1})
    with pytest.raises(InvalidArgumentError):
        Int8DynamicConfig.from_dict({"type": "Fp8DynamicConfig"})


def test_skip_list_defaults_and_overrides():
    config = Int8DynamicConfig()
    assert config.skip_patterns() == DEFAULT_SKIP
    assert config.skips("model.time_embedding.linear_1")
    assert config.skips("conv_in")
    assert not config.skips("model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not Int8DynamicConfig(skip=()).skips("model.time_embedding.linear_1")
    assert Int8DynamicConfig(skip=["*attn1.*"]).skip == ("*attn1.*",)  # lists become tuples


def test_derived_properties():
    assert Int8WeightOnlyConfig().act_dtype is None and not Int8WeightOnlyConfig().needs_calibration
    assert Int4WeightOnlyConfig(group_size=64).group_size == 64
    assert Int8DynamicConfig().act_dtype == "int8" and not Int8DynamicConfig().needs_calibration
    assert Int8DynamicConfig(smoothquant=True).needs_calibration
    assert Int8StaticConfig().needs_calibration
    assert Fp8DynamicConfig().act_dtype == "fp8"
    assert Int8DynamicConfig().same_math(Int8DynamicConfig(skip=()))
    assert not Int8DynamicConfig().same_math(Int8DynamicConfig(alpha=0.6))
    assert not Int8DynamicConfig().same_math(Int8StaticConfig())


def test_package_import_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fastgen.quant; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
