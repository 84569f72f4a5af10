"""The TensorRT stand-in: its API is the real bindings' (TensorRT 10 and 11), and it simulates TensorRT faithfully."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))

import trt_bindings  # noqa: E402
import trt_standin  # noqa: E402
import trt_standin_behaviour as behaviour  # noqa: E402
from trt_standin import SOURCE, StandinDriftError, make_standin  # noqa: E402

MAJORS = sorted(trt_bindings.VERSIONS)
PROFILE = ((1, 8), (4, 8), (8, 8))


def real_api(major: int) -> dict:
    api = trt_bindings.api(major)
    if api is None:
        reason = f"TensorRT {major}'s Python bindings are not installed (make install puts them in .venv)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return api


@pytest.fixture(params=MAJORS, ids=lambda m: f"trt{m}")
def api(request) -> dict:
    return real_api(request.param)


@pytest.fixture
def trt(api):
    return make_standin(api)


def make_logger(trt):
    class Capture(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []

        def log(self, severity, msg) -> None:
            self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s == trt.ILogger.Severity.ERROR]

    return Capture()


def _export(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Two exports of one architecture (other weights), a com.microsoft graph, a file that is not ONNX."""
    root = tmp_path_factory.mktemp("standin")
    a, b = root / "a.onnx", root / "b.onnx"
    out = {"a": a, "model_a": _export(a, 0), "b": b, "model_b": _export(b, 1)}
    node = helper.make_node("MatMulIntegerToFloat", ["x", "w", "s", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "ms", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("w", TensorProto.UINT8, (8, 4), [1] * 32),
         helper.make_tensor("s", TensorProto.FLOAT, (), [1.0])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), root / "ms.onnx")
    out["ms"] = root / "ms.onnx"
    (root / "junk.onnx").write_bytes(b"\x00not onnx\xff" * 10)
    out["junk"] = root / "junk.onnx"
    return out


def network_of(trt, builder, log, path: Path, flags: int | None = None):
    if flags is None:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    return network


def build(trt, path: Path, *, refit: bool = False, log=None, profile=PROFILE, cache=None, monitor=None):
    """Build and load an engine exactly as the backend does; (engine, logger, config)."""
    log = log or make_logger(trt)
    builder = trt.Builder(log)
    network = network_of(trt, builder, log, path)
    config = builder.create_builder_config()
    config.builder_optimization_level = 2
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if monitor is not None:
        config.progress_monitor = monitor
    if cache is not None:
        assert config.set_timing_cache(cache, False)
    p = builder.create_optimization_profile()
    p.set_shape("x", *profile)
    assert config.add_optimization_profile(p) == 0
    host = builder.build_serialized_network(network, config)
    assert host is not None, log.errors()
    engine = trt.Runtime(log).deserialize_cuda_engine(bytes(memoryview(host)))
    assert engine is not None, log.errors()
    return engine, log, config


def run(engine, x: torch.Tensor) -> torch.Tensor:
    ctx = engine.create_execution_context()
    assert ctx.set_optimization_profile_async(0, 0)
    assert ctx.set_input_shape("x", tuple(x.shape))
    y = torch.empty(tuple(ctx.get_tensor_shape("y")))
    assert ctx.set_tensor_address("x", x.data_ptr()) and ctx.set_tensor_address("y", y.data_ptr())
    assert ctx.execute_async_v3(0)
    return y


# -- (a) conformance: every SOURCE entry is in the real bindings of both majors
def test_every_source_entry_is_in_the_real_bindings(api):
    classes = api["classes"]
    for qualname, members in SOURCE.items():
        if qualname == "<module>":
            assert all(m == "__version__" or m in classes for m in members), members
            continue
        entry = classes[qualname]
        real = {*entry["methods"], *entry["properties"], *(entry["members"] or ())}
        assert not set(members) - real, f"TensorRT {api['version']}: {qualname} lacks {set(members) - real}"
    trt = make_standin(api)
    assert trt.__version__ == api["version"]
    for qualname, members in SOURCE.items():
        entry = classes.get(qualname)
        if entry and entry["members"] is not None:
            cls = trt
            for part in qualname.split("."):
                cls = getattr(cls, part)
            assert {m: int(getattr(cls, m)) for m in members if m in entry["members"]} == \
                {m: entry["members"][m] for m in members if m in entry["members"]}


