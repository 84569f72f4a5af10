"""CPU contention: step latency of the torch and onnxruntime backends while busy processes take CPUs.

    python benchmarks/bench_contention.py --json benchmarks/results/contention/run.json
    python benchmarks/bench_contention.py --quick --json /tmp/contention.json     # CI: the plumbing, seconds

For 0 and 1 CPUs taken by a busy process (``while True: pass`` in its own interpreter; ``--pin`` pins
each to one of this process's CPUs, the last first): the tiny preset's UNet at its profile's opt shape
(``fastgen.build("tiny", component="unet", backend=..., device="cpu")``) and, unless ``--quick``, the
whole tiny generation step (UNet, guidance, scheduler: the median of ``Latencies.denoising_step_ms``),
each with the default threading and with every explicit ``intra_op_threads`` from 1 to the usable
CPUs, side by side. Every configuration is timed in ``--rounds`` rounds of blocks, the configurations
in turn within a round (so a change of load outside hits them all), and reported as the median of its
block medians with their range. Ratios: the default over the best explicit count (the goal: 1.5x at
most), and for torch, the count torch picks by itself (``torch.get_num_threads()``: what the default
ran before issue 15) over the best: ``own_count_over_best``. ``default_carried``: the torch default
engine made before the busy process started (its thread count timed then: had it chosen more than
one, it must notice the collapse and time again). The load of the machine (load average, runnable
threads, CPU pressure) is recorded before and after each scenario, since other processes change the
figures too. JSON is written atomically.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fastgen
from fastgen.core import cpus
from fastgen.core.fs import write_json_atomic
from fastgen.engines.config import BuildConfig, ExecutionOptions
from fastgen.export.config import ExportConfig

BACKENDS = ("torch", "onnxruntime")
GOAL = 1.5
PROMPT = "a red sports car, product shot"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"fastgen": fastgen.__version__, "torch": torch.__version__,
                                  "python": platform.python_version()}
    for name in ("onnxruntime", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version is informative only
            out[name] = None
    return out


def cpu_facts() -> dict[str, Any]:
    return {"os_cpu_count": os.cpu_count(), "affinity": cpus.affinity_cpus(), "cgroup_limit": cpus.cgroup_cpu_limit(),
            "usable": cpus.usable_cpus(), "torch_default_threads": torch.get_num_threads()}


class Spinners:
    """``count`` busy processes for the duration of a ``with`` block; killed however the block ends."""

    def __init__(self, count: int, pin: bool) -> None:
        self.count, self.pin = count, pin
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Spinners:
        mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        for i in range(self.count):
            proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            self.procs.append(proc)
            if self.pin and mine:
                os.sched_setaffinity(proc.pid, {mine[-1 - i % len(mine)]})
        atexit.register(self.stop)
        time.sleep(0.3 if self.count else 0)  # running before the first timed call
        return self

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self.procs.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        atexit.unregister(self.stop)


def time_block(unit: Callable[[], float], iters: int, budget_s: float) -> float:
    """Median of ``iters`` units (seconds each), fewer (two at least) once they took ``budget_s``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (len(times) < 2 or time.perf_counter() - start < budget_s):
        times.append(unit())
    return statistics.median(times)


def timed_call(fn: Callable[[], Any]) -> Callable[[], float]:
    def unit() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return unit


def summarize(blocks: list[float]) -> dict[str, Any]:
    return {"median_ms": round(statistics.median(blocks) * 1e3, 3), "min_ms": round(min(blocks) * 1e3, 3),
            "max_ms": round(max(blocks) * 1e3, 3), "blocks_ms": [round(b * 1e3, 3) for b in blocks]}


