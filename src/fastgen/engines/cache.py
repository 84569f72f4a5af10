"""Content-addressed engine cache and engine-directory manifests.

Layout: ``<root>/<key[:2]>/<key>/`` with ``manifest.json`` and the artifacts it lists (sha256 and
size of each). Entries appear atomically: they are built in ``<root>/.staging/`` and renamed into
place, so a reader sees a whole entry or none. An entry whose files do not match its manifest is
moved aside and deleted, and rebuilt by the caller; it is never loaded.

Only the standard library is used here (no torch, onnx or backends), and manifests are JSON: no
entry is ever unpickled.

Format versions: 2 stores the component's typed metadata as ``metadata`` (``{"version", "kind",
"fields"}``, see ``fastgen.models.metadata``); 1 stored the same fields as an untyped ``extras``
dict. A version-1 engine directory is read by converting ``extras`` (an exact mapping), but a
version-1 cache entry is a miss: it is removed and rebuilt, so the cache only holds the current format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from fastgen.core.fs import atomic_dir
from fastgen.core.paths import cache_dir
from fastgen.errors import CacheCorruptionError, InvalidArgumentError
from fastgen.models.metadata import metadata_from_dict

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "fastgen-engine"
FORMAT_VERSION = 2
#: Older format versions this fastgen converts on reading (engine directories; cache entries are rebuilt).
UPGRADABLE_VERSIONS = (1,)
REBUILD_HINT = "rebuild it with `fastgen build ... --out DIR` (cached engines: `fastgen cache clear`)"
STAGING = ".staging"
STALE_SECONDS = 3600.0
_CHUNK = 4 << 20
_KEY = re.compile(r"^[0-9a-f]{64}$")


class OutdatedEngineError(CacheCorruptionError):
    """An engine directory written in an older manifest format (readable, but not kept in the cache)."""


def default_root() -> Path:
    """``$FASTGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastgen/engines``, else ``~/.cache/fastgen/engines``
    (:func:`fastgen.core.paths.cache_dir`)."""
    return cache_dir("engines")


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 4 MiB chunks (engines are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _artifact_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def write_manifest(directory: str | os.PathLike, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` listing every other file of ``directory`` with its sha256 and size."""
    directory = Path(directory)
    artifacts = {p.relative_to(directory).as_posix(): {"sha256": hash_file(p), "bytes": p.stat().st_size}
                 for p in _artifact_files(directory)}
    manifest = {**fields, "format": FORMAT, "format_version": FORMAT_VERSION, "artifacts": artifacts}
    _write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def _upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format 2's form: its ``extras`` dict becomes the typed ``metadata`` entry."""
    spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
    upgraded = {k: v for k, v in manifest.items() if k != "extras"}
    upgraded["metadata"] = metadata_from_dict(str(spec.get("component", "")), manifest.get("extras")).to_manifest()
    upgraded["format_version"] = FORMAT_VERSION
    return upgraded


