"""TensorRT against the torch and onnxruntime backends, per component and (sd15) end to end.

    python benchmarks/bench_tensorrt.py --smoke --json /tmp/trt_smoke.json    # CPU: the plumbing only
    python benchmarks/bench_tensorrt.py --presets tiny --json benchmarks/results/tensorrt_tiny_cuda.json
    python benchmarks/bench_tensorrt.py --presets sd15 --components unet --pipeline off --verify none --json ...
    python benchmarks/bench_tensorrt.py --presets sd15 --pipeline only --verify none --json ...

Per component at one shape (sd15: UNet batch 2 (CFG) 512x512, VAE decoder batch 1 512x512, text encoder
batch 1 seq 77, built with the pipeline's profile so the pipeline's engines are cache hits; tiny: its
profile's opt): the TensorRT build (seconds, engine-cache hit, timing cache warm or not); parity of each
engine against the torch fp32 module (max abs / rel error, cosine); latency median / p90 (CUDA events after
warm-up) of TensorRT, torch (--precision) each with and without CUDA graphs, and onnxruntime (fp32; a CPU
build is marked cpu, sd15 only with --ort-sd15); the ratios side by side. --pipeline: sd15's Generator on
tensorrt against torch, 50 steps at 512x512: seconds and the PSNR between the images. Every step records
its error and the run goes on; without TensorRT each entry says "tensorrt": "unavailable: <why>", torch is
still timed, exit 0. --smoke: tiny on the CPU, torch and onnxruntime only. JSON is rewritten atomically
after every component.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastgen
from fastgen.core.fs import write_json_atomic
from fastgen.engines import trt_lib
from fastgen.export.verify import compare

RESULTS = Path(__file__).resolve().parent / "results"
COMPONENTS = ("unet", "vae-decoder", "text-encoder")
#: sd15: the pipeline's profile (each component takes the dims it has), so its engines are cache hits.
PROFILES = {"sd15": "batch=1:2:2,height=512,width=512"}
SHAPES = {"sd15": {"unet": {"batch": 2, "height": 512, "width": 512, "seq": 77},
                   "vae-decoder": {"batch": 1, "height": 512, "width": 512},
                   "text-encoder": {"batch": 1, "seq": 77}}}
PIPELINE_SIZE = {"sd15": 512}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
RATIOS = (("torch", "tensorrt"), ("torch_cuda_graphs", "tensorrt"), ("torch_cuda_graphs", "tensorrt_cuda_graphs"),
          ("onnxruntime", "tensorrt"), ("onnxruntime", "torch"))


def error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}".strip()[:2000]}


def release(*engines: Any) -> None:
    for engine in engines:
        with contextlib.suppress(Exception):
            if engine is not None:
                engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.machine()} ({torch.get_num_threads()} threads)"


def tensorrt_status(smoke: bool) -> tuple[bool, str]:
    """(available, "available" / "unavailable: <the backend's own message>" / "skipped: ...").

    --smoke runs TensorRT only on a host-memory stand-in installed in-process (``trt_lib.use``, the tests)."""
    from fastgen.engines.registry import get_backend

    message = get_backend("tensorrt").unavailable_message()
    if message is not None:
        return False, f"unavailable: {message}"
    if trt_lib.host_memory():
        return True, "available (host-memory stand-in)"
    return (False, "skipped: --smoke runs no TensorRT") if smoke else (True, "available")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"fastgen": fastgen.__version__, "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("onnxruntime", "onnx", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            out[name] = None
    try:
        out["tensorrt"] = trt_lib.version() if trt_lib.installed() else "unavailable"
    except Exception as exc:  # noqa: BLE001 - e.g. a wheel whose CUDA libraries fail to load
        out["tensorrt"] = f"unavailable: {exc}"
    return out


def ort_device(smoke: bool) -> str:
    import onnxruntime

    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()
    return "cuda" if gpu and not smoke else "cpu"


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """Per-call latency: CUDA events on a GPU (after ``warmup`` calls), perf_counter on the CPU."""
    from bench_quant import call_times_ms

    cuda = device.type == "cuda"
    times = call_times_ms(fn, warmup, iters, cuda)
    return {"median": round(statistics.median(times), 4), "p90": round(float(np.percentile(times, 90)), 4),
            "min": round(min(times), 4), "iters": iters, "warmup": warmup, "device": device.type,
            "timer": "cuda-events" if cuda else "perf_counter"}


def parity(reference: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per output and worst over outputs: max abs / max rel (to the reference's largest magnitude) / cosine."""
    per = {name: compare(ref.float().cpu(), outputs[name].float().cpu()) for name, ref in reference.items()}
    return {"max_abs": max(p["max_abs"] for p in per.values()), "max_rel": max(p["max_rel"] for p in per.values()),
            "cosine": min(p["cosine"] for p in per.values()), "outputs": per}


