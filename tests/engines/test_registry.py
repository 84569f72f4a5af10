"""The backend registry: one place lists the backends; a new backend is one module plus one registration."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import fastgen
from fastgen.engines.base import Engine
from fastgen.engines.cache import EngineCache
from fastgen.engines.config import Backend, BuildConfig, ExecutionOptions
from fastgen.engines.loading import load_engine
from fastgen.engines.registry import (
    BUILTIN_BACKENDS,
    BackendSpec,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)
from fastgen.errors import InvalidArgumentError, UnsupportedError


def test_the_backend_literal_agrees_with_the_registry():
    assert typing.get_args(Backend) == BUILTIN_BACKENDS == backend_names()[:3]
    assert {spec.name for spec in map(get_backend, BUILTIN_BACKENDS)} == set(BUILTIN_BACKENDS)


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(InvalidArgumentError, match=r"invalid backend 'tvm' \(allowed: torch, onnxruntime, tensorrt"):
        get_backend("tvm")
    with pytest.raises(InvalidArgumentError, match=r"backend 'tvm'.*onnxruntime"):
        BuildConfig(backend="tvm")
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_backend(BackendSpec(name="torch", precisions=("fp32",), write_artifacts=print, load=print,
                                     version=str))


def test_cli_help_lists_the_backends_without_importing_torch():
    code = ("import sys; from fastgen.cli.main import cli; from fastgen.cli.options import field_choices; "
            "from fastgen.engines.config import BuildConfig; print(list(field_choices(BuildConfig, 'backend'))); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.replace("'", '"')) == list(BUILTIN_BACKENDS)


# --- a backend written in a test: its "module" is the code below, its registration one call ----------

WEIGHTS = "weights.pt.json"


class FakeEngine(Engine):
    """Runs the component's module, from weights saved as JSON (no pickle)."""

    backend = "fake"

    def __init__(self, component, *, device, precision, manifest=None, path=None, execution=None):
        super().__init__(component.spec, device=device, precision=precision, manifest=manifest, path=path)
        self.component = component
        self.execution = execution

    def _run(self, inputs):
        with torch.inference_mode():
            out = self.component.module(*(inputs[n] for n in self.spec.input_names))
        return dict(zip(self.spec.output_names, (out,) if isinstance(out, torch.Tensor) else out))


def _fake_spec(components: dict) -> BackendSpec:
    def write_artifacts(staging: Path, plan) -> dict:
        state = {k: v.tolist() for k, v in plan.component.module.state_dict().items()}
        (staging / WEIGHTS).write_text(json.dumps(state))
        components[plan.key] = plan.component
        return {"spec": plan.spec_dict}

    def load(path: Path, manifest: dict, *, device, execution) -> FakeEngine:
        component = components[manifest["cache_key"]]
        state = {k: torch.tensor(v) for k, v in json.loads((path / WEIGHTS).read_text()).items()}
        component.module.load_state_dict(state)
        return FakeEngine(component, device=device, precision=manifest["precision"], manifest=manifest,
                          path=path, execution=execution)

    return BackendSpec(name="fake", precisions=("fp32",), write_artifacts=write_artifacts, load=load,
                       version=lambda: "1.0")


@pytest.fixture
def fake_backend():
    components: dict = {}
    spec = register_backend(_fake_spec(components))
    yield spec
    unregister_backend("fake")


def test_a_registered_backend_builds_and_loads_through_fastgen_build(fake_backend, tmp_path, mlp):
    assert "fake" in backend_names() and BuildConfig(backend="fake").backend == "fake"
    cache = EngineCache(tmp_path / "cache")
    engine = fastgen.build(mlp, backend="fake", device="cpu", cache=cache,
                           execution=ExecutionOptions(intra_op_threads=1))
    assert isinstance(engine, FakeEngine) and not engine.cache_hit
    assert engine.manifest["backend"] == "fake" and engine.manifest["backend_version"] == "1.0"
    assert engine.manifest["key_material"]["build"]["export"] is None  # not an ONNX backend
    assert engine.execution == ExecutionOptions(intra_op_threads=1)
    x = torch.randn(3, 16)
    torch.testing.assert_close(engine.run(x=x)["y"], mlp.module(x)[0])
    again = fastgen.build(mlp, backend="fake", device="cpu", cache=cache)
    assert again.cache_hit and again.manifest["cache_key"] == engine.manifest["cache_key"]
    assert isinstance(load_engine(engine.path), FakeEngine)
    with pytest.raises(UnsupportedError, match="backend 'fake' cannot build precision 'fp16'"):
        fastgen.build(mlp, backend="fake", precision="fp16", device="cpu", cache=cache)
    unregister_backend("fake")
    with pytest.raises(InvalidArgumentError, match="engine backend 'fake'"):
        load_engine(engine.path)


def test_execution_options_keep_their_old_names():
    config = BuildConfig(execution=ExecutionOptions(intra_op_threads=2))
    old = {("runtime" if k == "execution" else k): v for k, v in config.to_dict().items()}
    assert BuildConfig.from_dict(old) == config  # a manifest written before the rename
    with pytest.warns(DeprecationWarning, match="ExecutionOptions"):
        assert fastgen.RuntimeOptions is ExecutionOptions
    from fastgen.engines.config import execution_options

    with pytest.warns(DeprecationWarning, match="execution="):
        assert execution_options(None, ExecutionOptions(spin_wait=True)).spin_wait
    with pytest.raises(InvalidArgumentError, match="runtime"):
        execution_options(ExecutionOptions(), ExecutionOptions())
