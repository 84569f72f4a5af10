"""Click options generated from config dataclasses, so defaults and help live in one place."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click

from fastgen.core.config import field_docs, literal_choices


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a config field: its ``metadata["choices"]`` (a callable, asked now: e.g. the
    registered engine backends) or its ``Literal[...]`` values; None when the field is open."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    choices = field.metadata.get("choices") if field is not None else None
    if choices is not None:
        return tuple(choices() if callable(choices) else choices)
    return literal_choices(cls, name)


def dataclass_options(cls: type, *, exclude: Iterable[str] = (), prefix: str = "") -> Callable:
    """Decorator adding one option per field of ``cls`` (nested dataclasses and profiles skipped).

    Options default to None so that only flags the user gave override the dataclass defaults; the
    help text shows the dataclass default.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()
    options = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        choices = field_choices(cls, f.name)
        help_text = docs.get(f.name, "")
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            continue  # sequences have their own flags (repeatable options)
        if choices is not None:
            kind: Any = click.Choice([str(c) for c in choices])
        elif hint is bool:
            options.append(click.option(f"{_flag(prefix + f.name)}/--no-{(prefix + f.name).replace('_', '-')}",
                                        f.name, default=None, help=f"{help_text} [default: {default}]"))
            continue
        elif hint is int or int in args:
            kind = int
        elif hint is float or float in args:
            kind = float
        elif hint is str:
            kind = str
        else:
            continue  # nested configs and profiles have their own flags
        options.append(click.option(_flag(prefix + f.name), f.name, type=kind, default=None,
                                    help=f"{help_text} [default: {default}]"))

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def pop_config(cls: type, kwargs: dict[str, Any], **extra: Any):
    """Build ``cls`` from the options the user gave (removing them from ``kwargs``)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs.pop(f.name)
            if value is not None:
                values[f.name] = value
    values.update({k: v for k, v in extra.items() if v is not None})
    return cls(**values)
