"""Hostile files and caches (issue 15): ONNX external data, engine directories, cache maintenance,
permissions and API arguments. Every risky call runs under a hard timeout (``hangs.within``), so a
regression fails instead of hanging CI."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from hangs import TIMEOUT, within
from onnx import TensorProto, helper

import fastgen
from fastgen.engines.cache import EngineCache, publish_dir, read_manifest, verify_dir, write_manifest
from fastgen.errors import CacheCorruptionError, FastgenError, InvalidArgumentError

UP = "../" * 40  # more than any tmp_path is deep: normalises to the filesystem root


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def cli(*args: str, capsys) -> tuple[int, str]:
    """``fastgen ARGS`` in this process (no interpreter start-up): (exit code, stderr)."""
    from fastgen.cli.main import main

    def run() -> int:
        try:
            main(list(args))
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    code = within(TIMEOUT, run, what=f"fastgen {' '.join(args)}")
    return code, capsys.readouterr().err


# --- ONNX files --------------------------------------------------------------------------------

def add_model(path: Path, location: str | None = None, *, offset: str | None = None, length: str | None = None,
              constant: bool = False) -> Path:
    """y = x + W, W (4 floats) inline, or external at ``location`` (also as a Constant node's tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4])
    if location is None and offset is None and length is None:
        w.raw_data = np.arange(4, dtype=np.float32).tobytes()
    else:
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            if value is not None:
                w.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Add", ["x", "W"], ["y"])]
    inits = [w]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=w))
        inits = []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hostile")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _weights(d: Path, name: str = "w.bin", pad: int = 0) -> None:
    (d / name).parent.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(b"\0" * pad + np.arange(4, dtype=np.float32).tobytes())


HOSTILE = {  # name: (location, offset, length, prepare(model_dir))
    "dev-zero": (UP + "dev/zero", None, None, None),
    "passwd": (UP + "etc/passwd", None, "16", None),
    "absolute": ("/etc/passwd", None, "16", None),
    "symlink-to-dev-zero": ("w.bin", None, None, lambda d: os.symlink("/dev/zero", d / "w.bin")),
    "symlink-to-outside-file": ("w.bin", None, "16", lambda d: os.symlink("/etc/passwd", d / "w.bin")),
    "symlinked-subdir": ("etc/passwd", None, "16", lambda d: os.symlink("/etc", d / "etc")),
    "fifo": ("w.bin", None, "16", lambda d: os.mkfifo(d / "w.bin")),
    "constant-node": (UP + "etc/passwd", None, "16", None),
    "directory": ("w.bin", None, None, lambda d: (d / "w.bin").mkdir()),
    "missing": ("nope.bin", None, None, None),
    "past-end": ("w.bin", "8", "16", _weights),
    "wrong-length": ("w.bin", None, "12", _weights),
    "negative-offset": ("w.bin", "-4", "16", _weights),
    "offset-not-a-number": ("w.bin", "4kB", "16", _weights),
    "nul-byte": ("w.bin\x00" + UP + "etc/passwd", None, "16", _weights),
    "no-location": (None, "0", "16", _weights),
    "empty-location": ("", None, "16", _weights),
}


#: Hostile only to a reader of the weights: reading the graph's IO signature does not need them.
DATA_ONLY = {"missing", "past-end", "wrong-length"}


@pytest.fixture(params=sorted(HOSTILE), ids=sorted(HOSTILE))
def hostile_onnx(request, tmp_path) -> tuple[Path, str | None, str]:
    location, offset, length, prepare = HOSTILE[request.param]
    d = tmp_path / "model"
    d.mkdir()
    if prepare is not None:
        prepare(d)
    path = add_model(d / "m.onnx", location, offset=offset, length=length, constant=request.param == "constant-node")
    return path, location, request.param


def check_refusal(exc: BaseException, location: str | None) -> None:
    assert isinstance(exc, InvalidArgumentError), repr(exc)
    one_line(exc, "'W'", "external data")
    if location:
        assert repr(location) in str(exc), str(exc)


def test_build_refuses_external_data_outside_the_model_dir(hostile_onnx, tmp_path):
    path, location, _ = hostile_onnx
    cache = EngineCache(tmp_path / "cache")
    with pytest.raises(FastgenError) as info:
        within(TIMEOUT, fastgen.build, str(path), backend="onnxruntime", device="cpu", cache=cache)
    check_refusal(info.value, location)
    assert cache.entries() == []