def ratios(latency: dict[str, Any]) -> dict[str, float | None]:
    """``a/b``: a's median over b's (above 1: b is faster); None where either was not measured."""
    med = {k: v["median"] for k, v in latency.items() if isinstance(v, dict) and "median" in v}
    return {f"{a}/{b}": float(f"{med[a] / med[b]:.4g}") if a in med and b in med and med[b] > 0 else None
            for a, b in RATIOS}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.device = "cpu" if self.smoke else "cuda"
        self.precision = "fp32" if self.smoke else args.precision
        self.trt_ok, self.trt_status = tensorrt_status(self.smoke)
        self.trt_device = "cpu" if trt_lib.host_memory() else "cuda"
        self.ort_device = ort_device(self.smoke)
        self.cache = fastgen.EngineCache(args.cache) if args.cache else None
        cleanup = args.cleanup if args.cleanup != "auto" else (
            "onnxslim" if importlib.util.find_spec("onnxslim") is not None else "none")
        self.export = fastgen.ExportConfig(verify=args.verify, cleanup=cleanup)
        self.trt_options = fastgen.TensorRTOptions(optimization_level=args.trt_opt_level,
                                                   workspace_gib=args.workspace_gib, timing_cache=args.timing_cache)
        self.warmup = args.warmup if args.warmup is not None else (1 if self.smoke else 10)
        self.iters = args.iters if args.iters is not None else (3 if self.smoke else 50)
        self.pipeline_iters = args.pipeline_iters or (1 if self.smoke else 3)
        self.checkpoint: Callable[[], None] = lambda: None  # main's save of the whole result

    def build(self, comp, profile: str | None, **config: Any):
        t0 = time.perf_counter()
        engine = fastgen.build(comp, profile=profile, export=self.export, cache=self.cache,
                               progress=self.args.progress, **config)
        hit = bool(getattr(engine, "cache_hit", False))
        return engine, {"seconds": round(time.perf_counter() - t0, 2), "engine_cache_hit": hit,
                        "device": str(engine.device), "precision": engine.precision}

    def timing_cache_warm(self) -> bool | None:
        if not self.trt_options.timing_cache:
            return None
        from fastgen.engines.device import device_fingerprint
        from fastgen.engines.trt_build import timing_cache_path

        return timing_cache_path(device_fingerprint(torch.device(self.trt_device)), trt_lib.version()).is_file()

    def contender(self, entry: dict, label: str, make, feeds_of, ref: dict | None, *, graphs: bool,
                  warmup: int | None = None, iters: int | None = None) -> None:
        """Build ``label``'s engine, check it against ``ref``, time it; then its CUDA-graph twin if ``graphs``."""
        engine = twin = None
        try:
            engine, info = make()
            entry["builds"][label] = info
            feeds = feeds_of(engine)
            out = engine.run(feeds)
            if ref is not None:
                entry["parity"][label] = parity(ref, out)
            entry["latency_ms"][label] = time_ms(lambda: engine.run(feeds), engine.device, warmup or self.warmup,
                                                 iters or self.iters)
        except Exception as exc:  # noqa: BLE001 - record and go on
            entry["latency_ms"][label] = error(exc)
            logging.getLogger(__name__).warning("%s: %s", label, entry["latency_ms"][label]["error"][:300])
        if graphs:
            name = f"{label}_cuda_graphs"
            if engine is None or engine.device.type != "cuda":
                entry["latency_ms"][name] = ("skipped: CUDA graphs need a CUDA device" if self.device == "cpu"
                                             else entry["latency_ms"][label])
            else:
                try:
                    twin = fastgen.load_engine(engine.path, device=str(engine.device), verify="size",
                                               execution=fastgen.ExecutionOptions(cuda_graphs=True))
                    out = twin.run(feeds)
                    if ref is not None:
                        entry["parity"][name] = parity(ref, out)
                    entry["latency_ms"][name] = time_ms(lambda: twin.run(feeds), twin.device, self.warmup, self.iters)
                except Exception as exc:  # noqa: BLE001
                    entry["latency_ms"][name] = error(exc)
        release(engine, twin)
        entry["ratios"] = ratios(entry["latency_ms"])
        self.checkpoint()

    def component(self, preset: str, name: str, entry: dict[str, Any]) -> None:
        """Fill ``entry`` (already in the result: each step is saved as it ends, so a timeout keeps them):
        the fp32 reference, torch, onnxruntime, then TensorRT, whose build is the longest step."""
        entry.update(builds={}, parity={}, latency_ms={})
        try:
            comp = fastgen.load_component(preset, name)
        except Exception as exc:  # noqa: BLE001
            entry.update(error(exc), tensorrt=self.trt_status if not self.trt_ok else error(exc))
            return
        override = None
        if preset in PROFILES:
            dims = {k: v for k, v in fastgen.ShapeProfile.parse(PROFILES[preset]).dims.items()
                    if k in comp.spec.symbols}
            override = str(fastgen.ShapeProfile(dims)) if dims else None
        spec = comp.spec.with_profile(override)
        shape = {**spec.profile.shape("opt"), **SHAPES.get(preset, {}).get(name, {})}
        entry.update(shape=shape, profile=str(spec.profile), profile_override=override)
        inputs = spec.sample_inputs(shape, seed=0)  # fp32 on the CPU; each engine casts and moves them
        feeds_of = lambda engine: engine.prepare_inputs(inputs)  # noqa: E731

        ref = None
        try:
            engine, info = self.build(comp, override, backend="torch", precision="fp32", device=self.device)
            entry["builds"]["torch_fp32_reference"] = info
            with no_tf32():  # a true fp32 reference: cuDNN would take TF32 convolutions by default
                ref = {k: v.float().cpu() for k, v in engine.run(feeds_of(engine)).items()}
            release(engine)
        except Exception as exc:  # noqa: BLE001
            entry["parity"]["reference"] = error(exc)

        self.contender(entry, "torch", lambda: self.build(comp, override, backend="torch", precision=self.precision,
                                                          device=self.device), feeds_of, ref, graphs=True)
        if preset == "sd15" and not self.args.ort_sd15:
            entry["latency_ms"]["onnxruntime"] = "skipped: sd15 on onnxruntime needs --ort-sd15"
        else:
            cpu = self.ort_device == "cpu"
            self.contender(entry, "onnxruntime", lambda: self.build(comp, override, backend="onnxruntime",
                                                                    precision="fp32", device=self.ort_device),
                           feeds_of, ref, graphs=False, warmup=min(self.warmup, 2) if cpu else None,
                           iters=min(self.iters, self.args.ort_iters) if cpu else None)
        if not self.trt_ok:
            entry["tensorrt"] = entry["parity"]["tensorrt"] = self.trt_status
            for key in ("tensorrt", "tensorrt_cuda_graphs"):
                entry["latency_ms"][key] = self.trt_status
            entry["ratios"] = ratios(entry["latency_ms"])
            return

        def make_trt():
            warm = self.timing_cache_warm()
            engine, info = self.build(comp, override, backend="tensorrt", precision=self.precision,
                                      device=self.trt_device, tensorrt=self.trt_options)
            stats = (engine.manifest.get("export") or {}).get("stats") or {}
            entry["tensorrt"] = {"build_seconds": info["seconds"], "engine_cache_hit": info["engine_cache_hit"],
                                 "timing_cache_warm": warm, "precision": self.precision,
                                 "manifest_build_seconds": engine.manifest.get("build_seconds"),
                                 "export_seconds": stats.get("export_seconds"),
                                 "settings": (engine.manifest.get("tensorrt") or {}).get("settings")}
            return engine, info

        entry["tensorrt"] = "incomplete: the run ended while TensorRT built this engine"
        self.checkpoint()
        self.contender(entry, "tensorrt", make_trt, feeds_of, ref, graphs=True)
        if isinstance(entry["tensorrt"], str):  # the build failed: its error
            entry["tensorrt"] = entry["latency_ms"]["tensorrt"]
        entry["ratios"] = ratios(entry["latency_ms"])

    def _generate(self, preset: str, backend: str, size: int | None):
        from fastgen.pipelines.generator import Generator

        t0 = time.perf_counter()
        precision = "fp32" if backend == "onnxruntime" else self.precision
        device = self.ort_device if backend == "onnxruntime" else self.device
        gen = Generator.from_pretrained(preset, backend=backend, device=device, precision=precision,
                                        profile=PROFILES.get(preset), cache=self.cache, progress=self.args.progress,
                                        build_config=fastgen.BuildConfig(export=self.export, tensorrt=self.trt_options))
        row: dict[str, Any] = {"device": device, "precision": precision,
                               "setup_seconds": round(time.perf_counter() - t0, 2)}
        kwargs = dict(seeds=[1234], guidance_scale=7.5, height=size, width=size, output_type="np", progress=False)
        gen.generate(PROMPT, steps=2, **kwargs)  # warm-up
        runs = []
        for _ in range(self.pipeline_iters):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = gen.generate(PROMPT, steps=self.args.steps, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0, res.latencies))
        med = lambda values: round(statistics.median(values), 3)  # noqa: E731
        row.update(seconds=med(s for s, _ in runs), runs=len(runs),
                   text_encoding_ms=med(x.text_encoding_ms for _, x in runs),
                   unet_step_ms=med(s for _, x in runs for s in x.denoising_step_ms),
                   vae_decode_ms=med(x.vae_decode_ms for _, x in runs))
        return row, gen, res.images

    def pipeline(self, preset: str) -> dict[str, Any]:
        """The whole pipeline: the candidate backend (tensorrt; onnxruntime in --smoke) against torch."""
        from fastgen.cli.demo import psnr

        candidate = "onnxruntime" if self.smoke else "tensorrt"
        size = PIPELINE_SIZE.get(preset)
        out: dict[str, Any] = {"reference": "torch", "candidate": candidate, "steps": self.args.steps, "height": size,
                               "width": size, "profile": PROFILES.get(preset), "guidance_scale": 7.5,
                               "prompt": PROMPT, "seed": 1234, "backends": {}}
        images = {}
        for backend in (candidate, "torch"):
            if backend == "tensorrt" and not self.trt_ok:
                out["backends"][backend] = self.trt_status
                continue
            try:
                out["backends"][backend], gen, images[backend] = self._generate(preset, backend, size)
                gen.close()
            except Exception as exc:  # noqa: BLE001
                out["backends"][backend] = error(exc)
            gen = None
            release()
        secs = {b: v["seconds"] for b, v in out["backends"].items() if isinstance(v, dict) and "seconds" in v}
        out["ratios"] = {f"torch/{candidate}": float(f"{secs['torch'] / secs[candidate]:.4g}")
                         if {"torch", candidate} <= set(secs) else None}
        out["psnr_db"] = {f"{candidate}_vs_torch": round(min(psnr(a, b) for a, b in zip(images[candidate],
                                                                                         images["torch"])), 2)
                          if {"torch", candidate} <= set(images) else None}
        return out


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def cell(value: Any, fmt: str) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, fmt)
        if isinstance(value, dict):
            return "error" if "error" in value else "-"
        return "-" if value is None else str(value).split(":", 1)[0][:24]  # unavailable / skipped

    console = Console(width=150)
    table = Table(title=f"TensorRT benchmark ({result['device']}, {result['settings']['precision']}; "
                        f"x vs TensorRT above 1: TensorRT is faster)")
    for col in ("component", "contender", "median ms", "p90 ms", "x vs TensorRT", "max rel err", "cosine",
                "build s"):
        table.add_column(col, justify="left" if col in ("component", "contender") else "right")
    for preset, comps in result["presets"].items():
        for name, entry in comps.items():
            lats = entry.get("latency_ms", {})
            med = {k: v["median"] for k, v in lats.items() if isinstance(v, dict) and "median" in v}
            for label, lat in lats.items():
                par = entry.get("parity", {}).get(label)
                par = par if isinstance(par, dict) else {}
                vs = med[label] / med["tensorrt"] if label in med and "tensorrt" in med else None
                table.add_row(f"{preset}/{name}", label, cell(med.get(label, lat), ".2f"),
                              cell(lat.get("p90") if isinstance(lat, dict) else None, ".2f"), cell(vs, ".2f"),
                              cell(par.get("max_rel"), ".2e"), cell(par.get("cosine"), ".6f"),
                              cell(entry.get("builds", {}).get(label, {}).get("seconds"), ".1f"))
    console.print(table)
    for preset, pipe in result.get("pipeline", {}).items():
        for backend, row in pipe["backends"].items():
            text = (f"{row['seconds']:.2f} s end to end, UNet step {row['unet_step_ms']:.1f} ms, set-up "
                    f"{row['setup_seconds']:.0f} s" if isinstance(row, dict) and "seconds" in row else cell(row, ""))
            console.print(f"pipeline {preset} {pipe['steps']} steps, {backend}: {text}")
        console.print(f"pipeline {preset}: ratios {pipe['ratios']}, PSNR {pipe['psnr_db']} dB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,sd15")
    ap.add_argument("--components", default=",".join(COMPONENTS))
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="TensorRT and torch")
    ap.add_argument("--smoke", action="store_true", help="tiny on the CPU, torch and onnxruntime only (CI)")
    ap.add_argument("--pipeline", default="auto", choices=["auto", "on", "off", "only"],
                    help="whole-pipeline figure: auto = sd15 only; only = no per-component benchmarks")
    ap.add_argument("--steps", type=int, default=50, help="pipeline denoising steps")
    ap.add_argument("--pipeline-iters", type=int, default=None, help="timed pipeline runs after a 2-step warm-up "
                                                                      "(default 3; 1 with --smoke)")
    ap.add_argument("--ort-sd15", action="store_true", help="also time onnxruntime on sd15")
    ap.add_argument("--ort-iters", type=int, default=10, help="most timed calls of a CPU onnxruntime engine")
    ap.add_argument("--warmup", type=int, default=None, help="default 10 (GPU), 1 (--smoke)")
    ap.add_argument("--iters", type=int, default=None, help="default 50 (GPU), 3 (--smoke)")
    ap.add_argument("--verify", default="opt", choices=["none", "opt", "profile"],
                    help="export / engine verification while building (parity is measured here anyway)")
    ap.add_argument("--cleanup", default="auto", choices=["auto", "onnxslim", "none"],
                    help="ONNX clean-up before building (auto: onnxslim where it is installed)")
    ap.add_argument("--trt-opt-level", type=int, default=3)
    ap.add_argument("--workspace-gib", type=float, default=0.0)
    ap.add_argument("--no-timing-cache", dest="timing_cache", action="store_false")
    ap.add_argument("--cache", default=None, help="engine cache directory (default: fastgen's)")
    ap.add_argument("--json", default=None, help="result JSON (default: benchmarks/results/tensorrt_<presets>_"
                                                 "<device>.json; none with --smoke)")
    ap.add_argument("--progress", action="store_true", help="show build progress (TensorRT's phases)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    presets = ["tiny"] if args.smoke else [p for p in args.presets.split(",") if p]
    components = [c for c in args.components.split(",") if c]
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        ap.error(f"invalid --components {bad[0]!r} (allowed: {', '.join(COMPONENTS)})")

    bench = Bench(args)
    cuda = torch.cuda.is_available() and not args.smoke
    result: dict[str, Any] = {
        "benchmark": "tensorrt", "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "device": f"GPU: {torch.cuda.get_device_name(0)}" if cuda else f"CPU: {cpu_name()}", "host_cpu": cpu_name(),
        "devices": {"tensorrt": bench.trt_device, "torch": bench.device, "onnxruntime": bench.ort_device},
        "versions": versions(), "tensorrt": bench.trt_status,
        "settings": {"smoke": args.smoke, "precision": bench.precision, "onnxruntime_precision": "fp32",
                     "reference": "torch fp32", "warmup": bench.warmup, "iters": bench.iters,
                     "pipeline_iters": bench.pipeline_iters,
                     "verify": args.verify, "cleanup": bench.export.cleanup, "tensorrt_options": bench.trt_options.to_dict(),
                     "profiles": {p: PROFILES.get(p) for p in presets}},
        "presets": {}, "pipeline": {},
    }
    if cuda:
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    if not cuda:
        result["note"] = "no CUDA here: absolute times check the plumbing only; compare ratios within one run"
    out = Path(args.json) if args.json else (None if args.smoke else RESULTS / (
        f"tensorrt_{'_'.join(presets)}_{'cuda' if cuda else 'cpu'}.json"))

    def save() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, result)

    bench.checkpoint = save
    for preset in presets:
        if args.pipeline != "only":
            result["presets"][preset] = {}
            for name in components:
                t0 = time.perf_counter()
                entry = result["presets"][preset][name] = {}
                bench.component(preset, name, entry)
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                print(f"{preset}/{name}: {entry['seconds']} s; ratios {entry.get('ratios')}", flush=True)
                save()
        if args.pipeline in ("on", "only") or (args.pipeline == "auto" and preset == "sd15"):
            result["pipeline"][preset] = bench.pipeline(preset)
            save()
    print_table(result)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
