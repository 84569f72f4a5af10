"""The fastgen CLI through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def fastgen(*args: str, cwd=None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {}), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fastgen.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_on_every_command():
    for cmd in ([], ["export"], ["build"], ["inspect"], ["bench"], ["demo"], ["generate"], ["score"], ["cache"]):
        proc = fastgen(*cmd, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_export_build_inspect_bench(tmp_path):
    proc = fastgen("export", "tiny", "--component", "text-encoder", "--out", str(tmp_path / "te"), "--verify", "opt")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "te" / "model.onnx").exists()

    proc = fastgen("build", "tiny", "-c", "classifier", "--backend", "onnxruntime", "--device", "cpu",
                   "--profile", "batch=1:2:4", "--out", str(tmp_path / "eng"), "--verify", "opt")
    assert proc.returncode == 0, proc.stderr
    again = fastgen("build", "tiny", "-c", "classifier", "--device", "cpu", "--profile", "batch=1:2:4",
                    "--out", str(tmp_path / "eng"), "--verify", "opt")
    assert again.returncode == 0 and "cache hit" in again.stdout

    info = json.loads(fastgen("inspect", str(tmp_path / "eng"), "--json").stdout)
    assert info["backend"] == "onnxruntime" and info["precision"] == "fp32"
    assert [t["name"] for t in info["inputs"]] == ["pixel_values"] and len(info["cache_key"]) == 64
    assert info["profile"]["batch"] == {"min": 1, "opt": 2, "max": 4} and info["built_at"]
    table = fastgen("inspect", str(tmp_path / "eng"))
    assert table.returncode == 0 and "pixel_values" in table.stdout and "logits" in table.stdout
    onnx_info = json.loads(fastgen("inspect", str(tmp_path / "te" / "model.onnx"), "--json").stdout)
    assert [t["name"] for t in onnx_info["inputs"]] == ["input_ids"]

    bench = fastgen("bench", str(tmp_path / "eng"), "--batch", "1,3", "--iters", "3", "--json")
    assert bench.returncode == 0, bench.stderr
    rows = json.loads(bench.stdout)["results"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["p50_ms"] <= r["p99_ms"] for r in rows)
    table = fastgen("bench", str(tmp_path / "te" / "model.onnx"), "--batch", "2", "--iters", "2")
    assert table.returncode == 0 and "items/s" in table.stdout, table.stderr


@pytest.mark.parametrize("args,needles", [
    (["export", "/no/such/model", "-c", "unet", "--out", "x"], ["/no/such/model"]),
    (["export", "runwayml/stable-diffusion-v1-5", "-c", "unet", "--out", "x"], ["hub"]),
    (["export", "tiny", "-c", "tail", "--out", "x"], ["component", "unet"]),
    (["export", "tiny", "-c", "unet", "--out", "x", "--profile", "batch=1:x:3"], ["profile", "MIN:OPT:MAX"]),
    (["export", "tiny", "-c", "unet", "--out", "x", "--profile", "batch=4:2:1"], ["profile", "min <= opt <= max"]),
    (["export", "tiny", "-c", "unet", "--out", "x", "--profile", "frames=1:2:3"], ["profile", "batch"]),
    (["export", "tiny", "-c", "unet", "--out", "x", "--opset", "9"], ["opset", "17"]),
    (["build", "tiny", "-c", "unet", "--backend", "tvm"], ["--backend", "onnxruntime"]),
    (["build", "tiny", "-c", "unet", "--backend", "tensorrt"], ["tensorrt"]),
    (["build", "tiny", "-c", "unet", "--precision", "bf16", "--device", "cpu"], ["bf16"]),
    (["build", "tiny", "-c", "unet", "--quantization", "int3"], ["--quantization", "w8a8-dynamic"]),
    (["build", "tiny", "-c", "unet", "--quantization", "w8a8-dynamic", "--precision", "fp16", "--device", "cpu"],
     ["quantized", "fp32"]),
    (["inspect", "/no/such/engine"], ["engine", "no such file"]),
    (["bench", "/no/such/engine"], ["engine"]),
    (["export", "tiny"], ["--out"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needles):
    assert_one_line_error(fastgen(*args, cwd=tmp_path), *needles)
    assert not (tmp_path / "x").exists()


def test_bench_bad_batch(tmp_path):
    fastgen("build", "tiny", "-c", "classifier", "--device", "cpu", "--out", str(tmp_path / "e"), "--verify", "none")
    assert_one_line_error(fastgen("bench", str(tmp_path / "e"), "--batch", "0,x"), "batch")
    assert_one_line_error(fastgen("bench", str(tmp_path / "e"), "--shape", "frames=3"), "shape")


def test_demo_main_job(tmp_path):
    env = {"FASTGEN_CACHE_DIR": str(tmp_path / "cache")}
    proc = fastgen("demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--candidates", "2", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [b["backend"] for b in summary["backends"]] == ["torch", "onnxruntime"]
    assert summary["psnr_torch_vs_onnxruntime_db"] > 60  # the two backends make the same images
    pngs = sorted(p.name for p in (tmp_path / "demo").glob("*.png"))
    assert len(pngs) == 2 * len(summary["prompts"]) and pngs == sorted(summary["files"])
    for backend in summary["backends"]:
        assert len(backend["best"]) == len(summary["prompts"]) and len(backend["image_scores"]) == len(summary["prompts"])
        assert backend["unet_step_ms"] > 0 and backend["vae_decode_ms"] > 0
    warm = fastgen("demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--candidates", "2", env_extra=env)
    assert warm.returncode == 0, warm.stderr
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["total_seconds"] > 0


def test_build_all_components_into_one_folder(tmp_path):
    proc = fastgen("build", "tiny", "-c", "all", "--device", "cpu", "--verify", "none", "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    built = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert built == sorted(["unet", "vae-decoder", "vae-encoder", "text-encoder", "classifier", "text-classifier"])
    assert all((tmp_path / "p" / name / "manifest.json").exists() for name in built)
    assert (tmp_path / "p" / "text-encoder" / "tokenizer").is_dir()
    assert_one_line_error(fastgen("build", "tiny", "-c", "all"), "out")


def test_cache_commands(tmp_path):
    env = {"FASTGEN_CACHE_DIR": str(tmp_path / "cache")}
    assert fastgen("build", "tiny", "-c", "classifier", "--device", "cpu", "--verify", "none", env_extra=env).returncode == 0
    listing = json.loads(fastgen("cache", "list", "--json", env_extra=env).stdout)
    assert len(listing["entries"]) == 1 and listing["entries"][0]["component"] == "classifier"
    entry = listing["entries"][0]["path"]
    (tmp_path / "cache" / entry / "model.onnx").write_bytes(b"truncated")
    assert "0 intact, 1 damaged" in fastgen("cache", "verify", env_extra=env).stdout  # reports, deletes nothing
    assert (tmp_path / "cache" / entry).is_dir()
    assert "1 removed" in fastgen("cache", "verify", "--repair", env_extra=env).stdout
    assert "removed 0 entries" in fastgen("cache", "clear", env_extra=env).stdout


def test_build_inspect_and_score_quantized(tmp_path):
    proc = fastgen("build", "tiny", "-c", "text-classifier", "--device", "cpu", "--quantization", "w8a8-dynamic",
                   "--verify", "opt", "--out", str(tmp_path / "tc"))
    assert proc.returncode == 0, proc.stderr
    assert "quantization: w8a8-dynamic" in proc.stdout
    info = json.loads(fastgen("inspect", str(tmp_path / "tc"), "--json").stdout)
    assert info["quantization"].startswith("w8a8-dynamic: ")
    scored = fastgen("score", "--model", str(tmp_path / "tc"), "--text", "Buy now!", "--json")
    assert scored.returncode == 0, scored.stderr
    refused = fastgen("score", "--model", str(tmp_path / "tc"), "--text", "x", "--quantization", "int8-weight-only")
    assert_one_line_error(refused, "quantization", "built engine")


def test_generate_then_score(tmp_path):
    out = tmp_path / "gen"
    proc = fastgen("generate", "--model", "tiny", "--prompt", "a red car", "--prompt", "a blue shoe", "-n", "2",
                   "--steps", "3", "--seed", "7", "--backend", "onnxruntime", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and results["seeds"] == [7, 8, 7, 8]
    scored = fastgen("score", "--model", "tiny", *map(str, pngs), "--json")
    assert scored.returncode == 0, scored.stderr
    rows = json.loads(scored.stdout)
    assert len(rows["results"] if isinstance(rows, dict) else rows) == 4
    img2img = fastgen("generate", "--model", "tiny", "--prompt", "a red car", "--image", str(pngs[0]), "--strength",
                      "0.5", "--steps", "4", "--seed", "1", "--out", str(tmp_path / "i2i"))
    assert img2img.returncode == 0, img2img.stderr
    assert len(list((tmp_path / "i2i").glob("*.png"))) == 1


@pytest.mark.parametrize("args,needles", [
    (["--steps", "0"], ["steps"]),
    (["--strength", "1.5", "--image", "x.png"], ["strength"]),
    (["--scheduler", "heun2"], ["scheduler", "euler"]),
    (["--image", "/no/such.png"], ["/no/such.png"]),
    (["--height", "72"], ["height"]),
])
def test_generate_bad_input(tmp_path, args, needles):
    proc = fastgen("generate", "--model", "tiny", "--prompt", "p", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