def test_every_reader_of_a_users_onnx_refuses_it(hostile_onnx):
    from fastgen.engines.onnx_io import spec_from_onnx
    from fastgen.export.verify import ort_runner

    path, location, case = hostile_onnx
    for reader in (fastgen.load_engine, ort_runner, lambda p: fastgen.load_engine(p.parent), spec_from_onnx):
        if reader is spec_from_onnx and case in DATA_ONLY:
            assert within(TIMEOUT, reader, path).input_names == ["x"]  # the graph alone: no weights needed
            continue
        with pytest.raises(FastgenError) as info:
            within(TIMEOUT, reader, path)
        check_refusal(info.value, location)


def test_cli_build_of_dev_zero_onnx_is_one_line_exit_2(tmp_path, capsys):
    path = add_model(tmp_path / "m" / "m.onnx", UP + "dev/zero")
    code, err = cli("build", str(path), "--backend", "onnxruntime", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "cache"), capsys=capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "'W'" in lines[0], err


def test_external_data_inside_the_model_dir_still_builds(tmp_path):
    d = tmp_path / "model"
    _weights(d, "weights/w.bin", pad=12)
    path = add_model(d / "m.onnx", "weights/w.bin", offset="12", length="16")
    engine = within(TIMEOUT, fastgen.build, str(path), backend="onnxruntime", device="cpu",
                    cache=EngineCache(tmp_path / "c"))
    y = engine.run(x=np.zeros((2, 4), np.float32))["y"]
    np.testing.assert_array_equal(np.asarray(y), np.tile(np.arange(4, dtype=np.float32), (2, 1)))
    assert within(TIMEOUT, fastgen.load_engine, path).run(x=np.ones((1, 4), np.float32))["y"].shape == (1, 4)


# --- engine directories ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_entry(tmp_path_factory) -> Path:
    """A real onnxruntime engine directory (with a tokenizer/ subfolder), built once per module."""
    root = tmp_path_factory.mktemp("entry")
    engine = within(TIMEOUT, fastgen.build, str(add_model(root / "src" / "m.onnx")), backend="onnxruntime",
                    device="cpu", cache=EngineCache(root / "cache"), out=root / "engine")
    directory = Path(engine.path)
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    write_manifest(directory, {k: v for k, v in read_manifest(directory).items()
                               if k not in ("artifacts", "format", "format_version")})
    return directory


@pytest.fixture
def engine_dir(built_entry, tmp_path) -> Path:
    shutil.copytree(built_entry, tmp_path / "engine")
    return tmp_path / "engine"


