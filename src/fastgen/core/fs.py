"""Filesystem helpers: nothing half-written, ever (temp name in the same folder, then rename); shareable
modes; and reading folders someone else may have crafted without following their links."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastgen.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: Files that mark a directory as fastgen's own output, which may be replaced by a new one.
OWN_MARKERS = ("manifest.json", "spec.json", "export.json")


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; shared like the artifacts
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux's /proc tells it (``os.umask`` can only
    read it by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_tree(root: str | os.PathLike) -> None:
    """Give a finished folder the modes a plain ``mkdir`` / ``open`` would have: folders 0777 and files
    0666 (0777 if executable) less the umask, so 0755 / 0644 by default.

    Staging folders come from ``tempfile`` (0700) and some writers leave files 0600 (safetensors,
    mkstemp); renamed into place as they are, they would lock the other users of a shared cache or
    output folder out. Links are neither followed nor changed.
    """
    mask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):  # os.walk does not descend into links
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, (0o777 if mode & 0o100 else 0o666) & ~mask)


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
    try:
        yield staging
        share_tree(staging)
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


# --- folders that may have been crafted: links are never followed ---------------------------------

def printable(path: str | os.PathLike) -> str:
    """A path for a one-line message: as it is, or quoted with escapes if it holds a newline or the like."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def is_real_dir(path: str | os.PathLike) -> bool:
    """A directory that is not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike) -> Any:
    """``path`` opened for binary reading if it is a regular file: never through a final link, never a
    FIFO or a device (reading one would block or never end). OSError otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{printable(path)}: is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (:func:`open_regular`); OSError if it is a
    link or special file, ValueError if it is larger (a hostile file must not fill the memory)."""
    if stat.S_ISLNK(os.lstat(path).st_mode):
        raise OSError(f"{printable(path)}: is a symbolic link")
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{printable(path)}: larger than {limit} bytes")
    return data


def regular_files(directory: str | os.PathLike) -> dict[str, int]:
    """Every file under ``directory``, by relative POSIX name, with its size. OSError naming the first
    symbolic link (to a file or a folder) or special file: a reader would follow or block on it."""
    directory = Path(directory)
    found: dict[str, int] = {}
    stack = [("", directory)]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise OSError(f"{printable(folder)}: cannot be listed ({exc.strerror or exc})") from exc
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                raise OSError(f"{printable(directory / rel)}: is a symbolic link")
            if entry.is_dir(follow_symlinks=False):
                stack.append((rel + "/", Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                found[rel] = entry.stat(follow_symlinks=False).st_size
            else:
                raise OSError(f"{printable(directory / rel)}: is not a regular file")
    return found


def remove_tree(path: str | os.PathLike) -> OSError | None:
    """Delete a tree without following the links in it: None when it is gone, else the first failure
    (callers report what happened instead of claiming a removal)."""
    errors: list[BaseException] = []
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda fn, p, exc: errors.append(exc))
    else:
        shutil.rmtree(path, onerror=lambda fn, p, info: errors.append(info[1]))
    if errors and os.path.lexists(path):
        return errors[0] if isinstance(errors[0], OSError) else OSError(str(errors[0]))
    return None


def remove_dir(path: str | os.PathLike, trash_dir: str | os.PathLike) -> OSError | None:
    """Delete a folder so no reader ever sees it half-deleted: rename it into ``trash_dir`` (a real
    folder on the same filesystem), then delete it there. A link is unlinked, never followed.

    None when it is gone (or was already), else the error that kept it in place.
    """
    path, trash_dir = Path(path), Path(trash_dir)
    aside = path
    try:
        if not os.path.lexists(path):
            return None  # someone else removed it first
        trash_dir.mkdir(parents=True, exist_ok=True)
        if is_real_dir(trash_dir):  # never into a link out of the folder
            aside = trash_dir / f"{path.name}.trash-{secrets.token_hex(4)}"
            os.rename(path, aside)
    except OSError:
        aside = path  # cannot rename (read-only, another filesystem, gone?): delete in place
    if not os.path.lexists(aside):
        return None
    if stat.S_ISLNK(os.lstat(aside).st_mode):
        try:
            os.unlink(aside)
        except OSError as exc:
            return exc
        return None
    error = remove_tree(aside)
    if error is not None and aside != path:  # out of sight already; what is left is trash to clean later
        logger.warning("%s: moved aside but not deleted (%s)", aside, error)
        return None
    return error


def newest_mtime(path: str | os.PathLike) -> float:
    """The latest modification time in a tree (links not followed)."""
    newest = os.lstat(path).st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def tree_bytes(path: str | os.PathLike) -> int:
    """The size of the regular files in a tree (links not followed)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total
