"""Content-addressed engine cache and engine-directory manifests.

Layout: ``<root>/<key[:2]>/<key>/`` with ``manifest.json`` and the artifacts it lists (sha256 and
size of each). Entries appear atomically: they are built in ``<root>/.staging/`` and renamed into
place, so a reader sees a whole entry or none. An entry whose files do not match its manifest is
moved aside and deleted, and rebuilt by the caller; it is never loaded.

An engine directory holds exactly the files its manifest lists: an unlisted file, a symbolic link or
a special file anywhere in it (``tokenizer/`` included) is corruption, since loaders open files by
name whatever the manifest says. Maintenance touches only what is provably the cache's own: a root
carries the marker file ``.fastgen-cache`` once fastgen stores an engine there, and only folders
named as fastgen names them (``<key[:2]>/<key>``, ``.staging/<key>-<pid>-<random>``) are removed;
links are never followed out of the root. Reading (``entries``, ``verify_entries()``) deletes nothing.

Only the standard library is used here (no torch, onnx or backends), and manifests are JSON: no
entry is ever unpickled.

LoRA adapters (:mod:`fastgen.lora`) are never part of a key: an entry is the base model's graph and
weights, and adapters are applied to the loaded engine (fused in place, fed, or refitted), so
swapping them never rebuilds or re-keys an engine.

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
import stat
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from fastgen.core import fs
from fastgen.core.paths import cache_dir
from fastgen.errors import CacheCorruptionError, FastgenError, InvalidArgumentError
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
#: The file that marks a directory as a fastgen engine cache (written when fastgen first stores an engine).
MARKER = ".fastgen-cache"
#: A manifest is a few kB to a few MB (labels, spec, key material); anything far bigger is not one.
MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 4 << 20
_KEY = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(r"^[0-9a-f]{2}$")
#: Names fastgen gives staging folders (tempfile.mkdtemp(prefix=f"{key}-{pid}-")) and deleted entries.
_STAGING_NAME = re.compile(r"^([0-9a-f]{64})-(\d+)-[a-z0-9_]+$")
_TRASH_NAME = re.compile(r"^[0-9a-f]{64}\.trash-[0-9a-f]{8}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class OutdatedEngineError(CacheCorruptionError):
    """An engine directory written in an older manifest format (readable, but not kept in the cache)."""


class CacheRemovalError(FastgenError):
    """Cache entries that could not be removed (a read-only cache, another owner): says how many were."""


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


def _scan(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` with its size; a link or special file anywhere is corruption."""
    try:
        return fs.regular_files(directory)
    except OSError as exc:
        raise CacheCorruptionError(f"{exc} (an engine directory holds regular files only)") from exc


