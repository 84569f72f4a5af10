"""Config validation resolves a class's type hints once, not per field per construction (configs are made
per request), and still refuses a value outside a Literal's choices."""

from __future__ import annotations

import typing
from unittest import mock

import pytest

import fastgen
from fastgen.core import config as core_config
from fastgen.errors import InvalidArgumentError


def test_type_hints_resolved_once_per_class():
    base = fastgen.GenerateConfig()
    with mock.patch.object(typing, "get_type_hints", wraps=typing.get_type_hints) as spy:
        for steps in range(1, 21):
            base.replace(steps=steps)
            fastgen.GenerateConfig(steps=steps)
    assert spy.call_count == 0  # resolved when the class was first validated, above


def test_literal_fields_still_checked():
    choices = core_config.literal_choices(fastgen.BuildConfig, "precision")
    assert choices == ("fp32", "fp16", "bf16")
    with pytest.raises(InvalidArgumentError, match="precision"):
        fastgen.BuildConfig(precision="fp64")
    assert core_config.literal_choices(fastgen.BuildConfig, "profile") is None
