"""Click options generated from config dataclasses, so defaults and help live in one place; and the checks
every command runs on what the user typed before any work (empty paths, text that is not UTF-8,
folders that cannot be written, the engine cache)."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from fastgen.core.config import field_docs, literal_choices, type_hints
from fastgen.errors import InvalidArgumentError


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
    hints = type_hints(cls)
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


# --- checks shared by the commands: run by click before a command starts, or first thing in it ---------


def printable(text: object) -> str:
    """``text`` safe to print on any UTF-8 stream, on one line: bytes of a file name or argument that are
    not UTF-8 (Python hands them over as lone surrogates) show as U+FFFD, control characters escaped."""
    value = str(text)
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate surrogateescape did not make ("\ud800")
        value = value.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def _param_name(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    if isinstance(param, click.Option) and param.opts:
        return max(param.opts, key=len)  # --out, not -o
    return (param.name or "value").replace("_", "-")  # arguments: engine, model, files


def nonempty(ctx: click.Context | None, param: click.Parameter | None, value: Any) -> Any:
    """Click callback: refuse the empty string for a path or model (``Path("")`` is the current folder,
    so ``--out ""`` would write into it and ``--cache-dir ""`` would make it the cache)."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, str) and not item.strip():
            raise InvalidArgumentError(_param_name(param), item, "a non-empty path or name ('.' is the current folder)")
    return value


def utf8_text(ctx: click.Context | None, param: click.Parameter | None, value: Any) -> Any:
    """Click callback for prompts and texts: refuse text that is not valid UTF-8.

    A terminal in another encoding (Latin-1 ``café``) hands Python bytes that are not UTF-8, which arrive
    as lone surrogates. Refusing is the behaviour a user wants: replacing them would silently generate
    or score a different text than the one typed, and the tokenizers cannot take them as they are.
    """
    for item in value if isinstance(value, tuple) else (value,):
        if not isinstance(item, str):
            continue
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = item[exc.start:exc.end].encode("utf-8", "surrogateescape").hex() if all(
                "\udc80" <= c <= "\udcff" for c in item[exc.start:exc.end]) else "a lone surrogate"
            raise InvalidArgumentError(_param_name(param), printable(item), "UTF-8 text",
                                       reason=f"not valid UTF-8 (byte {bad} at character {exc.start}); set the "
                                              "terminal or file to UTF-8") from None
    return value


def writable_dir(path: Path, argument: str) -> Path:
    """Check that ``path`` is, or can be made, a folder this process can write in, without creating it;
    returns the nearest existing folder at or above it. One line naming ``argument`` otherwise.

    Probing (a temporary folder created and removed) rather than ``os.access``: access() says yes to
    root on a read-only mount and ignores ACLs, and a check that lies is worse than none.
    """
    import errno
    import tempfile

    path = Path(os.path.abspath(path))
    probe = path
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "exists and is not a directory" if probe == path else f"{printable(probe)} is not a directory"
        raise InvalidArgumentError(argument, printable(path), "a directory", reason=what)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fastgen-probe-", dir=probe))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = f"{printable(probe)} is not writable ({reason})"
        raise InvalidArgumentError(argument, printable(path), "a directory this user can write in",
                                   reason=reason) from None
    return probe


def engine_cache(cache_dir: str | None, *, write: bool = True) -> Any:
    """The engine cache a command uses (``--cache-dir``, else ``$FASTGEN_CACHE_DIR``, else the default),
    checked before any work: a file, ``/dev/null`` or a folder this user cannot write in (``write``) is
    refused in one line naming the option or variable it came from, rather than after an export."""
    from fastgen.core.paths import CACHE_ENV
    from fastgen.core.paths import cache_dir as default_cache_dir
    from fastgen.engines.cache import EngineCache

    env = CACHE_ENV["engines"]
    if cache_dir is not None:
        root, argument = Path(cache_dir).expanduser(), "--cache-dir"
    else:
        root = default_cache_dir("engines")
        argument = env if env and os.environ.get(env) else "cache dir (set --cache-dir or $FASTGEN_CACHE_DIR)"
    if os.path.lexists(root) and not root.is_dir():
        raise InvalidArgumentError(argument, printable(root), "a directory", reason="exists and is not a directory")
    if write:
        writable_dir(root, argument)
    return EngineCache(root)
