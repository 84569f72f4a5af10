"""Filesystem helpers: nothing half-written, ever (temp name in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastgen.errors import InvalidArgumentError

#: Files that mark a directory as fastgen's own output, which may be replaced by a new one.
OWN_MARKERS = ("manifest.json", "spec.json", "export.json")


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; manifests are meant to be shared like the artifacts
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_out_dir(out: Path, argument: str = "out") -> None:
    """Refuse to overwrite anything that is not fastgen's own output (or an empty folder)."""
    if out.exists():
        if not out.is_dir():
            raise InvalidArgumentError(argument, str(out), reason="exists and is not a directory")
        if any(out.iterdir()) and not any((out / m).exists() for m in OWN_MARKERS):
            raise InvalidArgumentError(argument, str(out),
                                       reason="exists, is not empty and is not a fastgen output directory")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, argument: str = "out") -> Iterator[Path]:
    """Yield a staging folder beside ``out``; on success it replaces ``out`` in one rename.

    On an exception the staging folder is removed and ``out`` is left as it was.
    """
    out = Path(out).absolute()
    check_out_dir(out, argument)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes 0700, which would survive the rename
    try:
        yield staging
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an older ``dst``."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, trash / dst.name)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(trash / dst.name, dst)  # put the previous one back
            shutil.rmtree(trash, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)
