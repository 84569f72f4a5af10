"""The CLI's error contract under hostile input (issue 15): bad input or environment is one ``error:`` line
on stderr and exit code 2, never a traceback or exit 1; ``generate`` checks its output folder before the
work and writes it atomically; ``bench`` keeps to the engine's profile; profiles that could never be
allocated are refused. Commands run in-process (``fastgen.cli.main.main``, the same exit-code mapping as
the console script) in a daemon thread with a hard timeout (``hangs.within``), so a regression fails
instead of hanging CI.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hangs import TIMEOUT, within

from fastgen.cli.main import main
from fastgen.errors import InvalidArgumentError
from fastgen.models.spec import ExportSpec, ShapeProfile, TensorSpec

HUGE = str(10**12)  # a dim no machine could hold a tensor of: refusing it must not try to allocate it


def run_cli(capsys, *args: str, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """``fastgen ARGS`` in-process under a timeout: (exit code, stdout, stderr). Any other exception
    escaping ``main`` (which must turn everything into an exit code) is re-raised here."""

    def run() -> int:
        try:
            main([*args])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        return 0

    capsys.readouterr()
    code = within(timeout, run, what=f"fastgen {' '.join(args)}")
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "internal error" not in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- hostile environments --------------------------------------------------------------------------

def _under(path: object, root: str) -> bool:
    if isinstance(path, int):
        return False
    p = os.path.abspath(os.fsdecode(path))
    return p == root or p.startswith(root + os.sep)


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A directory nothing can be created in: mode 0555, and where modes do not bind (root), every
    write under it refused in this process as the kernel would (EACCES)."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / ".probe").mkdir()
    except PermissionError:
        pass
    else:
        (ro / ".probe").rmdir()
        root = str(ro)

        def deny(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

        def guard(func, paths=(0,), flags=None):
            def wrapper(*args, **kwargs):
                writing = flags is None or flags(*args, **kwargs)
                for i in paths:
                    if i < len(args) and writing and _under(args[i], root):
                        deny(args[i])
                return func(*args, **kwargs)
            return wrapper

        for name, paths in (("mkdir", (0,)), ("rmdir", (0,)), ("unlink", (0,)), ("remove", (0,)),
                            ("rename", (0, 1)), ("replace", (0, 1))):
            monkeypatch.setattr(os, name, guard(getattr(os, name), paths))
        monkeypatch.setattr(os, "open", guard(os.open, flags=lambda p, f, *a, **k: bool(
            f & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))))
        monkeypatch.setattr(builtins, "open", guard(builtins.open, flags=lambda f, mode="r", *a, **k: any(
            c in mode for c in "wax+")))
    yield ro
    ro.chmod(0o755)


# --- a generator stand-in: the CLI contract, without the cost of real engines -------------------

class FakeGenerator:
    """What ``fastgen generate`` needs of a Generator; counts its loads and refuses absurd batches."""

    loads = 0

    def __init__(self):
        self.unet = type("Unet", (), {"backend": "fake", "device": "cpu", "precision": "fp32"})()
        self.default_size = (8, 8)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.loads += 1
        return cls()

    def generate(self, prompts, *, config, **kwargs):
        from fastgen.pipelines.config import GenerationResult, Latencies

        n = config.num_images_per_prompt
        assert len(prompts) * n <= 64, "the CLI let an absurd batch through to the generator"
        seed = 0 if config.seed is None else config.seed
        seeds = [seed + j for _ in prompts for j in range(n)]
        images = np.stack([np.full((8, 8, 3), s % 256, np.uint8) for s in seeds])
        return GenerationResult(images=images, prompts=[p for p in prompts for _ in range(n)], seeds=seeds,
                                prompt_indices=[i for i in range(len(prompts)) for _ in range(n)],
                                latencies=Latencies(), config=config)


@pytest.fixture
def fake_gen(monkeypatch):
    from fastgen.pipelines.generator import Generator

    FakeGenerator.loads = 0
    monkeypatch.setattr(Generator, "from_pretrained", FakeGenerator.from_pretrained)
    return FakeGenerator


GEN = ("generate", "--model", "tiny", "--device", "cpu", "--no-progress", "--steps", "2")


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- finding 1: environment errors and inputs nobody could allocate ---------------------------------

@pytest.mark.parametrize("exc", [
    PermissionError(errno.EACCES, "Permission denied", "/srv/out/0_seed1.png"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "/srv/out/results.json"),
    NotADirectoryError(errno.ENOTDIR, "Not a directory", "/srv/out/x/.staging"),
    FileExistsError(errno.EEXIST, "File exists", "/srv/out"),
    OSError(errno.ENOSPC, "No space left on device", "/srv/out/0_seed1.png"),
    OSError(errno.EROFS, "Read-only file system", "/srv/out"),
    OSError(errno.EACCES, "Permission denied\nsecond line", "/srv/out"),
    UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed"),
])
def test_environment_errors_exit_2_in_one_line(capsys, monkeypatch, exc):
    def fail(path):
        raise exc

    monkeypatch.setattr("fastgen.cli.report.describe_path", fail)
    line = assert_error(run_cli(capsys, "inspect", "anything"))
    if isinstance(exc, OSError):
        assert "/srv/out" in line
    else:
        assert "UTF-8" in line


def test_genuine_bugs_still_exit_1(capsys, monkeypatch):
    def fail(path):
        raise KeyError("spec")

    monkeypatch.setattr("fastgen.cli.report.describe_path", fail)
    code, _, err = run_cli(capsys, "inspect", "anything")
    assert code == 1 and "internal error (KeyError)" in err and len(err.strip().splitlines()) == 1


def test_readonly_out_is_refused_before_the_work(capsys, fake_gen, readonly_dir):
    for out in (readonly_dir, readonly_dir / "new" / "deeper"):
        assert_error(run_cli(capsys, *GEN, "--prompt", "x", "--out", str(out)), "out", str(readonly_dir))
    assert fake_gen.loads == 0 and not any(readonly_dir.iterdir())


def test_readonly_or_file_cache_is_refused_before_the_work(capsys, fake_gen, readonly_dir, tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("not a cache")
    for cache in (str(readonly_dir), str(readonly_dir / "sub"), "/dev/null", str(a_file / "sub")):
        assert_error(run_cli(capsys, "build", "tiny", "-c", "classifier", "--cache-dir", cache), "cache-dir")
        assert_error(run_cli(capsys, *GEN, "--prompt", "x", "--cache-dir", cache, "--out", str(tmp_path / "o")),
                     "cache-dir")
    monkeypatch.setenv("FASTGEN_CACHE_DIR", str(a_file))
    assert_error(run_cli(capsys, "build", "tiny", "-c", "classifier", "--device", "cpu"), "FASTGEN_CACHE_DIR")
    assert_error(run_cli(capsys, "score", "--model", "tiny", "--text", "x"), "FASTGEN_CACHE_DIR")
    assert fake_gen.loads == 0 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"", b"not protobuf at all \xff\xfe", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" * 7])
def test_inspect_corrupt_onnx(capsys, tmp_path, content):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    for path in (bad, tmp_path):  # the file, and a folder holding only it
        code, out, err = run_cli(capsys, "inspect", str(path), "--json")
        if code != 0:  # an empty protobuf is a valid (empty) model; anything else must be one line
            assert_error((code, out, err), str(tmp_path))


def test_spec_refuses_profiles_no_machine_could_hold():
    from fastgen.models.spec import memory_limit_bytes

    spec = ExportSpec("unet", inputs=(TensorSpec("sample", "float32", ("batch", 4, "height/8", "width/8")),),
                      outputs=(TensorSpec("out", "float32", ("batch", 3, "height", "width")),),
                      profile=ShapeProfile.of(batch=(1, 2, 8), height=(256, 512, 1024), width=(256, 512, 1024)),
                      multiples={"height": 16, "width": 16})
    assert spec.with_profile("batch=1:2:16,height=512:512:2048").profile.dims["batch"].max == 16  # sane: fine
    for profile, dim in (("batch=1:1:100000000", "batch"), ("height=16:512:10000000", "height"),
                         (f"batch=1:1:{HUGE}", "batch"), ("batch=1:1:99999999999999999999999", "batch"),
                         ("height=512:512:65536,batch=1:2:4096,width=512:512:65536", "batch")):
        with pytest.raises(InvalidArgumentError, match=rf"invalid profile '{dim}=.*memory") as info:
            spec.with_profile(profile)
        assert "\n" not in str(info.value) and "lower" in str(info.value)
    limit = memory_limit_bytes()
    assert 2**26 <= limit <= 2**60
    with pytest.raises(InvalidArgumentError, match="batch"):
        spec.sample_inputs({"batch": 10**12})  # refused before allocating
    with pytest.raises(InvalidArgumentError, match="height"):
        spec.check_dims({"height": 16 * 10**9, "width": 512})
    for text in (",,,", "batch=\u00b2", "batch=\uff11", "batch=1,batch=2", "batch=1:2", "=4"):
        with pytest.raises(InvalidArgumentError, match="profile"):
            ShapeProfile.parse(text)


def test_cli_refuses_absurd_profiles(capsys, tmp_path, fake_gen, monkeypatch):
    monkeypatch.setattr("fastgen.models.spec.memory_limit_bytes", lambda: 16 << 30)  # the same on every machine
    for profile, dim in ((f"batch=1:1:{HUGE}", "batch"), ("batch=99999999999999999999999", "batch"),
                         (",,,", "profile"), ("batch=\u00b2", "profile")):
        assert_error(run_cli(capsys, "build", "tiny", "-c", "classifier", "--device", "cpu", "--verify", "none",
                             "--no-cache", "--profile", profile, "--out", str(tmp_path / "e")), dim)
    for profile in (f"height=16:64:{16 * 10**9}", "height=16:64:10000000"):  # 5 GB of UNet input and output
        assert_error(run_cli(capsys, "export", "tiny", "-c", "unet", "--verify", "none", "--profile", profile,
                             "--out", str(tmp_path / "x")), "height", "memory")
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def test_invalid_utf8_text_is_refused_naming_the_option(capsys, tmp_path, fake_gen, monkeypatch):
    from fastgen.pipelines.scorer import Scorer

    def no_scorer(*args, **kwargs):
        raise AssertionError("the scorer was loaded for unreadable text")

    monkeypatch.setattr(Scorer, "from_pretrained", no_scorer)
    bad = "caf\udce9"  # how Python hands over the byte 0xe9 of a Latin-1 terminal (surrogateescape)
    for args, option in (((*GEN, "--prompt", bad), "prompt"), ((*GEN, "--prompt", "x", "--negative-prompt", bad),
                                                                "negative-prompt"),
                         (("score", "--model", "tiny", "--text", "ok", "--text", bad), "text")):
        line = assert_error(run_cli(capsys, *args, "--out", str(tmp_path / "o")) if args[0] == "generate"
                            else run_cli(capsys, *args), option, "UTF-8")
        line.encode("utf-8")  # the message itself is printable
    assert fake_gen.loads == 0 and not (tmp_path / "o").exists()


def test_non_utf8_file_names_are_scored_and_shown(capsys, tmp_path):
    from PIL import Image

    name = os.fsdecode(b"ad-\xe9t\xe9.png")  # a valid Linux file name that is not UTF-8
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / name, format="PNG")
    code, out, err = run_cli(capsys, "score", "--model", "tiny", "--backend", "torch", "--device", "cpu",
                             str(tmp_path / name))
    assert code == 0, err
    assert "ad-" in out


def test_progress_bars_leave_no_line_behind_on_failure(capsys):
    from fastgen.core.progress import steps

    with pytest.raises(InvalidArgumentError):
        with steps("export unet", 2, enabled=True) as s:
            s.advance("tracing")
            raise InvalidArgumentError("opset", 9, "17 to 23")
    assert "export unet" not in capsys.readouterr().err


@pytest.mark.parametrize("spec", [None, "not a spec", {"component": "x"}, {"component": "x", "inputs": "abc",
                                                                         "outputs": []},
                                  {"component": "c", "inputs": [{"name": "x", "dtype": "float32", "shape": ["b"]}],
                                   "outputs": [], "profile": {"b": 5}}])
def test_inspect_damaged_manifest(capsys, tmp_path, spec):
    engine = tmp_path / "engine"
    engine.mkdir()
    manifest = {"format": "fastgen-engine", "format_version": 2, "artifacts": {}, "backend": "onnxruntime",
                "build_seconds": "soon", "spec": spec}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    for extra in ((), ("--json",)):
        assert_error(run_cli(capsys, "inspect", str(engine), *extra), str(engine))


# --- finding 2: bench keeps to the engine's profile -------------------------------------------------

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """The tiny classifier as a torch engine directory: profile batch=1:8:32, height = width = 64 only."""
    import fastgen
    from fastgen.export.config import ExportConfig

    out = tmp_path_factory.mktemp("engines") / "classifier"
    fastgen.build("tiny", component="classifier", backend="torch", device="cpu", out=out, cache=False,
                  export=ExportConfig(verify="none"))
    return str(out)


def test_bench_checks_the_profile_before_running(capsys, classifier_dir, monkeypatch):
    from fastgen.engines.base import Engine

    calls = []
    original = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    bench = ("bench", classifier_dir, "--iters", "1", "--warmup", "0")
    for args, needles in ((("--shape", "height=7"), ("height", "64")), (("--batch", "2,100000"), ("batch", "1 to 32")),
                          (("--batch", "33"), ("batch", "32")), (("--shape", "width=\u00b2"), ("shape",)),
                          (("--profile", f"batch=1:1:{HUGE}"), ("batch", "memory")),
                          (("--iters", "1000000000"), ("iters",)), (("--warmup", "1000000000"), ("warmup",))):
        assert_error(run_cli(capsys, *bench, *args), *needles)
    assert calls == []
    code, out, err = run_cli(capsys, *bench, "--batch", "1,32", "--shape", "height=64", "--json")
    assert code == 0, err
    assert [r["batch"] for r in json.loads(out)["results"]] == [1, 32]


def test_benchmark_validates_every_point_first():
    import torch

    from fastgen.engines.bench import benchmark
    from fastgen.engines.torch_backend import TorchEngine
    from fastgen.models.component import Component

    class Net(torch.nn.Module):
        def forward(self, x):
            return (x * 2,)

    spec = ExportSpec("net", inputs=(TensorSpec("x", "float32", ("batch", 4, "height/8")),),
                      outputs=(TensorSpec("y", "float32", ("batch", 4, "height/8")),),
                      profile=ShapeProfile.of(batch=(1, 2, 4), height=(16, 32, 64)), multiples={"height": 16})
    module = Net()
    engine = TorchEngine(Component("net", module, spec, module))
    seen = []
    engine.run = lambda inputs: seen.append(inputs) or {}
    for kwargs, needle in (({"batches": [1, 5]}, "batch"), ({"batches": [1], "shape": {"height": 24}}, "multiples"),
                           ({"batches": [1], "shape": {"height": 128}}, "16 to 64")):
        with pytest.raises(InvalidArgumentError, match=needle):
            benchmark(engine, strict=True, iters=1, warmup=0, **kwargs)
    assert seen == []


# --- finding 3: generate --out ----------------------------------------------------------------------

@pytest.mark.parametrize("contents", [{"notes.txt": "mine"}, {"results.json": "{not json"},
                                      {"results.json": '{"files": "x"}', "a.png": "x"}, {"sub/": ""}])
def test_generate_refuses_a_folder_it_did_not_write(capsys, tmp_path, fake_gen, contents):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in contents.items():
        (out / name).mkdir() if name.endswith("/") else (out / name).write_text(text)
    before = sorted(p.name for p in out.iterdir())
    assert_error(run_cli(capsys, *GEN, "--prompt", "x", "--out", str(out)), "out", "fastgen")
    assert fake_gen.loads == 0 and sorted(p.name for p in out.iterdir()) == before


def test_generate_out_is_not_a_file_nor_empty(capsys, tmp_path, fake_gen, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.png").write_bytes(b"x")
    for out in ("", "file.png", "/dev/null", "file.png/sub"):
        assert_error(run_cli(capsys, *GEN, "--prompt", "x", "--out", out), "out")
    assert fake_gen.loads == 0 and sorted(os.listdir(tmp_path)) == ["file.png"]


def test_generate_replaces_its_previous_output_only(capsys, tmp_path, fake_gen):
    out = tmp_path / "gen"
    assert run_cli(capsys, *GEN, "--prompt", "a", "-n", "2", "--seed", "7", "--out", str(out))[0] == 0
    assert sorted(os.listdir(out)) == ["0_seed7.png", "1_seed8.png", "results.json"]
    (out / "notes.txt").write_text("kept")
    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    data = json.loads((out / "results.json").read_text())
    data["files"] += ["../victim.txt", "notes.txt", "/etc/hostname"]  # a doctored results.json deletes nothing
    (out / "results.json").write_text(json.dumps(data))
    assert run_cli(capsys, *GEN, "--prompt", "b", "--seed", "3", "--out", str(out))[0] == 0
    assert sorted(os.listdir(out)) == ["0_seed3.png", "notes.txt", "results.json"]  # stale images gone
    assert json.loads((out / "results.json").read_text())["files"] == ["0_seed3.png"] and victim.exists()
    (out / "0_seed5.png").mkdir()  # a folder where the next run's image goes: refused, nothing half-published
    before = sorted(os.listdir(out))
    assert_error(run_cli(capsys, *GEN, "--prompt", "c", "--seed", "5", "--out", str(out)), "0_seed5.png")
    assert sorted(os.listdir(out)) == before


def test_a_failed_write_leaves_the_output_as_it_was(capsys, tmp_path, fake_gen, monkeypatch):
    import fastgen.cli.generate as gen_cli

    out = tmp_path / "gen"
    assert run_cli(capsys, *GEN, "--prompt", "a", "-n", "2", "--seed", "7", "--out", str(out))[0] == 0
    before = listing(out)
    written = []
    real = gen_cli.write_png

    def disk_full(image, path):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        real(image, path)

    monkeypatch.setattr(gen_cli, "write_png", disk_full)
    assert_error(run_cli(capsys, *GEN, "--prompt", "b", "-n", "2", "--seed", "7", "--out", str(out)), str(out))
    assert listing(out) == before and len(written) == 1
    written.clear()
    fresh = tmp_path / "new" / "gen"
    assert_error(run_cli(capsys, *GEN, "--prompt", "b", "-n", "2", "--out", str(fresh)), str(fresh))
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["gen"]


# --- finding 4: every command with hostile arguments ------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (("inspect", ""), ("engine",)), (("bench", ""), ("engine",)), (("inspect", "/no/such/engine"), ("engine",)),
    (("export", "", "-c", "unet", "--out", "o"), ("model",)), (("build", "", "-c", "unet"), ("model",)),
    (("build", "tiny", "-c", "classifier", "--cache-dir", ""), ("cache-dir",)),
    (("build", "tiny", "-c", "classifier", "--trt-profile", " "), ("trt-profile",)),
    (("build", "tiny", "-c", "classifier", "--trt-profile", ",,,"), ("profile",)),
    (("cache", "--cache-dir", "", "list"), ("cache-dir",)), (("cache", "--cache-dir", "/dev/null", "clear"), ("cache-dir",)),
    (("demo", "--cache-dir", "/dev/null"), ("cache-dir",)), (("demo", "--out", "/dev/null"), ("out",)),
    (("demo", "--out", "."), ("out",)), (("demo", "--steps", "1000000000"), ("steps",)),
    (("demo", "--candidates", "1000000000"), ("candidates",)),
    (("score", "--model", "tiny", "--text", "x", "--frames", "1000000000000"), ("frames",)),
    (("export", "tiny", "-c", "classifier", "--out", "/dev/null"), ("out",)),
    ((*GEN, "--prompt", "x", "--model", ""), ("model",)), ((*GEN, "--prompt", "x", "--scorer", ""), ("scorer",)),
    ((*GEN, "--prompt", "x", "--image", ""), ("image",)), ((*GEN, "--prompt", "x", "--image", "."), ("image",)),
    ((*GEN, "--prompt", "x", "--steps", "0"), ("steps",)), ((*GEN, "--prompt", "x", "--steps", "-1"), ("steps",)),
    ((*GEN, "--prompt", "x", "--steps", "100000000000"), ("steps", "1000")),
    ((*GEN, "--prompt", "x", "-n", "0"), ("num-images-per-prompt",)),
    ((*GEN, "--prompt", "x", "-n", "1000000000"), ("num-images-per-prompt", "memory")),
    ((*GEN, "--prompt", "x", "--cache-dir", ""), ("cache-dir",)), ((*GEN, "--prompt", "x", "--profile", "x"), ("profile",)),
    (("score", "--model", "", "--text", "x"), ("model",)), (("score", "--model", "tiny", ""), ("files",)),
    (("score", "--model", "tiny", "."), ("file", "directory")),
    (("score", "--model", "tiny", "--text", "x", "--cache-dir", "/dev/null"), ("cache-dir",)),
])
def test_hostile_arguments(capsys, tmp_path, monkeypatch, fake_gen, args, needles):
    import fastgen.cli.demo as demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("a folder that is not fastgen's")
    monkeypatch.setattr(demo, "_run_backend", lambda *a, **k: pytest.fail("the demo ran before its checks"))
    assert_error(run_cli(capsys, *args), *needles)
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
    # Image counts are checked once the image size is known: after the generator loads, before it runs.
    assert fake_gen.loads == (args[0] == "generate" and "1000000000" in args)


def test_real_generator_refuses_sizes_before_allocating(capsys, tmp_path):
    base = ("generate", "--model", "tiny", "--backend", "torch", "--device", "cpu", "--no-progress", "--steps", "1",
            "--prompt", "x", "--out", str(tmp_path / "o"))
    assert_error(run_cli(capsys, *base, "--height", "7"), "height", "16")
    assert_error(run_cli(capsys, *base, "--height", str(16 * 10**9)), "height", "memory")
    assert_error(run_cli(capsys, *base, "--profile", f"batch=1:1:{HUGE}"), "batch", "memory")
    assert not (tmp_path / "o").exists()