def relist(directory: Path, drop: str | None = None, **artifacts: Path) -> None:
    """Rewrite the manifest as an attacker would: ``drop`` one entry, list files as they are now."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["artifacts"].pop(drop, None)
    for name, file in artifacts.items():
        data = file.read_bytes()
        manifest["artifacts"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_unlisted_tampered_model_is_refused(engine_dir):
    within(TIMEOUT, fastgen.load_engine, engine_dir)  # intact: loads
    relist(engine_dir, drop="model.onnx")
    add_model(engine_dir / "model.onnx")  # another graph, not listed any more
    with pytest.raises(CacheCorruptionError) as info:
        within(TIMEOUT, fastgen.load_engine, engine_dir)
    one_line(info.value, "model.onnx", "not listed")


def test_unlisted_file_in_subfolder_is_refused(engine_dir):
    (engine_dir / "tokenizer" / "merges.txt").write_text("a b")
    with pytest.raises(CacheCorruptionError, match=r"tokenizer/merges\.txt.*not listed") as info:
        within(TIMEOUT, verify_dir, engine_dir, check="size")
    one_line(info.value)


@pytest.mark.parametrize("what", ["model-file", "subfolder", "manifest"])
def test_symlinks_in_an_engine_dir_are_refused(engine_dir, what):
    if what == "model-file":  # a listed name that is a link to a file outside, listed with its hash
        (engine_dir / "model.onnx").unlink()
        os.symlink("/etc/passwd", engine_dir / "model.onnx")
        relist(engine_dir, **{"model.onnx": Path("/etc/passwd")})
    elif what == "subfolder":
        shutil.rmtree(engine_dir / "tokenizer")
        os.symlink("/etc", engine_dir / "tokenizer")
    else:
        shutil.move(engine_dir / "manifest.json", engine_dir.parent / "elsewhere.json")
        os.symlink(engine_dir.parent / "elsewhere.json", engine_dir / "manifest.json")
    with pytest.raises(CacheCorruptionError) as info:
        within(TIMEOUT, fastgen.load_engine, engine_dir)
    one_line(info.value, "symbolic link")


def _huge(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(1 << 31)  # sparse: instant to make, slow and big to read


@pytest.mark.parametrize("manifest", ["not-json", "array", "nested", "huge", "fifo", "directory", "binary"])
def test_hostile_manifest_is_one_line_corruption(engine_dir, manifest):
    path = engine_dir / "manifest.json"
    path.unlink()
    {"not-json": lambda: path.write_text("{'format': 1"), "array": lambda: path.write_text("[1, 2]"),
     "nested": lambda: path.write_text("[" * 200_000 + "]" * 200_000), "huge": lambda: _huge(path),
     "fifo": lambda: os.mkfifo(path), "directory": path.mkdir,
     "binary": lambda: path.write_bytes(b"\xff\xfe\x00{")}[manifest]()
    for fn in (verify_dir, read_manifest, fastgen.load_engine):
        with pytest.raises(CacheCorruptionError) as info:
            within(min(20.0, TIMEOUT), fn, engine_dir)
        one_line(info.value, "manifest")


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../model.onnx", "./model.onnx", "", "manifest.json",
                                  "tokenizer//vocab.json", "a\\..\\b", "x\x00y"])
def test_bad_artifact_names_are_refused(engine_dir, name):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["artifacts"][name] = {"sha256": "0" * 64, "bytes": 1}
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptionError) as info:
        within(TIMEOUT, verify_dir, engine_dir)
    one_line(info.value)


@pytest.mark.parametrize("entry", [None, "x", {"bytes": "16", "sha256": "0"}, {"bytes": True}])
def test_bad_artifact_entries_are_refused(engine_dir, entry):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["artifacts"]["model.onnx"] = entry
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptionError) as info:
        within(TIMEOUT, verify_dir, engine_dir, check="size")
    one_line(info.value, "model.onnx")


# --- the cache ---------------------------------------------------------------------------------

KEY_A, KEY_B = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()


def builder(staging: Path) -> dict:
    # Written 0600, as mkstemp-based writers (safetensors, tempfile) leave their files.
    fd = os.open(staging / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"w" * 64)
    os.close(fd)
    (staging / "tokenizer").mkdir(mode=0o700)
    (staging / "tokenizer" / "vocab.json").write_text("{}")
    return {"backend": "onnxruntime", "precision": "fp32", "device": "cpu", "spec": {"component": "x"}}


def old_staging(root: Path, name: str) -> Path:
    d = root / ".staging" / name
    d.mkdir(parents=True)
    (d / "f").write_text("keep me")
    for p in (d / "f", d):
        os.utime(p, (1e9, 1e9))  # 2001: long stale
    return d


def test_read_only_commands_delete_nothing(tmp_path, capsys):
    foreign = old_staging(tmp_path, "my-own-staging-folder")
    dead = old_staging(tmp_path, f"{KEY_A}-999999999-abcdefgh")  # fastgen's pattern, but no marker: not ours
    code, err = cli("cache", "--cache-dir", str(tmp_path), "list", "--json", capsys=capsys)
    assert code == 0, err
    cache = EngineCache(tmp_path)
    cache.entries()
    cache.verify_entries()
    assert foreign.exists() and dead.exists()


def test_clear_needs_a_marked_cache_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    (outside / KEY_B).mkdir(parents=True)
    write_manifest(outside / KEY_B, {})
    plain = tmp_path / "plain"  # a folder that merely looks like a cache
    (plain / KEY_A[:2] / KEY_A).mkdir(parents=True)
    with pytest.raises(InvalidArgumentError) as info:
        EngineCache(plain).clear()
    one_line(info.value, "cache")
    assert (plain / KEY_A[:2] / KEY_A).exists()

    cache = EngineCache(tmp_path / "cache")
    cache.get_or_build(KEY_A, builder)
    os.symlink(outside, cache.root / KEY_B[:2])  # a prefix directory that is a link out of the root
    os.symlink(outside, cache.path_for(KEY_A) / "tokenizer" / "more")  # a link inside an entry
    key_c = hashlib.sha256(b"c").hexdigest()
    (cache.root / key_c[:2]).mkdir()
    os.symlink(outside / KEY_B, cache.path_for(key_c))  # an entry that is a link
    foreign = old_staging(cache.root, "notes")
    assert [e["key"] for e in cache.entries()] == [KEY_A]
    assert [r["status"] for r in cache.verify_entries()] == ["damaged"]
    assert cache.lookup(KEY_B) is None and cache.lookup(key_c) is None and cache.lookup(KEY_A) is None
    cache.get_or_build(KEY_A, builder)
    os.symlink(outside, cache.path_for(KEY_A) / "tokenizer" / "more")
    assert cache.clear() == 1
    assert (outside / KEY_B / "manifest.json").exists() and foreign.exists()
    assert (cache.root / KEY_B[:2]).is_symlink() and not os.path.lexists(cache.path_for(key_c))


def test_stale_staging_cleanup_matches_only_fastgens_names(tmp_path):
    cache = EngineCache(tmp_path)
    cache.get_or_build(KEY_A, builder)
    ours = old_staging(tmp_path, f"{KEY_B}-999999999-abcdefgh")
    foreign = old_staging(tmp_path, "user-stuff")
    os.symlink(foreign, tmp_path / ".staging" / f"{KEY_A}-999999998-zzzzzzzz")
    cache.get_or_build(KEY_B, builder)
    assert not ours.exists() and foreign.exists() and (foreign / "f").read_text() == "keep me"


@contextlib.contextmanager
def read_only_filesystem(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        for name in ("rename", "replace", "unlink", "rmdir", "mkdir"):
            m.setattr(os, name, refuse)
        yield


def test_read_only_cache_reports_what_really_happened(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="fastgen.engines.cache")
    cache = EngineCache(tmp_path)
    for key in (KEY_A, KEY_B):
        cache.get_or_build(key, builder)
    (cache.path_for(KEY_A) / "weights.bin").write_bytes(b"x" * 64)  # damaged
    with read_only_filesystem(monkeypatch):
        assert cache.lookup(KEY_A) is None  # never handed out...
        rows = {r["key"]: r for r in cache.verify_entries(repair=True)}
        with pytest.raises(FastgenError) as info:
            cache.clear()
    assert "could not be removed" in caplog.text
    assert rows[KEY_B]["status"] == "ok" and rows[KEY_A]["status"] == "damaged"
    assert rows[KEY_A]["removed"] is False and rows[KEY_A]["remove_error"]
    one_line(info.value, "0 of 2")
    assert cache.path_for(KEY_A).exists() and cache.path_for(KEY_B).exists()
    assert [r["removed"] for r in cache.verify_entries(repair=True) if r["key"] == KEY_A] == [True]
    assert not cache.path_for(KEY_A).exists()


def test_cache_entry_under_another_key_is_not_handed_out(tmp_path):
    cache = EngineCache(tmp_path)
    cache.get_or_build(KEY_A, builder)
    cache.path_for(KEY_B).parent.mkdir()
    shutil.copytree(cache.path_for(KEY_A), cache.path_for(KEY_B))
    assert cache.lookup(KEY_B) is None


def test_cache_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(InvalidArgumentError) as info:
            EngineCache(root).get_or_build(KEY_A, builder)
        one_line(info.value, "cache")
    code, err = cli("build", str(add_model(tmp_path / "m.onnx")), "--backend", "onnxruntime", "--device", "cpu",
                    "--cache-dir", str(tmp_path / "file" / "sub"), capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_out_inside_the_cache_root_is_refused(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    path = add_model(tmp_path / "m.onnx")
    for out in (cache.root / KEY_B[:2] / KEY_B, cache.root, tmp_path):
        with pytest.raises(InvalidArgumentError) as info:
            within(TIMEOUT, fastgen.build, str(path), backend="onnxruntime", device="cpu", cache=cache, out=out)
        one_line(info.value, "out")
    assert cache.lookup(KEY_B) is None


# --- permissions -------------------------------------------------------------------------------

def modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_dirs_are_shareable(tmp_path, umask):
    old = os.umask(umask)
    try:
        cache = EngineCache(tmp_path / "cache")
        entry, _ = cache.get_or_build(KEY_A, builder)
        out = publish_dir(entry, tmp_path / "out")
    finally:
        os.umask(old)
    want = {("d", 0o777 & ~umask), ("f", 0o666 & ~umask)}
    assert modes(entry) == want and modes(out) == want


def test_built_out_dir_is_0755(tmp_path):
    old = os.umask(0o022)
    try:
        engine = within(TIMEOUT, fastgen.build, str(add_model(tmp_path / "m.onnx")), backend="onnxruntime",
                        device="cpu", cache=EngineCache(tmp_path / "cache"), out=tmp_path / "out")
    finally:
        os.umask(old)
    assert modes(Path(engine.path)) == {("d", 0o755), ("f", 0o644)}
    assert modes(EngineCache(tmp_path / "cache").path_for(engine.manifest["cache_key"])) == {("d", 0o755), ("f", 0o644)}


# --- API arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, 123, b"engine", ["a"]])
def test_load_engine_bad_path(value):
    with pytest.raises(InvalidArgumentError) as info:
        fastgen.load_engine(value)
    one_line(info.value, "engine")


@pytest.mark.parametrize("kwargs, argument", [
    ({"backend": None}, "backend"), ({"config": {"backend": "torch"}}, "config"), ({"config": "torch"}, "config"),
    ({"no_such_option": 1}, "no_such_option"), ({"cache": 123}, "cache"), ({"out": 123}, "out"),
])
def test_build_bad_arguments(tmp_path, kwargs, argument):
    with pytest.raises(InvalidArgumentError) as info:
        fastgen.build(str(add_model(tmp_path / "m.onnx")), **kwargs)
    one_line(info.value, argument)
