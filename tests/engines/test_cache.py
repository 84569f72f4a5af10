"""Engine cache: hits, misses, damage detection, concurrent builders, atomic publishing."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import pickle
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastgen.engines.cache import (
    FORMAT_VERSION,
    MARKER,
    EngineCache,
    default_root,
    hash_file,
    publish_dir,
    read_manifest,
    verify_dir,
    write_manifest,
)
from fastgen.errors import CacheCorruptionError, InvalidArgumentError


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Builder:
    """A build function that records its calls and writes two artifacts (one in a subfolder)."""

    def __init__(self, payload: bytes = b"engine-bytes" * 1000) -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self, staging: Path) -> dict:
        self.calls += 1
        (staging / "model.bin").write_bytes(self.payload)
        (staging / "sub").mkdir()
        (staging / "sub" / "extra.txt").write_text("hello")
        return {"backend": "onnxruntime", "precision": "fp32", "device": "cpu",
                "spec": {"component": "mlp", "model_type": "TinyMLP"}}


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(tmp_path / "a"))
    assert default_root() == tmp_path / "a"
    monkeypatch.delenv("FASTGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "fastgen" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_root() == Path.home() / ".cache" / "fastgen" / "engines"


def test_hash_file_matches_hashlib(tmp_path):
    data = os.urandom(5 << 20) + b"tail"  # more than one chunk, odd length
    (tmp_path / "f").write_bytes(data)
    assert hash_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_manifest_lists_every_artifact(tmp_path):
    Builder()(tmp_path)
    manifest = write_manifest(tmp_path, {"backend": "torch"})
    assert manifest["format"] == "fastgen-engine" and manifest["format_version"] == FORMAT_VERSION == 2
    assert set(manifest["artifacts"]) == {"model.bin", "sub/extra.txt"}
    assert manifest["artifacts"]["sub/extra.txt"] == {"sha256": hashlib.sha256(b"hello").hexdigest(), "bytes": 5}
    assert read_manifest(tmp_path) == manifest == verify_dir(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_hit_and_miss(tmp_path):
    cache = EngineCache(tmp_path)
    build, key = Builder(), key_of("a")
    path, hit = cache.get_or_build(key, build)
    assert (hit, build.calls) == (False, 1)
    assert path == tmp_path / key[:2] / key
    assert read_manifest(path)["cache_key"] == key
    assert cache.lookup(key) == path
    path2, hit2 = cache.get_or_build(key, build)
    assert (path2, hit2, build.calls) == (path, True, 1)
    assert not any((tmp_path / ".staging").iterdir())


def test_changed_key_gives_new_entry(tmp_path):
    cache = EngineCache(tmp_path)
    p1, _ = cache.get_or_build(key_of("a"), Builder(b"one"))
    p2, hit = cache.get_or_build(key_of("b"), Builder(b"two"))
    assert not hit and p1 != p2
    assert {e["key"] for e in cache.entries()} == {key_of("a"), key_of("b")}
    assert (p1 / "model.bin").read_bytes() == b"one"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_artifact", "no_manifest", "bad_json", "wrong_format"])
def test_damaged_entry_is_reported_removed_and_rebuilt(tmp_path, caplog, damage):
    cache = EngineCache(tmp_path)
    key = key_of("x")
    path, _ = cache.get_or_build(key, Builder())
    artifact = path / "model.bin"
    if damage == "flip":
        flip_byte(artifact)
    elif damage == "truncate":
        artifact.write_bytes(artifact.read_bytes()[:-10])
    elif damage == "missing_artifact":
        (path / "sub" / "extra.txt").unlink()
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
    elif damage == "bad_json":
        (path / "manifest.json").write_text('{"format": "fastgen-engine", ')
    else:
        (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheCorruptionError):
        verify_dir(path)
    caplog.set_level(logging.WARNING, logger="fastgen.engines.cache")
    assert cache.lookup(key) is None  # never handed out
    assert "damaged" in caplog.text and key[:12] in caplog.text
    assert not path.exists()
    build = Builder()
    path2, hit = cache.get_or_build(key, build)
    assert (path2, hit, build.calls) == (path, False, 1)
    verify_dir(path2)
    assert not any((tmp_path / ".staging").iterdir())


def as_format_1(path: Path, extras: dict) -> None:
    """Rewrite an entry's manifest as fastgen's format 1 wrote it: an untyped ``extras`` dict, no ``metadata``."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("metadata", None)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "extras": extras}))


