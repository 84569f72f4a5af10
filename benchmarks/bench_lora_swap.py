"""LoRA swap time per backend against rebuilding the UNet engine (goal: a swap >= 20x faster).

For each backend, on the preset's UNet (random weights; ``sd15`` by default):

* ``rebuild_s``: making the engine again, what a swap replaces. onnxruntime: ``fastgen.build`` into an
  empty cache (load the PyTorch model, export, clean up, verify at the opt shape, open the session);
  torch: the cheapest rebuild there is, the model made again in memory plus ``TorchEngine`` (no files);
* ``first_load_s``: loading the first LoRA file (parsing, key checks; onnxruntime: the one-off session
  with the adapted weights made overridable, see ``fastgen.lora.ort_apply``);
* ``swap_ms``: ``set_adapters`` between two selections (one LoRA at 0.8 / two at 0.5 + 0.5 / none),
  median and max of ``--swaps`` swaps;
* ``step_ms`` with no LoRA loaded and with one applied (onnxruntime's overridable weights are not
  pre-packed), one UNet call at batch 1 and the profile's opt size, median of ``--calls``.

The LoRAs adapt every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) at each rank
of ``--ranks`` (sd15: 128 Linear layers, 320 to 1280 wide), written as PEFT-format safetensors files.

    python benchmarks/bench_lora_swap.py --json benchmarks/results/lora_swap_cpu.json
    python benchmarks/bench_lora_swap.py --quick    # tiny preset, one rank, a few swaps (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastgen
from fastgen.core import cpus
from fastgen.core.fs import write_json_atomic

BACKENDS = ("torch", "onnxruntime")
GOAL = 20.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: Shapes for the sd15 build: a 256-pixel opt keeps the export's verification call short; the weights
#: (what a LoRA changes) do not depend on the profile.
PROFILE = {"sd15": "batch=1:1:2,height=256:256:512,width=256:256:512", "tiny": None}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"fastgen": fastgen.__version__, "torch": torch.__version__,
                                  "python": platform.python_version()}
    for name in ("onnxruntime", "diffusers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            out[name] = None
    return out


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> int:
    """A PEFT-format LoRA file over every attention projection; returns the number of layers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, shape in shapes.items():
        if ".attn" in module and module.endswith(TARGETS):
            out, inp = shape[:2]
            tensors[f"unet.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.01
            tensors[f"unet.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
    save_file(tensors, str(path))
    return len(tensors) // 2


def time_rebuild(backend: str, preset: str, profile: str | None, cache_root: Path) -> tuple[Any, float]:
    from fastgen.engines.cache import EngineCache
    from fastgen.export.config import ExportConfig

    start = time.perf_counter()
    if backend == "torch":
        from fastgen.engines.torch_backend import TorchEngine
        from fastgen.models import load_component

        engine = TorchEngine(load_component(preset, "unet", profile=profile))
    else:
        engine = fastgen.build(preset, component="unet", backend=backend, device="cpu", profile=profile,
                               export=ExportConfig(verify="opt"), cache=EngineCache(cache_root / backend))
    return engine, time.perf_counter() - start


def step_ms(engine: Any, calls: int) -> float:
    dims = {k: r.opt for k, r in engine.spec.profile.dims.items()}
    dims["batch"] = 1
    inputs = engine.spec.sample_inputs(dims, seed=0)
    engine.run(inputs)  # warm-up (thread choice, first-call allocations)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.run(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_backend(backend: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fastgen.lora import AdapterManager

    engine, rebuild_s = time_rebuild(backend, args.preset, PROFILE.get(args.preset), tmp / "cache")
    print(f"{backend}: rebuilt the {args.preset} UNet in {rebuild_s:.1f} s", flush=True)
    base_step = step_ms(engine, args.calls)
    rows = []
    for rank in args.ranks:
        manager = AdapterManager({"unet": engine})
        shapes = manager.target("unet").weight_shapes()
        files = [tmp / f"r{rank}-{i}.safetensors" for i in range(2)]
        layers = [write_lora(f, shapes, rank, seed=i) for i, f in enumerate(files)]
        start = time.perf_counter()
        manager.load(files[0], name="a", weight=0.8)
        first_load_s = time.perf_counter() - start
        manager.load(files[1], name="b", weight=0.0)
        lora_step = step_ms(engine, args.calls)
        selections = [(["a"], [0.8]), (["a", "b"], [0.5, 0.5]), ([], [])]
        swaps = []
        for i in range(args.swaps):  # from (a 0.8, b 0) on, every swap changes the fused weights
            names, weights = selections[(i + 1) % len(selections)]
            swaps.append(manager.set_adapters(names, weights) * 1e3)
        manager.unload()
        manager.close()
        swap = statistics.median(swaps)
        row = {"rank": rank, "lora_layers": layers[0], "rebuild_s": rebuild_s, "first_load_s": first_load_s,
               "swap_ms_median": swap, "swap_ms_max": max(swaps), "swaps": len(swaps),
               "rebuild_over_swap": rebuild_s * 1e3 / swap, "step_ms_base": base_step, "step_ms_lora": lora_step}
        row["meets_goal"] = row["rebuild_over_swap"] >= GOAL
        rows.append(row)
        print(f"{backend:11s} rank {rank:3d}: swap {swap:8.1f} ms (max {max(swaps):.1f}), first load "
              f"{first_load_s:6.2f} s, rebuild {rebuild_s:6.1f} s -> {row['rebuild_over_swap']:7.0f}x; "
              f"step {base_step:.0f} -> {lora_step:.0f} ms", flush=True)
    if hasattr(engine, "close"):
        engine.close()
    del engine
    gc.collect()
    return {"backend": backend, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    head = f"{'backend':11s} {'rank':>4s} {'layers':>6s} {'rebuild s':>9s} {'load s':>7s} {'swap ms':>8s} " \
           f"{'max ms':>7s} {'x faster':>8s} {'step ms':>8s} {'+LoRA ms':>8s}"
    print(f"\n{result['preset']} UNet, {result['device']}\n{head}\n{'-' * len(head)}")
    for per in result["backends"]:
        for r in per["rows"]:
            print(f"{per['backend']:11s} {r['rank']:4d} {r['lora_layers']:6d} {r['rebuild_s']:9.1f} "
                  f"{r['first_load_s']:7.2f} {r['swap_ms_median']:8.1f} {r['swap_ms_max']:7.1f} "
                  f"{r['rebuild_over_swap']:8.0f} {r['step_ms_base']:8.0f} {r['step_ms_lora']:8.0f}")
    print(f"swap >= {GOAL:g}x faster than a rebuild everywhere: {result['meets_goal']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=sorted(PROFILE), help="the UNet (default sd15; --quick tiny)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--ranks", default=None, help="LoRA ranks, e.g. 4,64 (default 4,64; --quick 4)")
    ap.add_argument("--swaps", type=int, default=None, help="timed swaps per rank (default 9; --quick 3)")
    ap.add_argument("--calls", type=int, default=None, help="timed UNet calls per step figure (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, rank 4, few swaps: the plumbing (CI)")
    ap.add_argument("--json", default=None, help="write the result here (atomically)")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "sd15")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        args.ranks = [int(r) for r in (args.ranks or ("4" if args.quick else "4,64")).split(",") if r.strip()]
    except ValueError:
        args.ranks = [0]
    args.swaps = args.swaps if args.swaps is not None else (3 if args.quick else 9)
    args.calls = args.calls if args.calls is not None else (1 if args.quick else 3)
    if not backends or any(b not in BACKENDS for b in backends) or not args.ranks or min(args.ranks) < 1 \
            or args.swaps < 1 or args.calls < 1:
        ap.error(f"--backends from {', '.join(BACKENDS)}; --ranks, --swaps, --calls: integers >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    result: dict[str, Any] = {
        "benchmark": "lora_swap", "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()}, {cpus.usable_cpus()} usable of {os.cpu_count()} CPUs",
        "versions": versions(), "preset": args.preset, "profile": PROFILE.get(args.preset),
        "settings": {"quick": args.quick, "backends": backends, "ranks": args.ranks, "swaps": args.swaps,
                     "calls": args.calls, "targets": list(TARGETS)},
        "goal": f"a swap at least {GOAL:g}x faster than rebuilding the engine", "backends": [],
    }
    with tempfile.TemporaryDirectory(prefix="fastgen-bench-lora-") as tmp:
        for backend in backends:
            result["backends"].append(bench_backend(backend, args, Path(tmp)))
            if args.json:  # after every backend: an interrupted run keeps what it measured
                write_json_atomic(Path(args.json), result)
    result["meets_goal"] = all(r["meets_goal"] for per in result["backends"] for r in per["rows"])
    if args.json:
        write_json_atomic(Path(args.json), result)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