def test_drift_from_the_real_bindings_is_refused(api):
    broken = copy.deepcopy(api)
    del broken["classes"]["ICudaEngine"]["methods"]["get_tensor_shape"]
    del broken["classes"]["DataType"]["members"]["FP8"]
    with pytest.raises(StandinDriftError, match=r"ICudaEngine\.get_tensor_shape") as info:
        make_standin(broken)
    assert "DataType.FP8" in str(info.value) and api["version"] in str(info.value)


def test_source_and_behaviour_stay_in_sync(api, monkeypatch):
    with pytest.raises(StandinDriftError, match=r"Builder\.reset: SOURCE lists it, the behaviour does not"):
        make_standin(api, source={**SOURCE, "Builder": SOURCE["Builder"] + ("reset",)})
    with pytest.raises(StandinDriftError, match=r"cannot construct ICudaEngine"):
        make_standin(api, source={**SOURCE, "ICudaEngine": SOURCE["ICudaEngine"] + ("__init__",)})
    with monkeypatch.context() as m:
        m.setattr(behaviour.ICudaEngine, "get_tensor_location", lambda self, name: None, raising=False)
        with pytest.raises(StandinDriftError, match=r"ICudaEngine\.get_tensor_location: the behaviour defines it"):
            make_standin(api)
    with monkeypatch.context() as m:  # a parameter named otherwise than TensorRT's
        m.setattr(behaviour.ICudaEngine, "get_tensor_name", lambda self, i: None)
        with pytest.raises(StandinDriftError, match=r"get_tensor_name: the behaviour's parameters"):
            make_standin(api)
    with monkeypatch.context() as m:  # a method where TensorRT has a property
        m.setattr(behaviour.ICudaEngine, "num_layers", lambda self: 2)
        with pytest.raises(StandinDriftError, match=r"ICudaEngine\.num_layers: a property in TensorRT"):
            make_standin(api)


# -- (b), (c): only SOURCE members exist
def test_a_member_left_out_of_source_does_not_exist(api):
    source = {**SOURCE, "Builder": tuple(m for m in SOURCE["Builder"] if m != "create_builder_config")}
    trt = make_standin(api, source=source)
    builder = trt.Builder(make_logger(trt))
    with pytest.raises(AttributeError, match=rf"'Builder'.*create_builder_config.*{api['version']}.*does not list"):
        builder.create_builder_config()


def test_misspelled_and_unlisted_names_raise(trt, api):
    builder = trt.Builder(make_logger(trt))
    with pytest.raises(AttributeError, match=rf"'Builder' object has no attribute 'create_netwrok'.*{api['version']}"):
        builder.create_netwrok(0)
    with pytest.raises(AttributeError, match="'Builder'.*'reset'.*does not list"):  # real, unlisted
        builder.reset()
    with pytest.raises(AttributeError, match="'DataType'.*'FP4'"):
        trt.DataType.FP4  # noqa: B018
    with pytest.raises(AttributeError, match="module 'tensorrt'.*'Dims'"):
        trt.Dims  # noqa: B018
    with pytest.raises(AttributeError):  # the implementation is not reachable either
        builder._standin_impl  # noqa: B018
    config = builder.create_builder_config()
    with pytest.raises(AttributeError, match="read-only"):
        config.num_optimization_profiles = 2
    with pytest.raises(AttributeError, match="'IBuilderConfig'.*'max_workspace_size'"):  # gone since TensorRT 10
        config.max_workspace_size = 1
    with pytest.raises(TypeError, match="No constructor"):
        trt.DataType(1)