def test_format_1_entry_is_a_miss_and_is_rebuilt(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    key = key_of("v1")
    path, _ = cache.get_or_build(key, Builder())
    as_format_1(path, {"labels": ["a", "b"]})
    read_manifest(path)  # an engine directory of format 1 still reads (converted)...
    with pytest.raises(CacheCorruptionError, match=r"format_version 1 is outdated.*fastgen build .* --out DIR"):
        verify_dir(path, upgrade=False)
    caplog.set_level(logging.INFO, logger="fastgen.engines.cache")
    assert cache.lookup(key) is None  # ...but the cache only hands out its current format
    assert "older fastgen" in caplog.text and "damaged" not in caplog.text
    build = Builder()
    path2, hit = cache.get_or_build(key, build)
    assert (path2, hit, build.calls) == (path, False, 1)
    assert read_manifest(path2, upgrade=False)["format_version"] == FORMAT_VERSION


def test_format_1_manifest_converts_extras_to_metadata(tmp_path):
    Builder()(tmp_path)
    write_manifest(tmp_path, {"spec": {"component": "text-classifier"}})
    as_format_1(tmp_path, {"labels": ["ok", "spam"], "max_length": 64})
    manifest = verify_dir(tmp_path)
    assert manifest["format_version"] == FORMAT_VERSION and "extras" not in manifest
    assert manifest["metadata"] == {"version": 1, "kind": "text-classifier",
                                    "fields": {"labels": ["ok", "spam"], "max_length": 64}}


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_unknown_format_version_says_how_to_rebuild(tmp_path, version):
    Builder()(tmp_path)
    write_manifest(tmp_path, {})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(CacheCorruptionError, match=r"format_version .* not one this fastgen reads \(1, 2\); rebuild "
                                                   r"it with `fastgen build \.\.\. --out DIR` .*fastgen cache clear") as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_verify_messages_name_file_and_problem(tmp_path):
    Builder()(tmp_path)
    write_manifest(tmp_path, {})
    flip_byte(tmp_path / "model.bin")
    verify_dir(tmp_path, check="size")  # same size: only the hash sees it
    with pytest.raises(CacheCorruptionError, match=r"model\.bin.*sha256.*corrupted"):
        verify_dir(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"short")
    with pytest.raises(CacheCorruptionError, match=r"model\.bin: 5 bytes"):
        verify_dir(tmp_path, check="size")
    with pytest.raises(InvalidArgumentError):
        verify_dir(tmp_path, check="quick")


def test_manifest_cannot_point_outside_its_directory(tmp_path):
    (tmp_path / "e").mkdir()
    write_manifest(tmp_path / "e", {})
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    manifest["artifacts"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    (tmp_path / "e" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptionError, match="bad artifact entry"):
        verify_dir(tmp_path / "e")


def test_failed_build_leaves_nothing(tmp_path):
    cache = EngineCache(tmp_path)

    def boom(staging: Path) -> dict:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        cache.get_or_build(key_of("a"), boom)
    assert cache.lookup(key_of("a")) is None
    assert not any((tmp_path / ".staging").iterdir())
    assert cache.entries() == []


@pytest.mark.parametrize("key", ["abc", "A" * 64, "g" * 64, "../" + "a" * 61, 5])
def test_keys_are_validated(tmp_path, key):
    with pytest.raises(InvalidArgumentError, match="cache key"):
        EngineCache(tmp_path).path_for(key)


def test_entries_remove_clear(tmp_path):
    cache = EngineCache(tmp_path)
    (tmp_path / "user-file.txt").write_text("not ours")
    for name in "abc":
        cache.get_or_build(key_of(name), Builder())
    (cache.path_for(key_of("c")) / "manifest.json").write_text("{")
    rows = {r["key"]: r for r in cache.entries()}
    assert len(rows) == 3
    ok = rows[key_of("a")]
    assert ok["backend"] == "onnxruntime" and ok["component"] == "mlp" and ok["error"] is None
    assert ok["bytes"] == sum(p.stat().st_size for p in Path(ok["path"]).rglob("*") if p.is_file())
    assert "not valid JSON" in rows[key_of("c")]["error"]
    assert cache.remove(key_of("a")) and not cache.remove(key_of("a"))
    assert cache.clear() == 2
    assert cache.entries() == []
    assert (tmp_path / "user-file.txt").read_text() == "not ours"  # clear only touches its own dirs


def test_stale_staging_is_cleaned_only_in_a_cache_of_fastgens_own(tmp_path):
    staging = tmp_path / ".staging"
    old = staging / f"{key_of('a')}-999999999-abc"
    fresh = staging / f"{key_of('b')}-999999999-def"
    live = staging / f"{key_of('c')}-{os.getpid()}-ghi"
    for d in (old, fresh, live):
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    hour_ago = time.time() - 7200
    for d in (old, live):
        os.utime(d / "f", (hour_ago, hour_ago))
        os.utime(d, (hour_ago, hour_ago))
    cache = EngineCache(tmp_path)
    assert old.exists()  # constructing deletes nothing: the folder may not be fastgen's
    (tmp_path / MARKER).write_text("{}")
    cache.clean_staging()
    assert not old.exists()
    assert fresh.exists()  # recent: maybe a build in progress
    assert live.exists()  # its builder process is alive


def test_publish_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Builder()(src)
    write_manifest(src, {"backend": "torch"})
    dst = tmp_path / "out" / "engine"
    publish_dir(src, dst)
    verify_dir(dst)
    # Replacing an existing engine directory is allowed.
    (src / "model.bin").write_bytes(b"new")
    write_manifest(src, {"backend": "torch"})
    publish_dir(src, dst)
    assert (dst / "model.bin").read_bytes() == b"new"
    verify_dir(dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["engine"]  # no temp dirs left
    # Something that is not an engine directory is never overwritten.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(InvalidArgumentError, match="out.*not a fastgen engine directory"):
        publish_dir(src, other)
    assert (other / "cat.jpg").read_bytes() == b"meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        publish_dir(src, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_dir(src, empty)
    verify_dir(empty)


def test_no_pickle_is_loaded(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    cache.get_or_build(key_of("a"), Builder())

    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert EngineCache(tmp_path).lookup(key_of("a")) is not None
    assert len(cache.entries()) == 1


_WORKER = '''
import time
from pathlib import Path
from fastgen.engines.cache import EngineCache

def race(root, key, barrier, queue):
    def slow_build(staging):
        time.sleep(1.0)  # both builders are inside build() at once
        (staging / "model.bin").write_bytes(str(time.time_ns()).encode() * 100)
        return {"backend": "onnxruntime"}
    cache = EngineCache(root)
    barrier.wait()
    path, hit = cache.get_or_build(key, slow_build)
    queue.put((str(path), hit, (path / "model.bin").read_bytes()))
'''


def test_two_builders_of_one_key(tmp_path, monkeypatch):
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "fastgen_cache_race_worker.py").write_text(textwrap.dedent(_WORKER))
    monkeypatch.syspath_prepend(str(tmp_path / "worker"))  # spawned children inherit sys.path
    worker = importlib.import_module("fastgen_cache_race_worker")
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    root, key = tmp_path / "cache", key_of("race")
    procs = [ctx.Process(target=worker.race, args=(str(root), key, barrier, queue)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        sys.modules.pop("fastgen_cache_race_worker", None)
    (path_a, hit_a, bytes_a), (path_b, hit_b, bytes_b) = results
    assert path_a == path_b == str(EngineCache(root).path_for(key))
    assert bytes_a == bytes_b  # both use the winner's entry
    assert not hit_a and not hit_b  # both had to build
    verify_dir(path_a)
    assert list((root / ".staging").iterdir()) == []
    assert [p.name for p in (root / key[:2]).iterdir()] == [key]