def read_manifest(directory: str | os.PathLike, *, upgrade: bool = True) -> dict[str, Any]:
    """The parsed manifest of an engine directory; CacheCorruptionError if missing, not JSON or not ours.

    An older format this fastgen can convert (:data:`UPGRADABLE_VERSIONS`) is returned converted to
    the current one, or, with ``upgrade=False``, raises :class:`OutdatedEngineError`.
    """
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CacheCorruptionError(f"{path}: manifest missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheCorruptionError(f"{path}: manifest unreadable ({exc})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheCorruptionError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptionError(f"{path}: not a fastgen engine manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version in UPGRADABLE_VERSIONS:
        if not upgrade:
            raise OutdatedEngineError(f"{path}: engine format_version {version} is outdated (current: "
                                      f"{FORMAT_VERSION}); {REBUILD_HINT}")
    elif version != FORMAT_VERSION:
        raise CacheCorruptionError(f"{path}: engine format_version {version!r} is not one this fastgen reads "
                                   f"({', '.join(map(str, (*UPGRADABLE_VERSIONS, FORMAT_VERSION)))}); "
                                   f"{REBUILD_HINT}")
    if not isinstance(manifest.get("artifacts"), dict):
        raise CacheCorruptionError(f"{path}: manifest has no artifacts table")
    if version == 1:
        try:
            manifest = _upgrade_v1(manifest)
        except InvalidArgumentError as exc:
            raise CacheCorruptionError(f"{path}: format-1 extras do not convert ({exc}); {REBUILD_HINT}") from exc
        logger.debug("%s: format-1 manifest read as format %d", path, FORMAT_VERSION)
    return manifest


def verify_dir(directory: str | os.PathLike, *, check: Literal["full", "size"] = "full",
               upgrade: bool = True) -> dict[str, Any]:
    """Check every listed artifact exists with its size (and, with ``full``, its sha256); return the manifest
    (``upgrade``: see :func:`read_manifest`)."""
    if check not in ("full", "size"):
        raise InvalidArgumentError("verify", check, ("full", "size"))
    directory = Path(directory)
    manifest = read_manifest(directory, upgrade=upgrade)
    for name, entry in manifest["artifacts"].items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not isinstance(entry, dict):
            raise CacheCorruptionError(f"{directory / MANIFEST}: bad artifact entry {name!r}")
        path = directory / rel
        if not path.is_file():
            raise CacheCorruptionError(f"{path}: artifact missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CacheCorruptionError(f"{path}: {size} bytes, manifest says {entry.get('bytes')} (truncated or replaced)")
        if check == "full":
            digest = hash_file(path)
            if digest != entry.get("sha256"):
                raise CacheCorruptionError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                           f"{str(entry.get('sha256'))[:12]}... (corrupted)")
    return manifest


def _remove_tree(path: Path, trash_dir: Path) -> None:
    """Delete a directory so no reader ever sees it half-deleted: rename it aside, then delete."""
    try:
        trash_dir.mkdir(parents=True, exist_ok=True)
        aside = trash_dir / f"{path.name}.trash-{secrets.token_hex(4)}"
        os.rename(path, aside)
    except FileNotFoundError:  # someone else removed it first
        return
    except OSError:
        aside = path  # cannot rename (another filesystem?): delete in place
    shutil.rmtree(aside, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    return newest


class EngineCache:
    """Engines keyed by a sha256 hex key (computed by the builder from everything that shapes the engine)."""

    def __init__(self, root: str | os.PathLike | None = None, *, verify: Literal["full", "size"] = "full") -> None:
        if verify not in ("full", "size"):
            raise InvalidArgumentError("verify", verify, ("full", "size"))
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.verify = verify
        self._clean_staging()

    @property
    def staging(self) -> Path:
        return self.root / STAGING

    def _clean_staging(self) -> None:
        """Remove staging and trash dirs left behind by crashed builds (older than an hour, builder gone)."""
        if not self.staging.is_dir():
            return
        now = time.time()
        for child in self.staging.iterdir():
            try:
                if ".trash-" in child.name:
                    shutil.rmtree(child, ignore_errors=True)
                    continue
                # Staging dirs are named <key>-<pid>-<random>: a live builder's dir is kept however old.
                parts = child.name.split("-")
                pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
                if now - _newest_mtime(child) > STALE_SECONDS and not (pid and _pid_alive(pid)):
                    logger.info("removing stale engine staging dir %s", child)
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                continue

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.match(key):
            raise InvalidArgumentError("cache key", key, reason="must be 64 lowercase hex characters (sha256)")
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        """The entry's directory if present and intact; a damaged entry is removed and None returned."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            verify_dir(path, check=self.verify, upgrade=False)
        except OutdatedEngineError as exc:
            logger.info("engine cache entry %s was built by an older fastgen and will be rebuilt: %s", key[:12], exc)
            _remove_tree(path, self.staging)
            return None
        except CacheCorruptionError as exc:
            logger.warning("engine cache entry %s is damaged and will be rebuilt: %s", key[:12], exc)
            _remove_tree(path, self.staging)
            return None
        return path

    def get_or_build(self, key: str, build: Callable[[Path], Mapping[str, Any]]) -> tuple[Path, bool]:
        """``(path, True)`` on a hit; else build into a staging dir, publish it, and return ``(path, False)``.

        ``build(staging_dir)`` writes the artifacts and returns the manifest fields. Concurrent
        builders of one key are safe: the first rename wins and the others use its entry.
        """
        hit = self.lookup(key)
        if hit is not None:
            return hit, True
        final = self.path_for(key)
        self.staging.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}-{os.getpid()}-", dir=self.staging))
        try:
            fields = build(staging)
            if not isinstance(fields, Mapping):
                raise TypeError(f"the build function must return the manifest fields (a dict), not {type(fields).__name__}")
            write_manifest(staging, {**fields, "cache_key": key})
            final.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    os.rename(staging, final)
                    logger.info("engine cache: stored %s", final)
                    return final, False
                except OSError:
                    if not final.exists():
                        raise
                # Another builder published this key first: use theirs if it is intact.
                theirs = self.lookup(key)
                if theirs is not None:
                    logger.info("engine cache: %s was built concurrently by another process; using it", key[:12])
                    shutil.rmtree(staging, ignore_errors=True)
                    return theirs, False
            raise CacheCorruptionError(f"{final}: could not publish the engine (the path keeps reappearing damaged)")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _entry_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        out = []
        for prefix in sorted(self.root.iterdir()):
            if prefix.is_dir() and re.fullmatch(r"[0-9a-f]{2}", prefix.name):
                out.extend(p for p in sorted(prefix.iterdir())
                           if p.is_dir() and _KEY.match(p.name) and p.name[:2] == prefix.name)
        return out

    def entries(self) -> list[dict[str, Any]]:
        """One summary per entry (not verified: ``fastgen cache ls`` must be quick)."""
        out = []
        for path in self._entry_dirs():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            row: dict[str, Any] = {"key": path.name, "path": str(path), "bytes": size, "error": None}
            try:
                manifest = read_manifest(path)
            except CacheCorruptionError as exc:
                row["error"] = str(exc)
                manifest = {}
            spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
            row.update({
                "backend": manifest.get("backend"),
                "precision": manifest.get("precision"),
                "device": manifest.get("device"),
                "component": spec.get("component"),
                "model_type": spec.get("model_type"),
                "origin": manifest.get("origin"),
                "built_at": manifest.get("built_at"),
            })
            out.append(row)
        return out

    def find(self, match: Callable[[dict[str, Any]], bool]) -> list[Path]:
        """Entries whose manifest satisfies ``match`` (read, not verified: ``lookup`` an entry before use)."""
        out = []
        for path in self._entry_dirs():
            try:
                manifest = read_manifest(path)
            except CacheCorruptionError:
                continue
            if match(manifest):
                out.append(path)
        return out

    def remove(self, key: str) -> bool:
        """Delete one entry; False if there was none."""
        path = self.path_for(key)
        if not path.exists():
            return False
        _remove_tree(path, self.staging)
        return True

    def clear(self) -> int:
        """Delete every entry (and staging leftovers); only fastgen's own directories are touched."""
        entries = self._entry_dirs()
        for path in entries:
            _remove_tree(path, self.staging)
        for prefix in self.root.iterdir() if self.root.is_dir() else ():
            if prefix.is_dir() and re.fullmatch(r"[0-9a-f]{2}", prefix.name):
                try:
                    prefix.rmdir()  # only if empty
                except OSError:
                    pass
        if self.staging.is_dir():
            shutil.rmtree(self.staging, ignore_errors=True)
        return len(entries)


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy an engine directory to ``dst`` atomically; an existing engine directory there is replaced."""
    src, dst = Path(src), Path(dst).expanduser()
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise InvalidArgumentError("out", str(dst), reason="exists and is not a directory")
        try:
            read_manifest(dst)
        except CacheCorruptionError:
            if any(dst.iterdir()):
                raise InvalidArgumentError("out", str(dst),
                                           reason="exists and is not a fastgen engine directory; "
                                           "choose a new path or an empty directory") from None
    with atomic_dir(dst, "out") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dst