# -- (d): calls are checked against the real signatures
def test_calls_are_checked_against_the_real_signatures(trt):
    log = make_logger(trt)
    builder = trt.Builder(log)
    profile = builder.create_optimization_profile()
    with pytest.raises(TypeError, match=r"set_shape\(self: tensorrt_bindings\.tensorrt\.IOptimizationProfile, input"):
        profile.set_shape("x", minimum=(1, 8), opt=(4, 8), max=(8, 8))
    profile.set_shape("x", min=(1, 8), opt=(4, 8), max=(8, 8))  # TensorRT's keyword names are fine
    with pytest.raises(TypeError, match=r"create_network\(self: .*flags"):
        builder.create_network(0, 1)
    config = builder.create_builder_config()
    with pytest.raises(TypeError, match="set_flag"):  # an enum parameter takes that enum only
        config.set_flag(4)
    with pytest.raises(TypeError, match="set_flag"):
        config.set_flag(trt.MemoryPoolType.WORKSPACE)
    with pytest.raises(TypeError, match="Builder.__init__"):
        trt.Builder()
    with pytest.raises(TypeError, match="OnnxParser.__init__"):  # a class-typed parameter takes that class
        trt.OnnxParser(log, log)


def test_enums_and_subclassing_follow_pybind11(trt, api, caplog):
    severity = trt.ILogger.Severity
    assert int(severity.ERROR) == 1 and int(trt.DataType.HALF) == 1 and trt.DataType.HALF.name == "HALF"
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == \
        api["classes"]["NetworkDefinitionCreationFlag"]["members"]["STRONGLY_TYPED"]
    assert {severity.ERROR: "e"}[trt.ILogger.Severity.ERROR] == "e" and severity.ERROR != severity.WARNING
    assert severity.ERROR != 1  # scoped enums: not equal to ints
    assert trt.Logger.Severity is severity and isinstance(trt.Logger(), trt.ILogger)

    class NoInit(trt.ILogger):
        def __init__(self) -> None:
            pass

    with pytest.raises(TypeError, match=r"__init__\(\) must be called"):
        NoInit()
    log = make_logger(trt)
    with pytest.raises(RuntimeError, match="pure virtual"):
        trt.ILogger.log(log, severity.ERROR, "x")
    quiet = trt.Logger(min_severity=severity.ERROR)
    with caplog.at_level("INFO", logger="tensorrt"):
        quiet.log(severity.WARNING, "dropped")
        quiet.log(severity.ERROR, "kept")
    assert [r.getMessage() for r in caplog.records] == ["kept"]
    assert quiet.min_severity is severity.ERROR


# -- (e): end to end, as the backend uses TensorRT
def test_build_and_run_match_torch(trt, models):
    engine, log, _ = build(trt, models["a"])
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "y"]
    assert engine.get_tensor_mode("x") == trt.TensorIOMode.INPUT
    assert engine.get_tensor_mode("y") == trt.TensorIOMode.OUTPUT
    assert engine.get_tensor_dtype("y") == trt.DataType.FLOAT
    assert tuple(engine.get_tensor_shape("x")) == (-1, 8) and tuple(engine.get_tensor_shape("y")) == (-1, 4)
    assert [tuple(d) for d in engine.get_tensor_profile_shape("x", 0)] == list(PROFILE)
    assert engine.num_optimization_profiles == 1 and engine.num_layers == 2 and not engine.refittable
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    assert [layer["LayerType"] for layer in info["Layers"]] == ["Gemm", "Relu"] and info["Bindings"] == ["x", "y"]
    for batch in (1, 3, 8):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(run(engine, x), models["model_a"](x).detach(), atol=1e-5, rtol=0)
    ctx = engine.create_execution_context()
    assert not ctx.set_input_shape("x", (9, 8)) and "does not satisfy" in log.errors()[-1]
    assert not ctx.set_input_shape("x", (2, 8, 1)) and not ctx.set_input_shape("x", (2, 7))
    assert not ctx.execute_async_v3(0) and "input shape" in log.errors()[-1]
    assert ctx.set_input_shape("x", (2, 8)) and tuple(ctx.get_tensor_shape("y")) == (2, 4)
    assert not ctx.execute_async_v3(0) and "address" in log.errors()[-1]
    assert not ctx.set_optimization_profile_async(1, 0) and ctx.active_optimization_profile == 0


