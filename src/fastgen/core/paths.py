"""Where fastgen keeps files between runs: one resolver for every cache directory."""

from __future__ import annotations

import os
from pathlib import Path

#: Cache kinds and the environment variable that overrides each one's directory.
CACHE_ENV = {"engines": "FASTGEN_CACHE_DIR", "autotune": "FASTGEN_AUTOTUNE_DIR"}


def cache_dir(kind: str) -> Path:
    """The directory of one cache ``kind`` (``engines`` or ``autotune``).

    ``$FASTGEN_CACHE_DIR`` (engines) or ``$FASTGEN_AUTOTUNE_DIR`` (autotune) when set, else
    ``$XDG_CACHE_HOME/fastgen/<kind>``, else ``~/.cache/fastgen/<kind>``. Nothing is created here.
    """
    if kind not in CACHE_ENV:
        from fastgen.errors import InvalidArgumentError

        raise InvalidArgumentError("cache kind", kind, tuple(CACHE_ENV))
    override = os.environ.get(CACHE_ENV[kind])
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "fastgen" / kind


__all__ = ["CACHE_ENV", "cache_dir"]