def compare(units: dict[str, Callable[[], float]], threads: dict[str, Any], rounds: int, iters: int,
            budget_s: float, own_count: int | None = None) -> dict[str, Any]:
    """Every configuration timed in ``rounds`` rounds (the order rotated each round), with its ratios;
    ``own_count``: the backend's own thread count (torch's), whose ratio is reported too."""
    labels = list(units)
    blocks: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            blocks[label].append(time_block(units[label], iters, budget_s))
    configs = {label: {**summarize(blocks[label]), "threads": threads[label]() if callable(threads[label])
                       else threads[label]} for label in labels}
    explicit = {label: c for label, c in configs.items() if label.startswith("threads=")}
    best = min(explicit, key=lambda label: explicit[label]["median_ms"])
    out: dict[str, Any] = {"configs": configs, "best": best}
    for key, label in (("default", "default"), ("default_carried", "default_carried"),
                       ("own_count", f"threads={own_count}")):
        if label in configs:
            out[f"{key}_over_best"] = round(configs[label]["median_ms"] / configs[best]["median_ms"], 3)
    out["meets_goal"] = out["default_over_best"] <= GOAL
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.usable = cpus.usable_cpus()
        self.counts = list(range(1, self.usable + 1))
        self.build_config = BuildConfig(device="cpu", export=ExportConfig(verify=args.verify))
        self.unets: dict[tuple[str, int], Any] = {}  # explicit-count engines, reused across scenarios
        self.generators: dict[tuple[str, int], Any] = {}
        self.carried: dict[str, Any] = {}  # the default engines made in the first scenario

    def build_unet(self, backend: str, threads: int) -> Any:
        execution = ExecutionOptions(intra_op_threads=threads)
        config = dataclasses.replace(self.build_config, backend=backend, execution=execution)
        engine = fastgen.build("tiny", component="unet", config=config, cache=self.args.cache_obj)
        inputs = engine.spec.sample_inputs("opt")
        engine(inputs)  # the first call: allocations, kernel choice, the torch default's thread timing
        return engine, inputs

    def generator(self, backend: str, threads: int) -> Any:
        config = dataclasses.replace(self.build_config, execution=ExecutionOptions(intra_op_threads=threads))
        gen = fastgen.Generator.from_pretrained("tiny", backend=backend, device="cpu", build_config=config,
                                                cache=self.args.cache_obj)
        self.generate(gen)
        return gen

    def generate(self, gen: Any) -> float:
        result = gen.generate([PROMPT], steps=self.args.steps, seed=0, output_type="latent", progress=False)
        return statistics.median(result.latencies.denoising_step_ms) / 1e3

    def unet_units(self, backend: str, first: bool) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
        units: dict[str, Callable[[], float]] = {}
        threads: dict[str, Any] = {}
        default, inputs = self.build_unet(backend, 0)  # fresh: it meets this scenario's load
        units["default"] = timed_call(lambda: default(inputs))
        threads["default"] = self.threads_of(default)
        if backend == "torch":
            if first:
                self.carried[backend] = (default, inputs)
            else:
                carried, carried_inputs = self.carried[backend]
                units["default_carried"] = timed_call(lambda: carried(carried_inputs))
                threads["default_carried"] = lambda: carried.intra_op_threads
        for n in self.counts:
            if (backend, n) not in self.unets:
                self.unets[(backend, n)] = self.build_unet(backend, n)
            engine, engine_inputs = self.unets[(backend, n)]
            units[f"threads={n}"] = timed_call(lambda e=engine, x=engine_inputs: e(x))
            threads[f"threads={n}"] = n
        return units, threads

    def step_units(self, backend: str) -> tuple[dict[str, Callable[[], float]], dict[str, Any]]:
        units: dict[str, Callable[[], float]] = {}
        default = self.generator(backend, 0)
        units["default"] = lambda: self.generate(default)
        threads: dict[str, Any] = {"default": self.threads_of(default.unet)}
        for n in self.counts:
            if (backend, n) not in self.generators:
                self.generators[(backend, n)] = self.generator(backend, n)
            units[f"threads={n}"] = lambda g=self.generators[(backend, n)]: self.generate(g)
            threads[f"threads={n}"] = n
        return units, threads

    @staticmethod
    def own_count(backend: str) -> int | None:
        """torch's own intra-op count: what a torch engine's default ran before issue 15."""
        return torch.get_num_threads() if backend == "torch" else None

    @staticmethod
    def threads_of(engine: Any) -> Any:
        if engine.backend == "torch":
            return lambda: engine.intra_op_threads  # read after the rounds: it may time again meanwhile
        chosen = engine.execution.intra_op_threads or cpus.limited_cpus()
        return chosen or "onnxruntime's default (one per physical core)"

    def scenario(self, busy: int, first: bool) -> dict[str, Any]:
        args = self.args
        out: dict[str, Any] = {"busy_processes": busy, "pinned": args.pin, "load_before": cpus.load_snapshot()}
        workloads: dict[str, Any] = {"unet": {}}
        with Spinners(busy, args.pin):
            for backend in args.backends:
                units, threads = self.unet_units(backend, first)
                workloads["unet"][backend] = compare(units, threads, args.rounds, args.iters, args.block_s,
                                                     self.own_count(backend))
                self.report(busy, "unet", backend, workloads["unet"][backend])
            if args.pipeline:
                workloads["generation_step"] = {}
                for backend in args.backends:
                    units, threads = self.step_units(backend)
                    workloads["generation_step"][backend] = compare(units, threads, args.rounds, 1, args.block_s,
                                                                    self.own_count(backend))
                    self.report(busy, "generation_step", backend, workloads["generation_step"][backend])
        out["load_after"] = cpus.load_snapshot()
        out["workloads"] = workloads
        return out

    @staticmethod
    def report(busy: int, workload: str, backend: str, got: dict[str, Any]) -> None:
        cells = ", ".join(f"{label} {c['median_ms']:.1f} ms [{c['min_ms']:.1f}-{c['max_ms']:.1f}]"
                          for label, c in got["configs"].items())
        print(f"busy={busy} {workload:15s} {backend:11s} default/best {got['default_over_best']:.2f}: {cells}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round of 2 calls, the UNet only, no export "
                                                        "verification: the plumbing, in seconds (CI)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--busy", default="0,1", help="busy processes per scenario, e.g. 0,1,2")
    ap.add_argument("--pin", action="store_true", help="pin each busy process to one CPU")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of blocks (default 5; --quick 1)")
    ap.add_argument("--iters", type=int, default=None, help="UNet calls per block (default 10; --quick 2)")
    ap.add_argument("--block-s", type=float, default=None,
                    help="a block stops after this long, 2 calls at least (default 3; --quick 0.5)")
    ap.add_argument("--steps", type=int, default=6, help="denoising steps of each timed generation")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the whole generation step (default: on; off with --quick)")
    ap.add_argument("--verify", default=None, choices=["none", "opt", "profile"],
                    help="export verification of the onnxruntime engines (default opt; none with --quick)")
    ap.add_argument("--cache", default=None, help="engine cache directory (default: fastgen's)")
    ap.add_argument("--json", default=None, help="write the result here (atomically)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log the engines' thread choices")
    args = ap.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in BACKENDS]
    try:
        busy = [int(b) for b in args.busy.split(",") if b.strip()]
    except ValueError:
        busy = [-1]
    if bad or not args.backends or not busy or min(busy) < 0:
        ap.error(f"--backends from {', '.join(BACKENDS)}; --busy: integers >= 0")
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.iters = args.iters or (2 if args.quick else 10)
    args.block_s = args.block_s or (0.5 if args.quick else 3.0)
    if args.rounds < 1 or args.iters < 1 or args.steps < 1 or not args.block_s > 0:
        ap.error("--rounds, --iters, --steps: integers >= 1; --block-s: seconds > 0")
    args.pipeline = (not args.quick) if args.pipeline is None else args.pipeline
    args.verify = args.verify or ("none" if args.quick else "opt")
    args.cache_obj = None
    if args.cache:
        from fastgen.engines.cache import EngineCache

        args.cache_obj = EngineCache(args.cache)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.verbose:  # the engines' thread choices, not every denoising step
        logging.getLogger("fastgen.engines").setLevel(logging.INFO)

    facts = cpu_facts()
    result: dict[str, Any] = {
        "benchmark": "contention", "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU: {cpu_name()}, {facts['usable']} usable of {facts['os_cpu_count']} CPUs",
        "versions": versions(), "cpus": facts,
        "settings": {"quick": args.quick, "backends": args.backends, "busy": busy, "pin": args.pin,
                     "rounds": args.rounds, "iters": args.iters, "block_s": args.block_s, "steps": args.steps,
                     "pipeline": args.pipeline, "verify": args.verify, "shape": "tiny unet opt",
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "goal": f"default within {GOAL}x of the best explicit thread count under the same contention",
        "scenarios": [],
    }
    bench = Bench(args)
    for i, count in enumerate(busy):
        result["scenarios"].append(bench.scenario(count, first=i == 0))
        if args.json:  # after every scenario: an interrupted run keeps what it measured
            write_json_atomic(Path(args.json), result)
    result["meets_goal"] = all(w["meets_goal"] for s in result["scenarios"] for per in s["workloads"].values()
                               for w in per.values())
    if args.json:
        write_json_atomic(Path(args.json), result)
    print(f"default within {GOAL}x of the best everywhere: {result['meets_goal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
