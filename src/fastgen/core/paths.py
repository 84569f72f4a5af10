"""Where fastgen keeps files between runs: one resolver for every cache directory."""

from __future__ import annotations

import os
from pathlib import Path

#: Cache kinds and the environment variable that overrides each one's directory (None: no override).
CACHE_ENV: dict[str, str | None] = {"engines": "FASTGEN_CACHE_DIR", "autotune": "FASTGEN_AUTOTUNE_DIR",
                                    "ort-tensorrt": None, "tensorrt-timing": None}


def cache_dir(kind: str) -> Path:
    """The directory of one cache ``kind``: ``engines`` (fastgen's engine cache), ``autotune`` (tuned
    Triton launch configs), ``ort-tensorrt`` (ONNX Runtime's TensorRT execution provider's engines) or
    ``tensorrt-timing`` (TensorRT's timing caches, one per GPU model and TensorRT version).

    ``$FASTGEN_CACHE_DIR`` (engines) or ``$FASTGEN_AUTOTUNE_DIR`` (autotune) when set, else
    ``$XDG_CACHE_HOME/fastgen/<kind>``, else ``~/.cache/fastgen/<kind>``. Nothing is created here.
    """
    if kind not in CACHE_ENV:
        from fastgen.errors import InvalidArgumentError

        raise InvalidArgumentError("cache kind", kind, tuple(CACHE_ENV))
    env = CACHE_ENV[kind]
    override = os.environ.get(env) if env else None
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "fastgen" / kind


__all__ = ["CACHE_ENV", "cache_dir"]