def test_build_failures_are_none_and_logged(trt, models):
    log = make_logger(trt)
    builder = trt.Builder(log)
    config = builder.create_builder_config()
    weak = network_of(trt, builder, log, models["a"], flags=0)
    assert builder.build_serialized_network(weak, config) is None and "strongly typed" in log.errors()[-1]
    network = network_of(trt, builder, log, models["a"])
    assert builder.build_serialized_network(network, config) is None and "no optimization profile" in log.errors()[-1]
    bad = builder.create_optimization_profile()
    bad.set_shape("x", (4, 8), (1, 8), (8, 8))
    assert config.add_optimization_profile(bad) == -1
    static = builder.create_optimization_profile()
    static.set_shape("x", (1, 7), (1, 7), (1, 7))
    assert config.add_optimization_profile(static) == 0
    assert builder.build_serialized_network(network, config) is None and "does not fit" in log.errors()[-1]
    parser = trt.OnnxParser(builder.create_network(0), log)
    assert not parser.parse_from_file(str(models["ms"]))
    assert parser.num_errors == 1
    assert parser.get_error(0).desc() == "No importer registered for op: MatMulIntegerToFloat"
    assert parser.get_error(0).node() == 0 and "MatMulIntegerToFloat" in str(parser.get_error(0))
    assert not trt.OnnxParser(builder.create_network(0), log).parse_from_file(str(models["junk"]))
    assert trt.Runtime(log).deserialize_cuda_engine(b"not a plan") is None and "Serialization" in log.errors()[-1]


def test_progress_monitor_sees_phases_and_can_cancel(trt, models):
    class Monitor(trt.IProgressMonitor):
        def __init__(self, cancel_at: int | None = None) -> None:
            trt.IProgressMonitor.__init__(self)
            self.events: list[tuple] = []
            self.cancel_at = cancel_at

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            self.events.append(("start", phase_name, parent_phase, num_steps))

        def step_complete(self, phase_name, step) -> bool:
            self.events.append(("step", phase_name, step))
            return len(self.events) != self.cancel_at

        def phase_finish(self, phase_name) -> None:
            self.events.append(("finish", phase_name))

    monitor = Monitor()
    build(trt, models["a"], monitor=monitor)
    assert monitor.events[0] == ("start", "Building engine", None, 2)
    assert monitor.events[-1] == ("finish", "Building engine")
    assert ("start", "Timing layers", "Building engine", 2) in monitor.events
    cancel = Monitor(cancel_at=3)
    with pytest.raises(AssertionError, match="cancelled"):
        build(trt, models["a"], monitor=cancel)
    assert [e[0] for e in cancel.events] == ["start", "start", "step", "finish", "finish"]


def test_timing_cache_persists_across_builds(api, models):
    trt = make_standin(api)
    config = trt.Builder(make_logger(trt)).create_builder_config()
    cache = config.create_timing_cache(b"")
    build(trt, models["a"], cache=cache)
    build(trt, models["a"], cache=cache)
    data = bytes(memoryview(cache.serialize()))
    log = make_logger(trt)
    config = trt.Builder(log).create_builder_config()
    again = config.create_timing_cache(data)
    assert config.set_timing_cache(again, False) and config.get_timing_cache() is again
    assert json.loads(bytes(again.serialize())[len(behaviour.CACHE_MAGIC):])["builds"] == 2
    assert again.combine(config.create_timing_cache(data), False)
    assert config.create_timing_cache(b"garbage") is not None and log.messages[-1][0] == trt.ILogger.Severity.WARNING
    other = make_standin({**api, "version": "9.9.9"})
    foreign = other.Builder(make_logger(other)).create_builder_config().create_timing_cache(b"").serialize()
    assert not config.set_timing_cache(config.create_timing_cache(bytes(foreign)), False)
    assert config.set_timing_cache(config.create_timing_cache(bytes(foreign)), True)


def test_plans_load_in_their_own_tensorrt_version_only(api, models):
    trt = make_standin(api)
    engine, _, _ = build(trt, models["a"])
    plan = engine.serialize()
    assert isinstance(plan, bytes) and plan.nbytes == len(plan) == len(memoryview(plan))
    other = make_standin({**api, "version": "9.9.9"})
    log = make_logger(other)
    assert other.Runtime(log).deserialize_cuda_engine(plan) is None and "not compatible" in log.errors()[-1]


