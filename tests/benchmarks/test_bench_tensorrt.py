"""``benchmarks/bench_tensorrt.py``'s plumbing on the CPU: ``--smoke`` (torch and onnxruntime; TensorRT
unavailable here) writes the JSON layout the GPU run fills, and, on the TensorRT stand-in of
``tests/engines/tensorrt`` (host memory), the TensorRT columns are filled the same way."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import bench_tensorrt
import pytest

from fastgen.engines import trt_lib

LABELS = {"tensorrt", "tensorrt_cuda_graphs", "torch", "torch_cuda_graphs", "onnxruntime"}
RATIO_KEYS = {f"{a}/{b}" for a, b in bench_tensorrt.RATIOS}


def _errors(node, path="") -> list[str]:
    """Every recorded error in the result, with where it is."""
    if isinstance(node, dict):
        found = [f"{path}: {node['error']}"] if "error" in node else []
        return found + [e for k, v in node.items() for e in _errors(v, f"{path}/{k}")]
    return []


def _run(tmp: Path, cache: Path, *extra: str) -> dict:
    out = tmp / "result.json"
    rc = bench_tensorrt.main(["--smoke", "--components", "unet", "--cache", str(cache), "--json", str(out), *extra])
    assert rc == 0
    assert not list(tmp.glob(".result.json.*"))  # written atomically: no temporary left behind
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One engine cache for the module: the stand-in run finds the torch and onnxruntime engines built."""
    return tmp_path_factory.mktemp("bench-tensorrt-cache")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache) -> dict:
    return _run(tmp_path_factory.mktemp("bench-tensorrt"), cache, "--pipeline", "on", "--steps", "2")


def test_smoke_header(smoke):
    assert smoke["benchmark"] == "tensorrt" and smoke["device"].startswith("CPU: ")
    datetime.date.fromisoformat(smoke["date"])
    assert {"fastgen", "torch", "onnxruntime", "onnx", "tensorrt", "python"} <= set(smoke["versions"])
    assert smoke["devices"] == {"tensorrt": "cuda", "torch": "cpu", "onnxruntime": "cpu"}
    settings = smoke["settings"]
    assert settings["smoke"] is True and settings["precision"] == "fp32" and settings["verify"] == "opt"
    assert settings["tensorrt_options"]["optimization_level"] == 3
    assert "plumbing" in smoke["note"]


@pytest.mark.skipif(trt_lib.installed(), reason="TensorRT is installed here")
def test_tensorrt_is_marked_unavailable_everywhere(smoke):
    assert smoke["tensorrt"].startswith("unavailable: backend 'tensorrt' needs NVIDIA TensorRT")
    entry = smoke["presets"]["tiny"]["unet"]
    for value in (entry["tensorrt"], entry["parity"]["tensorrt"], entry["latency_ms"]["tensorrt"],
                  entry["latency_ms"]["tensorrt_cuda_graphs"]):
        assert value == smoke["tensorrt"]
    assert smoke["versions"]["tensorrt"] == "unavailable"


def test_smoke_component_entry(smoke):
    assert list(smoke["presets"]) == ["tiny"] and list(smoke["presets"]["tiny"]) == ["unet"]
    entry = smoke["presets"]["tiny"]["unet"]
    assert entry["shape"] == {"batch": 2, "height": 64, "width": 64, "seq": 77}  # tiny: the profile's opt
    assert entry["profile_override"] is None and entry["seconds"] > 0
    assert set(entry["latency_ms"]) == LABELS
    for label in ("torch", "onnxruntime"):
        lat = entry["latency_ms"][label]
        assert lat["device"] == "cpu" and lat["timer"] == "perf_counter" and lat["iters"] >= 1
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert entry["builds"][label]["precision"] == "fp32"
    for label in ("torch_cuda_graphs", "tensorrt_cuda_graphs"):
        assert isinstance(entry["latency_ms"][label], str)  # skipped (cpu) or unavailable
    assert entry["builds"]["torch_fp32_reference"]["device"] == "cpu"
    # onnxruntime fp32 against the torch fp32 module
    assert entry["parity"]["onnxruntime"]["cosine"] > 0.9999 and entry["parity"]["onnxruntime"]["max_rel"] < 1e-3
    # torch at fp32 is the reference's own module, on the thread count its engine chose (the last bits
    # of a reduction may differ from the reference's count)
    assert entry["parity"]["torch"]["max_abs"] < 1e-4
    assert set(entry["parity"]["onnxruntime"]["outputs"]) == {"noise_pred"}
    ratios = entry["ratios"]
    assert set(ratios) == RATIO_KEYS
    assert ratios["onnxruntime/torch"] == pytest.approx(
        entry["latency_ms"]["onnxruntime"]["median"] / entry["latency_ms"]["torch"]["median"], rel=1e-3)
    assert ratios["torch/tensorrt"] is None  # no TensorRT here: the column is there, empty
    assert _errors(smoke) == []