def write_manifest(directory: str | os.PathLike, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` listing every other file of ``directory`` with its sha256 and size."""
    directory = Path(directory)
    artifacts = {name: {"sha256": hash_file(directory / name), "bytes": size}
                 for name, size in sorted(_scan(directory).items()) if name != MANIFEST}
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
    if not os.path.lexists(path):
        raise CacheCorruptionError(f"{fs.printable(path)}: manifest missing")
    try:  # never through a link, never a FIFO (blocks) or device, never gigabytes
        text = fs.read_regular(path, MAX_MANIFEST_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise CacheCorruptionError(f"manifest unreadable: {exc}") from exc
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested thousands deep
        reason = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise CacheCorruptionError(f"{fs.printable(path)}: manifest is not valid JSON ({reason})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheCorruptionError(f"{fs.printable(path)}: not a fastgen engine manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version in UPGRADABLE_VERSIONS:
        if not upgrade:
            raise OutdatedEngineError(f"{fs.printable(path)}: engine format_version {version} is outdated (current: "
                                      f"{FORMAT_VERSION}); {REBUILD_HINT}")
    elif version != FORMAT_VERSION:
        raise CacheCorruptionError(f"{fs.printable(path)}: engine format_version {version!r} is not one this fastgen reads "
                                   f"({', '.join(map(str, (*UPGRADABLE_VERSIONS, FORMAT_VERSION)))}); "
                                   f"{REBUILD_HINT}")
    if not isinstance(manifest.get("artifacts"), dict):
        raise CacheCorruptionError(f"{fs.printable(path)}: manifest has no artifacts table")
    if version == 1:
        try:
            manifest = _upgrade_v1(manifest)
        except InvalidArgumentError as exc:
            raise CacheCorruptionError(f"{fs.printable(path)}: format-1 extras do not convert ({exc}); {REBUILD_HINT}") from exc
        logger.debug("%s: format-1 manifest read as format %d", path, FORMAT_VERSION)
    return manifest


def _check_artifact(directory: Path, name: Any, entry: Any) -> None:
    """A listed name must be a plain relative POSIX path inside the directory, with a size and a sha256."""
    bad = (not isinstance(name, str) or not name or name == MANIFEST or "\x00" in name or "\\" in name
           or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")))
    if not bad:
        bad = (not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0
               or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]))
    if bad:
        raise CacheCorruptionError(f"{fs.printable(directory / MANIFEST)}: bad artifact entry {name!r}")


def verify_dir(directory: str | os.PathLike, *, check: Literal["full", "size"] = "full",
               upgrade: bool = True) -> dict[str, Any]:
    """Check that ``directory`` holds exactly the artifacts its manifest lists (no other file, no link, no
    special file, in any subfolder), each with its size (and, with ``full``, its sha256); return the
    manifest (``upgrade``: see :func:`read_manifest`)."""
    if check not in ("full", "size"):
        raise InvalidArgumentError("verify", check, ("full", "size"))
    directory = Path(directory)
    manifest = read_manifest(directory, upgrade=upgrade)
    artifacts = manifest["artifacts"]
    for name, entry in artifacts.items():
        _check_artifact(directory, name, entry)
    files = _scan(directory)
    # Loaders open files by name (model.onnx, weights.safetensors, model.plan, tokenizer/...) whatever
    # the manifest says: a file it does not list would be loaded unchecked.
    for name in sorted(files):
        if name != MANIFEST and name not in artifacts:
            raise CacheCorruptionError(f"{fs.printable(directory / name)}: not listed in the manifest (an engine directory "
                                       "holds only the files its manifest lists)")
    for name, entry in artifacts.items():
        path = directory / name
        if name not in files:
            raise CacheCorruptionError(f"{fs.printable(path)}: artifact missing")
        if files[name] != entry["bytes"]:
            raise CacheCorruptionError(f"{fs.printable(path)}: {files[name]} bytes, manifest says {entry['bytes']} "
                                       "(truncated or replaced)")
        if check == "full":
            try:
                with fs.open_regular(path) as f:  # not through a link swapped in since the scan
                    digest = hashlib.sha256()
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
            except OSError as exc:
                raise CacheCorruptionError(f"{fs.printable(path)}: unreadable ({exc})") from exc
            if digest.hexdigest() != entry["sha256"]:
                raise CacheCorruptionError(f"{fs.printable(path)}: sha256 {digest.hexdigest()[:12]}... does not match "
                                           f"the manifest's {entry['sha256'][:12]}... (corrupted)")
    return manifest


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


class EngineCache:
    """Engines keyed by a sha256 hex key (computed by the builder from everything that shapes the engine).

    Constructing one creates and deletes nothing; :meth:`get_or_build` creates the root (with its
    :data:`MARKER`) and cleans what crashed builds left; :meth:`remove` and :meth:`clear` act only on a
    marked root.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, verify: Literal["full", "size"] = "full") -> None:
        if verify not in ("full", "size"):
            raise InvalidArgumentError("verify", verify, ("full", "size"))
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise InvalidArgumentError("cache dir", f"<{type(root).__name__}>", reason="must be a directory path")
        self.root = Path(root).expanduser() if root is not None else default_root()
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise InvalidArgumentError("cache dir", str(self.root), reason="exists and is not a directory")
        self.verify = verify

    @property
    def staging(self) -> Path:
        return self.root / STAGING

    @property
    def owned(self) -> bool:
        """Whether the root carries fastgen's :data:`MARKER`: only then is anything in it deleted."""
        try:
            return stat.S_ISREG(os.lstat(self.root / MARKER).st_mode)
        except OSError:
            return False

    def _require_owned(self) -> None:
        if not self.owned:
            raise InvalidArgumentError(
                "cache dir", str(self.root),
                reason=f"has no {MARKER} marker file, so it is not provably a fastgen engine cache; nothing was "
                       f"removed (fastgen writes the marker when it stores an engine; create it to adopt an "
                       f"older fastgen's cache)")

    def _unusable(self, exc: OSError) -> InvalidArgumentError:
        return InvalidArgumentError("cache dir", str(self.root), reason=f"cannot hold the engine cache ({exc.strerror or exc})")

    def _claim(self) -> None:
        """Make the root a cache fastgen writes in: the folder, its marker and its staging folder."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(self.root / MARKER):
                _write_json_atomic(self.root / MARKER, {"format": "fastgen-engine-cache", "version": 1})
            self.staging.mkdir(exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from exc
        if not self.owned or not fs.is_real_dir(self.staging):
            raise InvalidArgumentError("cache dir", str(self.root),
                                       reason=f"its {MARKER} or {STAGING} is a link or of the wrong type")

    def clean_staging(self, *, max_age: float = STALE_SECONDS) -> list[Path]:
        """Remove what crashed builds left in the staging folder of a marked cache: trash of removed entries,
        and staging folders whose builder process is gone and that are older than ``max_age`` seconds.
        Only folders with fastgen's names, never through a link. Returns what was removed."""
        if not self.owned or not fs.is_real_dir(self.staging):
            return []
        removed = []
        now = time.time()
        try:
            children = list(os.scandir(self.staging))
        except OSError:
            return []
        for child in children:
            if not child.is_dir(follow_symlinks=False):
                continue
            path = Path(child.path)
            match = _STAGING_NAME.match(child.name)
            try:
                if match is not None:
                    pid = int(match.group(2))
                    # A live builder's folder is kept however old.
                    if (pid > 0 and _pid_alive(pid)) or now - fs.newest_mtime(path) <= max_age:
                        continue
                elif not _TRASH_NAME.match(child.name):
                    continue  # not a name fastgen gives: not ours to delete
            except OSError:
                continue
            logger.info("removing stale engine staging dir %s", path)
            if fs.remove_tree(path) is None:
                removed.append(path)
        return removed

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.match(key):
            raise InvalidArgumentError("cache key", key, reason="must be 64 lowercase hex characters (sha256)")
        return self.root / key[:2] / key

    def _check_entry(self, path: Path) -> dict[str, Any]:
        """The entry's verified manifest; CacheCorruptionError (or OutdatedEngineError) if it is not one."""
        if not fs.is_real_dir(path.parent) or not fs.is_real_dir(path):
            raise CacheCorruptionError(f"{fs.printable(path)}: not a directory of its own (a symbolic link?)")
        manifest = verify_dir(path, check=self.verify, upgrade=False)
        if manifest.get("cache_key") != path.name:  # an intact entry copied under another key is still wrong
            raise CacheCorruptionError(f"{fs.printable(path)}: its manifest is the entry of cache key "
                                       f"{fs.printable(str(manifest.get('cache_key')))[:16]}..., not of this one")
        return manifest

    def _discard(self, path: Path) -> str | None:
        """Remove a bad entry if the root is provably a cache: None when removed, else why it stays."""
        if not self.owned:
            reason = f"the cache root has no {MARKER} marker"
        else:
            error = fs.remove_dir(path, self.staging)
            if error is None:
                return None
            reason = error.strerror or str(error)
        logger.warning("engine cache entry %s could not be removed (%s); it is not used", path, reason)
        return reason

    def lookup(self, key: str) -> Path | None:
        """The entry's directory if present and intact; a damaged entry is removed (in a marked cache)
        and None returned. A symbolic link in the cache is never followed."""
        path = self.path_for(key)
        if os.path.lexists(path.parent) and not fs.is_real_dir(path.parent):
            logger.warning("engine cache: %s is not a folder of its own (a symbolic link?); not used", path.parent)
            return None
        if not os.path.lexists(path):
            return None
        try:
            self._check_entry(path)
        except CacheCorruptionError as exc:
            if isinstance(exc, OutdatedEngineError):
                logger.info("engine cache entry %s was built by an older fastgen and will be rebuilt: %s", key[:12], exc)
            else:
                logger.warning("engine cache entry %s is damaged and will be rebuilt: %s", key[:12], exc)
            self._discard(path)
            return None
        return path

    def get_or_build(self, key: str, build: Callable[[Path], Mapping[str, Any]]) -> tuple[Path, bool]:
        """``(path, True)`` on a hit; else build into a staging dir, publish it, and return ``(path, False)``.

        ``build(staging_dir)`` writes the artifacts and returns the manifest fields. Concurrent
        builders of one key are safe: the first rename wins and the others use its entry.
        """
        hit = self.lookup(key)  # before claiming: a read-only cache still serves its hits
        if hit is not None:
            return hit, True
        final = self.path_for(key)
        self._claim()
        self.clean_staging()
        if os.path.lexists(final.parent) and not fs.is_real_dir(final.parent):
            raise CacheCorruptionError(f"{fs.printable(final.parent)}: is not a folder of its own (a symbolic link?); the "
                                       "engine cache never writes through links")
        if os.path.lexists(final) and (hit := self.lookup(key)) is not None:  # the root is marked now
            return hit, True
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{key}-{os.getpid()}-", dir=self.staging))
        except OSError as exc:
            raise self._unusable(exc) from exc
        try:
            fields = build(staging)
            if not isinstance(fields, Mapping):
                raise TypeError(f"the build function must return the manifest fields (a dict), not {type(fields).__name__}")
            write_manifest(staging, {**fields, "cache_key": key})
            fs.share_tree(staging)  # mkdtemp made it 0700: other users of a shared cache could not read it
            final.parent.mkdir(exist_ok=True)
            for _ in range(3):
                try:
                    os.rename(staging, final)
                    logger.info("engine cache: stored %s", final)
                    return final, False
                except OSError:
                    if not os.path.lexists(final):
                        raise
                # Another builder published this key first: use theirs if it is intact.
                theirs = self.lookup(key)
                if theirs is not None:
                    logger.info("engine cache: %s was built concurrently by another process; using it", key[:12])
                    shutil.rmtree(staging, ignore_errors=True)
                    return theirs, False
            raise CacheCorruptionError(f"{fs.printable(final)}: could not publish the engine (the path keeps reappearing "
                                       "damaged)")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _entry_dirs(self) -> list[Path]:
        """Real folders ``<key>`` in real folders ``<key[:2]>``: links are skipped, never followed."""
        out = []
        try:
            prefixes = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return []
        for prefix in prefixes:
            if not _PREFIX.match(prefix.name):
                continue
            if prefix.is_symlink():
                logger.warning("engine cache: %s is a symbolic link; skipped (never followed)", prefix.path)
                continue
            if not prefix.is_dir(follow_symlinks=False):
                continue
            try:
                children = sorted(os.scandir(prefix.path), key=lambda e: e.name)
            except OSError:
                continue
            out.extend(Path(c.path) for c in children
                       if _KEY.match(c.name) and c.name[:2] == prefix.name and c.is_dir(follow_symlinks=False))
        return out

    def entries(self) -> list[dict[str, Any]]:
        """One summary per entry (not verified: ``fastgen cache ls`` must be quick). Deletes nothing."""
        out = []
        for path in self._entry_dirs():
            row: dict[str, Any] = {"key": path.name, "path": str(path), "bytes": fs.tree_bytes(path), "error": None}
            try:
                manifest = read_manifest(path)
            except CacheCorruptionError as exc:
                row["error"] = str(exc)
                manifest = {}
            spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
            row.update({k: manifest.get(k) for k in ("backend", "precision", "device", "origin", "built_at")})
            row.update({k: spec.get(k) for k in ("component", "model_type")})
            out.append(row)
        return out

    def verify_entries(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """Check every entry (``self.verify``): one row each, ``status`` ``ok``, ``damaged`` or ``outdated``
        with the ``error``. With ``repair``, bad entries are removed and the row says whether it was
        (``removed``) or why not (``remove_error``); without it nothing is deleted."""
        rows = []
        for path in self._entry_dirs():
            row: dict[str, Any] = {"key": path.name, "path": str(path), "status": "ok", "error": None,
                                   "removed": False, "remove_error": None}
            try:
                self._check_entry(path)
            except OutdatedEngineError as exc:
                row.update(status="outdated", error=str(exc))
            except CacheCorruptionError as exc:
                row.update(status="damaged", error=str(exc))
            if row["status"] != "ok" and repair:
                reason = self._discard(path)
                row.update(removed=reason is None, remove_error=reason)
            rows.append(row)
        return rows

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
        """Delete one entry; False if there was none. CacheRemovalError if it could not be removed."""
        path = self.path_for(key)
        if not fs.is_real_dir(path.parent) or not os.path.lexists(path):
            return False
        self._require_owned()
        error = fs.remove_dir(path, self.staging)
        if error is not None:
            raise CacheRemovalError(f"{fs.printable(path)}: could not be removed ({error.strerror or error})")
        return True

    def clear(self) -> int:
        """Delete every entry and what crashed builds left; returns how many entries were removed.

        Only in a marked root, and only fastgen's own folders (never through a link); live builders'
        staging folders are kept. CacheRemovalError says how many were removed if some could not be.
        """
        if not os.path.lexists(self.root):
            return 0
        self._require_owned()
        entries = self._entry_dirs()
        failures = [(path, error) for path in entries if (error := fs.remove_dir(path, self.staging)) is not None]
        for prefix in {path.parent for path in entries}:
            try:
                os.rmdir(prefix)  # only if empty
            except OSError:
                pass
        self.clean_staging(max_age=float("-inf"))
        try:
            os.rmdir(self.staging)  # only if empty (and never through a link: rmdir does not follow one)
        except OSError:
            pass
        removed = len(entries) - len(failures)
        if failures:
            path, error = failures[0]
            raise CacheRemovalError(f"removed {removed} of {len(entries)} entries from {fs.printable(self.root)}; "
                                    f"{len(failures)} could not be removed (first: {fs.printable(path)}: "
                                    f"{error.strerror or error})")
        return removed

    def check_outside(self, out: str | os.PathLike) -> None:
        """Refuse an ``out`` folder inside this cache's root, or containing it: publishing there would
        plant or replace cache entries behind the cache's back."""
        out_real = Path(os.path.realpath(Path(out).expanduser()))
        root_real = Path(os.path.realpath(self.root))
        if out_real == root_real or root_real in out_real.parents or out_real in root_real.parents:
            raise InvalidArgumentError("out", str(out), reason=f"is inside the engine cache {fs.printable(self.root)} or "
                                       "contains it; choose a folder outside the cache")


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
    with fs.atomic_dir(dst, "out") as tmp:
        # Links copied as links, never followed (verify_dir refuses them); modes fixed by atomic_dir.
        shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=True)
    return dst