# -- (f): refit
def test_refit_takes_new_weights(trt, models):
    engine, log, _ = build(trt, models["a"], refit=True)
    assert engine.refittable
    refitter = trt.Refitter(engine, log)
    assert sorted(refitter.get_all_weights()) == ["0.bias", "0.weight"]
    assert sorted(refitter.get_missing_weights()) == ["0.bias", "0.weight"]
    parser = trt.OnnxParserRefitter(refitter, log)
    assert parser.refit_from_file(str(models["b"])) and refitter.get_missing_weights() == []
    assert refitter.refit_cuda_engine()
    x = torch.randn(5, 8)
    expected = models["model_b"](x).detach()
    torch.testing.assert_close(run(engine, x), expected, atol=1e-5, rtol=0)
    reloaded = trt.Runtime(log).deserialize_cuda_engine(engine.serialize())  # the refitted weights serialize
    torch.testing.assert_close(run(reloaded, x), expected, atol=1e-5, rtol=0)
    assert not parser.refit_from_file(str(models["ms"])) and parser.num_errors >= 1


def test_refit_needs_a_refittable_engine(trt, models):
    engine, log, _ = build(trt, models["a"])
    refitter = trt.Refitter(engine, log)
    trt.OnnxParserRefitter(refitter, log).refit_from_file(str(models["b"]))
    assert not refitter.refit_cuda_engine() and "REFIT" in log.errors()[-1]


# -- (g): the record
def test_record_captures_the_callers_calls(api, models):
    record: list = []
    trt = make_standin(api, record=record)
    engine, _, _ = build(trt, models["a"])
    assert ("ILogger", "__init__", 0, ()) in record
    assert ("Builder", "create_network", 1, ()) in record
    assert ("IBuilderConfig", "profiling_verbosity", "set") in record
    assert ("IOptimizationProfile", "set_shape", 4, ()) in record
    assert ("Runtime", "deserialize_cuda_engine", 1, ()) in record
    record.clear()
    engine.get_tensor_profile_shape(name="x", profile_index=0)
    assert engine.num_layers == 2
    assert record == [("ICudaEngine", "get_tensor_profile_shape", 0, ("name", "profile_index")),
                      ("ICudaEngine", "num_layers", "get")]


def test_check_call_judges_records_against_either_version(api, models):
    record: list = []
    build(make_standin(api, record=record), models["a"], refit=True)
    for major in MAJORS:
        other = real_api(major)
        assert [trt_standin.check_call(other, call) for call in set(record)] == [None] * len(set(record))
    assert "Builder.create_network" in trt_standin.check_call(api, ("Builder", "create_network", 2, ()))
    assert "matches none" in trt_standin.check_call(api, ("IOptimizationProfile", "set_shape", 1, ("minimum",)))
    assert "read-only" in trt_standin.check_call(api, ("IBuilderConfig", "num_optimization_profiles", "set"))
    assert "no method" in trt_standin.check_call(api, ("ICudaEngine", "get_binding_shape", 1, ()))
    assert trt_standin.check_call(api, ("IExecutionContext", "set_input_shape", 1, ("shape",))) is None


def test_standin_for(monkeypatch):
    monkeypatch.setattr(trt_standin.trt_bindings, "api", lambda major: None)
    assert trt_standin.standin_for(11) is None


def test_bfloat16_graphs_run(trt, tmp_path):
    """onnxruntime has no bfloat16 CPU kernels; TensorRT has: the stand-in runs them in float32."""
    import ml_dtypes
    import numpy as np

    bf16 = TensorProto.BFLOAT16
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    w = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", bf16, ["batch", 8])],
                              [helper.make_tensor_value_info("y", bf16, ["batch", 4])],
                              [onnx.numpy_helper.from_array(w.astype(ml_dtypes.bfloat16), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bf16.onnx")
    engine, _, _ = build(trt, tmp_path / "bf16.onnx")
    assert engine.get_tensor_dtype("x") == trt.DataType.BF16
    x = torch.randn(3, 8).to(torch.bfloat16)
    ctx = engine.create_execution_context()
    assert ctx.set_input_shape("x", (3, 8))
    y = torch.empty(tuple(ctx.get_tensor_shape("y")), dtype=torch.bfloat16)
    assert ctx.set_tensor_address("x", x.data_ptr()) and ctx.set_tensor_address("y", y.data_ptr())
    assert ctx.execute_async_v3(0)
    expected = torch.relu(x.float() @ torch.from_numpy(w).to(torch.bfloat16).float()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected)
