"""``fastgen demo``: the main job on the embedded ``tiny`` preset.

For every tiny component: build (cached) a torch and an onnxruntime engine, check that they agree on
fresh inputs, and time both at the profile's opt shape. Writes ``summary.json``.
"""

from __future__ import annotations

import datetime
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from rich.table import Table

from fastgen._fs import write_json_atomic
from fastgen._version import __version__

logger = logging.getLogger(__name__)

PRESET = "tiny"


def _opt_batch(spec) -> list[int]:
    return [spec.profile.dims["batch"].opt] if "batch" in spec.profile.dims else [1]


def run_demo(out: Path, *, cache_dir: str | None, iters: int, console) -> dict[str, Any]:
    from fastgen.engines.bench import benchmark
    from fastgen.engines.build import build
    from fastgen.engines.cache import EngineCache
    from fastgen.export.verify import compare
    from fastgen.models import load_component, model_components

    cache = EngineCache(cache_dir)
    names = model_components(PRESET)
    rows = []
    t_start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=len(names) * 2)
        for name in names:
            progress.update(task, description=f"{name}: loading")
            comp = load_component(PRESET, name)
            row: dict[str, Any] = {"component": name, "model_type": comp.spec.model_type}
            engines = {}
            for backend in ("torch", "onnxruntime"):
                progress.update(task, description=f"{name}: building {backend} engine")
                t0 = time.perf_counter()
                engines[backend] = build(comp, backend=backend, device="cpu", cache=cache)
                row[f"{backend}_build_s"] = time.perf_counter() - t0
                row[f"{backend}_cache_hit"] = bool(getattr(engines[backend], "cache_hit", False))
                progress.advance(task)
            progress.update(task, description=f"{name}: checking and timing")
            inputs = comp.spec.sample_inputs("opt", seed=1)
            ref = engines["torch"](inputs)
            got = engines["onnxruntime"](inputs)
            row["min_cosine"] = min(compare(ref[k], got[k])["cosine"] for k in ref)
            row["max_rel_err"] = max(compare(ref[k], got[k])["max_rel"] for k in ref)
            for backend, engine in engines.items():
                res = benchmark(engine, batches=_opt_batch(comp.spec), warmup=2, iters=iters)[0]
                row[f"{backend}_p50_ms"] = res.p50_ms
                row["shape"] = res.shape
            row["speedup"] = row["torch_p50_ms"] / row["onnxruntime_p50_ms"]
            rows.append(row)
    total = time.perf_counter() - t_start

    table = Table(title=f"fastgen demo: preset '{PRESET}' on {platform.machine()} CPU "
                        f"({torch.get_num_threads()} threads), {total:.1f} s")
    for col in ("component", "opt shape", "build torch / ort", "torch p50 ms", "ort p50 ms", "ort speed-up",
                "agreement (cosine)"):
        table.add_column(col, justify="right" if col != "component" else "left")
    for r in rows:
        builds = " / ".join("cached" if r[f"{b}_cache_hit"] else f"{r[f'{b}_build_s']:.1f} s"
                            for b in ("torch", "onnxruntime"))
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        table.add_row(r["component"], shape, builds, f"{r['torch_p50_ms']:.2f}", f"{r['onnxruntime_p50_ms']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['min_cosine']:.6f}")
    console.print(table)
    summary = {"preset": PRESET, "fastgen_version": __version__, "torch_version": torch.__version__,
               "machine": platform.machine(), "threads": torch.get_num_threads(), "total_seconds": total,
               "date": datetime.date.today().isoformat(), "components": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    console.print(f"summary written to {out / 'summary.json'}")
    return summary
