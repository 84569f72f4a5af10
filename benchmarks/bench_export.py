"""Export time per component, and ONNX Runtime vs PyTorch latency of the UNet, side by side.

    python benchmarks/bench_export.py --preset tiny
    python benchmarks/bench_export.py --preset sd15 --components unet,vae-decoder,text-encoder \
        --profile batch=1:1:2,height=256:256:512,width=256:256:512 --iters 3

For each component: export to ONNX (with the verification the config asks for), then time the torch
engine (eager, the baseline a user would pick) and the onnxruntime engine at the profile's opt shape
in the same process. Writes JSON to benchmarks/results/ naming the device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastgen
from fastgen.engines.bench import benchmark
from fastgen.engines.build import build
from fastgen.engines.cache import EngineCache
from fastgen.export import ExportConfig
from fastgen.export.verify import compare
from fastgen.models import load_component, model_components


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--components", default="", help="comma-separated; default: all of the preset")
    ap.add_argument("--profile", default=None, help="profile overrides applied to every component that has the dims")
    ap.add_argument("--verify", default="profile", choices=["none", "opt", "profile"])
    ap.add_argument("--time", default="unet", help="components to time torch vs onnxruntime (comma-separated, or 'all')")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/export_<preset>_<device>.json)")
    args = ap.parse_args()

    names = [c for c in args.components.split(",") if c] or model_components(args.preset)
    timed = set(model_components(args.preset) if args.time == "all" else args.time.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-") as tmp:
        cache = EngineCache(Path(tmp) / "cache")
        for name in names:
            t0 = time.perf_counter()
            comp = load_component(args.preset, name)
            load_s = time.perf_counter() - t0
            if args.profile:
                known = {k: v for k, v in fastgen.ShapeProfile.parse(args.profile).dims.items() if k in comp.spec.symbols}
                comp = comp.__class__(**{**comp.__dict__, "spec": comp.spec.with_profile(fastgen.ShapeProfile(known))})
            params = sum(p.numel() for p in comp.model.parameters())
            row = {"component": name, "params": params, "load_seconds": load_s,
                   "opt_shape": comp.spec.profile.shape("opt")}
            engine = build(comp, backend="onnxruntime", device="cpu", cache=cache,
                           export=ExportConfig(verify=args.verify))
            stats = engine.manifest["export"]["stats"]
            row.update(export_seconds=stats["export_seconds"], cleanup_seconds=stats["cleanup_seconds"],
                       verify_seconds=stats["verify_seconds"], build_seconds=engine.manifest["build_seconds"],
                       nodes=stats["nodes"], nodes_exported=stats["nodes_exported"],
                       weight_bytes=stats["weight_bytes"], external_data=stats["external_data"])
            print(f"{name}: {params / 1e6:.1f} M params, export {stats['export_seconds']:.1f} s, "
                  f"clean-up {stats['cleanup_seconds']:.1f} s, verify {stats['verify_seconds']:.1f} s", flush=True)
            if name in timed:
                torch_engine = build(comp, backend="torch", device="cpu", cache=cache)
                inputs = comp.spec.sample_inputs("opt", seed=7)
                ref, got = torch_engine(inputs), engine(inputs)
                row["cosine"] = min(compare(ref[k], got[k])["cosine"] for k in ref)
                batch = [comp.spec.profile.dims["batch"].opt] if "batch" in comp.spec.profile.dims else [1]
                for label, eng in (("torch", torch_engine), ("onnxruntime", engine)):
                    res = benchmark(eng, batches=batch, warmup=1, iters=args.iters)[0]
                    row[f"{label}_p50_ms"] = res.p50_ms
                    row[f"{label}_mean_ms"] = res.mean_ms
                row["ort_speedup"] = row["torch_p50_ms"] / row["onnxruntime_p50_ms"]
                print(f"  torch p50 {row['torch_p50_ms']:.1f} ms, onnxruntime p50 {row['onnxruntime_p50_ms']:.1f} ms "
                      f"({row['ort_speedup']:.2f}x), cosine {row['cosine']:.6f}", flush=True)
                del torch_engine
            rows.append(row)
            del engine, comp
            gc.collect()
    import onnxruntime

    result = {
        "benchmark": "export", "preset": args.preset, "profile_overrides": args.profile, "verify": args.verify,
        "device": f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(),
        "versions": {"fastgen": fastgen.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv), "components": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"export_{args.preset}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
