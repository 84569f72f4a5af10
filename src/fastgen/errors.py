"""Exceptions raised by fastgen.

Every error a user can cause by passing bad input is a :class:`FastgenError` whose message is a
single line naming the argument and, where there is a closed set, the allowed values. The CLI turns
these into ``error: ...`` on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class FastgenError(Exception):
    """Base class of all fastgen errors."""


class InvalidArgumentError(FastgenError, ValueError):
    """A bad value for a named argument."""

    def __init__(self, argument: str, value: object, allowed: Iterable[object] | str | None = None,
                 reason: str | None = None) -> None:
        self.argument = argument
        self.value = value
        if isinstance(allowed, str) or allowed is None:
            self.allowed = allowed
        else:
            self.allowed = ", ".join(str(a) for a in allowed)
        msg = f"invalid {argument} {value!r}"
        if reason:
            msg += f": {reason}"
        if self.allowed:
            msg += f" (allowed: {self.allowed})"
        super().__init__(msg)


class ModelNotFoundError(FastgenError, FileNotFoundError):
    """A model name that is neither a preset nor a readable local path (hub ids included)."""


class UnsupportedError(FastgenError, NotImplementedError):
    """A valid request that this backend, device or build cannot serve; the message names which."""


class VerificationError(FastgenError):
    """An exported or built artifact does not match the PyTorch reference within tolerance."""


class CacheCorruptionError(FastgenError):
    """An engine directory or cache entry whose files do not match their manifest."""


class NumericalError(FastgenError):
    """A model produced non-finite values (NaN or infinity); the message names where (step, prompt, input)."""


def check_choice(argument: str, value: object, allowed: Iterable[object]) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise InvalidArgumentError(argument, value, allowed)
