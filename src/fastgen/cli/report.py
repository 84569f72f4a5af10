"""Tables the CLI prints (rich), and the engine description behind ``fastgen inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from fastgen.cli.options import printable
from fastgen.errors import CacheCorruptionError, FastgenError, InvalidArgumentError


def _shape(shape: list) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _worst(verification: list[dict]) -> tuple[float, float]:
    rel = max((o["max_rel"] for v in verification for o in v["outputs"].values()), default=0.0)
    cos = min((o["cosine"] for v in verification for o in v["outputs"].values()), default=1.0)
    return rel, cos


def export_summary(console, result) -> None:
    stats = result.stats
    table = Table(title=f"exported {result.component.spec.component} -> {result.directory}")
    for col in ("exporter", "opset", "export s", "clean-up s", "nodes", "weights MB", "verified shapes",
                "worst rel err", "min cosine"):
        table.add_column(col)
    rel, cos = _worst(result.verification)
    table.add_row(stats["exporter"], str(stats["opset"]), f"{stats['export_seconds']:.2f}",
                  f"{stats['cleanup_seconds']:.2f}", f"{stats['nodes_exported']} -> {stats['nodes']}",
                  f"{stats['weight_bytes'] / 1e6:.1f}", str(len(result.verification)),
                  f"{rel:.2e}", f"{cos:.6f}")
    console.print(table)


def build_summary(console, engine) -> None:
    info = engine.describe()
    hit = getattr(engine, "cache_hit", False)
    console.print(f"[bold]{info['component']}[/] engine ({info['backend']}/{info['precision']} on {info['device']}): "
                  f"{'cache hit' if hit else 'built'} in {info.get('build_seconds') or 0:.1f} s")
    console.print(f"  path: {info['path']}")
    if info.get("quantization"):
        console.print(f"  quantization: {info['quantization']}")
    console.print(f"  cache key: {info['cache_key']}")


def describe_path(path: str) -> dict[str, Any]:
    """Describe an engine directory (from its verified manifest) or an .onnx file, without loading it."""
    p = Path(path)
    if not p.exists():
        raise InvalidArgumentError("engine", printable(path), reason="no such file or directory")
    if p.is_file() and p.suffix.lower() == ".onnx":
        import onnx

        from fastgen.engines.onnx_io import onnx_precision, spec_from_onnx

        try:
            # Only the graph (no external weights); a truncated or foreign file fails to parse here.
            model = onnx.load(str(p), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends: the file, not fastgen
            raise InvalidArgumentError("engine", printable(p), reason=f"not a readable ONNX file ({exc})") from None
        try:
            spec = spec_from_onnx(model)
        except FastgenError as exc:  # parsed, but not a graph fastgen can describe: name the file
            raise InvalidArgumentError("engine", printable(p), reason=str(exc)) from None
        return {"path": str(p.absolute()), "backend": "onnx file", "precision": onnx_precision(model),
                "component": spec.component, "model_type": model.producer_name or "",
                "inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs],
                "profile": spec.profile.to_dict(), "opset": max((o.version for o in model.opset_import), default=None),
                "nodes": len(model.graph.node), "cache_key": None, "built_at": None}
    if p.is_dir() and (p / "manifest.json").exists():
        from fastgen.engines.base import quantization_summary
        from fastgen.engines.cache import REBUILD_HINT, verify_dir
        from fastgen.models.spec import ExportSpec

        manifest = verify_dir(p, check="size")
        try:  # the manifest is JSON anyone can edit: its spec is read as a spec, not trusted as a dict
            spec = ExportSpec.from_dict(manifest["spec"]).to_dict()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CacheCorruptionError(f"{printable(p / 'manifest.json')}: the engine's spec is damaged "
                                       f"({type(exc).__name__}: {exc}); {REBUILD_HINT}") from None
        return {"path": str(p.absolute()), "backend": manifest.get("backend"), "precision": manifest.get("precision"),
                "device": manifest.get("device"), "component": spec.get("component"),
                "model_type": spec.get("model_type"), "inputs": spec.get("inputs", []),
                "outputs": spec.get("outputs", []), "profile": spec.get("profile", {}),
                "cache_key": manifest.get("cache_key"), "built_at": manifest.get("built_at"),
                "build_seconds": manifest.get("build_seconds"), "fastgen_version": manifest.get("fastgen_version"),
                "backend_version": manifest.get("backend_version"), "origin": manifest.get("origin"),
                "quantization": quantization_summary(manifest), "artifacts": manifest.get("artifacts", {}),
                **_tensorrt_info(p, manifest)}
    onnx_files = sorted(p.glob("*.onnx")) if p.is_dir() else []
    if len(onnx_files) == 1:
        return describe_path(str(onnx_files[0]))
    raise InvalidArgumentError("engine", path, reason="not an .onnx file or an engine directory")


def _tensorrt_info(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """A TensorRT engine's profiles, builder settings, IO tensors and layers (recorded at build time,
    by TensorRT's engine inspector, so they show on machines without TensorRT)."""
    record = manifest.get("tensorrt")
    if not isinstance(record, dict):
        return {}
    info: dict[str, Any] = {"tensorrt": {"settings": record.get("settings"), "profiles": record.get("profiles"),
                                         "refitted_from": record.get("refitted_from")}}
    engine_info = directory / "engine_info.json"
    if engine_info.is_file():
        try:
            data = json.loads(engine_info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        info["tensorrt"].update({k: data.get(k) for k in ("io", "num_layers", "device_memory_bytes", "layers")})
    return info


def _tensorrt_tables(console, trt: dict[str, Any]) -> None:
    settings = Table(show_header=False, title="TensorRT")
    recorded = trt.get("settings")
    for key, value in (recorded if isinstance(recorded, dict) else {}).items():
        settings.add_row(key, str(value))
    for key in ("num_layers", "device_memory_bytes", "refitted_from"):
        if trt.get(key) is not None:
            settings.add_row(key, str(trt[key]))
    console.print(settings)
    profiles = Table(title="optimization profiles")
    for col in ("#", "input", "min", "opt", "max"):
        profiles.add_column(col)
    for entry in trt.get("io") if isinstance(trt.get("io"), list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("profiles") or [], list):
            continue  # recorded by the build; a damaged record is shown as far as it reads
        for index, shapes in enumerate(entry.get("profiles") or []):
            if isinstance(shapes, list) and len(shapes) == 3 and all(isinstance(x, list) for x in shapes):
                profiles.add_row(str(index), str(entry.get("name")), *(_shape(x) for x in shapes))
    console.print(profiles)
    layers = trt.get("layers") if isinstance(trt.get("layers"), list) else []
    if layers:
        table = Table(title=f"layers ({len(layers)})")
        for col in ("name", "type"):
            table.add_column(col)
        for layer in layers[:40]:
            if isinstance(layer, dict):
                table.add_row(str(layer.get("Name", "")), str(layer.get("LayerType", "")))
            else:
                table.add_row(str(layer), "")
        console.print(table)


def inspect_tables(console, info: dict[str, Any]) -> None:
    head = Table(show_header=False, title=printable(info["path"]))
    for key in ("component", "model_type", "backend", "precision", "quantization", "device", "opset", "nodes",
                "cache_key",
                "built_at", "build_seconds", "fastgen_version", "backend_version", "origin"):
        if info.get(key) not in (None, ""):
            value = info[key]
            timed = key == "build_seconds" and isinstance(value, (int, float))
            head.add_row(key, f"{value:.2f} s" if timed else printable(value))
    console.print(head)
    io = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for t in info.get(kind, []):
            io.add_row(kind[:-1], t["name"], t["dtype"], _shape(t["shape"]))
    console.print(io)
    if info.get("profile"):
        prof = Table(title="shape profile")
        for col in ("dim", "min", "opt", "max"):
            prof.add_column(col)
        for name, rng in info["profile"].items():
            prof.add_row(name, str(rng["min"]), str(rng["opt"]), str(rng["max"]))
        console.print(prof)
    if info.get("tensorrt"):
        _tensorrt_tables(console, info["tensorrt"])


def bench_table(console, engine, rows: list[dict]) -> None:
    table = Table(title=f"{engine.spec.component} ({engine.backend}/{engine.precision} on {engine.device})")
    for col in ("batch", "shape", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s"):
        table.add_column(col, justify="right")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items() if k != "batch")
        table.add_row(str(r["batch"]), shape, f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['mean_ms']:.2f}", f"{r['throughput']:.1f}")
    console.print(table)