def test_smoke_pipeline(smoke):
    pipe = smoke["pipeline"]["tiny"]
    assert pipe["reference"] == "torch" and pipe["candidate"] == "onnxruntime" and pipe["steps"] == 2
    for backend in ("onnxruntime", "torch"):
        row = pipe["backends"][backend]
        assert row["seconds"] > 0 and row["runs"] == 1 and row["unet_step_ms"] > 0 and row["setup_seconds"] >= 0
    assert pipe["ratios"]["torch/onnxruntime"] > 0
    assert pipe["psnr_db"]["onnxruntime_vs_torch"] > 40  # fp32 onnxruntime reproduces torch's image


def test_bad_component_is_refused():
    with pytest.raises(SystemExit) as info:
        bench_tensorrt.main(["--smoke", "--components", "unet,vae"])
    assert info.value.code == 2


def test_ratios_and_parity_helpers():
    import torch

    lat = {"tensorrt": {"median": 2.0}, "torch": {"median": 3.0}, "torch_cuda_graphs": {"error": "x"},
           "onnxruntime": "skipped: sd15"}
    assert bench_tensorrt.ratios(lat) == {"torch/tensorrt": 1.5, "torch_cuda_graphs/tensorrt": None,
                                          "torch_cuda_graphs/tensorrt_cuda_graphs": None,
                                          "onnxruntime/tensorrt": None, "onnxruntime/torch": None}
    ref = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([4.0])}
    got = bench_tensorrt.parity(ref, {"a": torch.tensor([1.0, -2.2]), "b": torch.tensor([4.0])})
    assert got["max_abs"] == pytest.approx(0.2) and got["max_rel"] == pytest.approx(0.1)
    assert got["cosine"] < 1 and got["outputs"]["b"]["max_abs"] == 0


def test_tensorrt_columns_on_a_standin(tmp_path, cache, smoke):
    """The TensorRT path (build record, timing cache, parity, latency, ratios) on the host-memory stand-in."""
    here = Path(__file__).resolve().parents[1] / "engines" / "tensorrt"
    sys.path.insert(0, str(here))
    try:
        import trt_bindings
        import trt_standin
    finally:
        sys.path.remove(str(here))
    api = trt_bindings.api(11)
    if api is None:
        pytest.skip("TensorRT 11 bindings not installed (make install)")
    trt_lib.use(trt_standin.make_standin(api), host_memory=True)
    try:
        result = _run(tmp_path, cache, "--pipeline", "off")
    finally:
        trt_lib.use(None)
    assert result["tensorrt"] == "available (host-memory stand-in)" and result["devices"]["tensorrt"] == "cpu"
    entry = result["presets"]["tiny"]["unet"]
    build = entry["tensorrt"]
    assert build["build_seconds"] > 0 and build["engine_cache_hit"] is False and build["precision"] == "fp32"
    assert isinstance(build["timing_cache_warm"], bool) and build["settings"]["optimization_level"] == 3
    assert entry["parity"]["tensorrt"]["cosine"] > 0.9999
    assert entry["latency_ms"]["tensorrt"]["median"] > 0
    assert entry["ratios"]["torch/tensorrt"] > 0 and entry["ratios"]["onnxruntime/tensorrt"] > 0
    assert entry["builds"]["torch"]["engine_cache_hit"] and entry["builds"]["onnxruntime"]["engine_cache_hit"]
    assert result["pipeline"] == {} and _errors(result) == []
