"""Shared machinery for configs-as-data.

Configs are frozen dataclasses with a docstring under each field (read here with ``ast`` so the
CLI help and the docs come from one place), validated in ``__post_init__``, with ``to_dict()``,
``from_dict()`` and a ``cache_key()`` that is a stable hash of the canonical JSON form.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import textwrap
import typing
from typing import Any, Literal, get_args, get_origin

from fastgen.errors import InvalidArgumentError


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the docstring written under it in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): help is empty
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class: resolving the string annotations costs about
    40 us a field, and configs are made per request (a GenerateConfig per generation)."""
    return typing.get_type_hints(cls)


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """Each ``Literal[...]`` field of ``cls`` (also inside ``Optional``) -> its allowed values."""
    out: dict[str, tuple[Any, ...]] = {}
    for name, hint in type_hints(cls).items():
        for candidate in (hint, *get_args(hint)):
            if get_origin(candidate) is Literal:
                out[name] = get_args(candidate)
                break
    return out


def literal_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field (also inside ``Optional``), else None."""
    return _literal_fields(cls).get(name)


class ConfigMixin:
    """to_dict / from_dict / cache_key / literal validation for frozen config dataclasses."""

    #: Bumped when a config's meaning changes, so old cache keys never collide with new ones.
    VERSION: typing.ClassVar[int] = 1
    #: What :meth:`replace` calls an unknown field name in its error ("generate option").
    OPTION_NAME: typing.ClassVar[str] = "option"

    def replace(self, **overrides: Any):
        """A copy with some fields changed (validated again); unknown names raise, naming the known ones."""
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise InvalidArgumentError(self.OPTION_NAME, unknown[0], names)
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]

    def validate_literals(self) -> None:
        for name, choices in _literal_fields(type(self)).items():
            value = getattr(self, name)
            if dataclasses.is_dataclass(value):  # a field typed "a named choice or a config object"
                continue
            if value is not None and value not in choices:
                raise InvalidArgumentError(name.replace("_", "-"), value, choices)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise InvalidArgumentError(f"{cls.__name__} field", sorted(unknown)[0], sorted(names))
        kwargs = {}
        hints = type_hints(cls)
        for key, value in data.items():
            hint = hints[key]
            target = next((a for a in (hint, *get_args(hint)) if hasattr(a, "from_dict")), None)
            if target is not None and isinstance(value, dict):
                value = target.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def cache_key(self) -> str:
        return sha256_json({"type": type(self).__name__, "version": self.VERSION, **self.to_dict()})
