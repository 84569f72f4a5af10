"""Load benchmark: open-loop Poisson arrivals against three ways of serving the same engines.

    python benchmarks/bench_load.py --backend torch            # CPU, tiny preset (~15 min on 2 cores)
    python benchmarks/bench_load.py --backend onnxruntime --quick     # a few minutes, coarser
    python benchmarks/bench_load.py --backend torch --device cuda --threads 0      # a GPU

Modes, compared in one run on the very same engines:

- ``sequential``: per-request execution, first come first served (``Generator.generate`` /
  ``Scorer.score_texts`` / ``Scorer.score_images`` on each request alone, on one thread);
- ``request``: request-level dynamic batching (``fastgen.Runtime`` with no text length buckets, each
  batch padded to its longest text, and static generation batches that form only once the last
  one has finished: what Triton / Ray Serve style batching of whole requests gives);
- ``step``: fastgen (length buckets for texts; step-level continuous batching for generation).

Scenarios: ``text`` (a long-tailed length: 80% of texts 3-20 tokens, 15% 20-64, 5% 100-128),
``generate`` (4 to 50 steps, 64 and 128 px, guidance 7.5) and ``mix`` (70% texts, 20% images, 10%
generations).

Method. "Throughput at equal p99" is read off each mode's p99-against-load curve:

1. Load points. Each mode is probed at offered loads in multiples of the sequential server's
   capacity (one over the mean solo service time): a geometric sweep up to saturation (p99 past
   the largest target, or completions falling behind arrivals, twice in a row), then bisection
   near the headline target's crossing. A probe is ``--*-duration`` seconds of open-loop Poisson
   arrivals; latency runs from each request's *scheduled* arrival (no coordinated omission),
   requests arriving in the first 10% are served but not counted (the queue starts empty), and a
   request not done ``--grace`` seconds after the last arrival counts as missed (infinite
   latency; with generation in the scenario, the grace is at least the headline slowdown times the
   slowest request's solo time, which a request arriving at the end may take and still meet the
   target). Every load replays the same request sequence, its arrival times scaled (common random
   numbers: curves differ by load and mode, not by the draw). Throughput is goodput: requests that
   arrived in the counted window and completed, per second of that window (completions inside the
   window, ``achieved_rps``, undercount a server that finishes long requests later than short ones,
   as earliest-deadline-first order does, even when every request meets its target).
2. Capacity at a target ``T``. p99 is made non-decreasing in load (isotonic regression of log p99:
   a noisy probe on a shared machine cannot fake a knee; a probe over twice the next higher load's
   is run again first, and the repeat replaces it) and the load where it crosses ``T`` is
   interpolated between the two probes around it; the throughput reported is the completions per
   second interpolated there. Modes are compared at the same ``T``, for several ``T``: a ratio at
   one target where one mode barely meets it and another never does says nothing, so the JSON
   lists every target, with ``bound`` marking a capacity that is a lower bound (still under ``T``
   at the highest probe) or not met (over ``T`` at the lowest).
3. Latency metric of generation: slowdown, a request's latency over its own solo latency (the
   same request, same steps and size, alone on an idle server: fitted per size as
   ``a + b * steps`` from solo runs). Raw latency is dominated by the 50-step large requests and
   says nothing about the short ones, the majority; latency per step is not achievable for short
   requests even alone (text encoding and VAE decoding dominate 4 steps), so a per-step target
   either excludes them or is met by nothing. p99 slowdown <= S means 99% of requests, of any
   length, take at most S times what they would alone. Raw p99 latency is reported too, with
   targets in multiples of the slowest request's solo latency. The mix scenario's metric is the
   worst kind's p99 over its target.

Garbage collection: before each probe, ``gc.collect()`` then ``gc.freeze()`` (every mode alike), as a
service would after loading its models; a full collection over torch's and transformers' objects
otherwise pauses every thread for about 0.3 s at a random point of some probes.

Threads (``--threads``, default 1 on a CPU): the engines' intra-op threads (torch and onnxruntime).
On 2 cores, the runtime modes prepare requests (tokenizing, image decoding) on the client thread
while the device thread runs the engines; a second intra-op thread takes that core, and with
anything else running, PyTorch's OpenMP barrier waits of 10-200 ms per call (measured) swamp the
tiny models. The sequential mode runs on the same engines, and was also faster with one thread
on this machine. Scheduling decisions are timed at the end with 1,000 requests queued, as in
``tests/runtime/test_request_scheduler_bench.py``.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import datetime
import gc
import json
import logging
import math
import os
import platform
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from load_analysis import WARMUP_FRACTION, drive, isotonic, p99_of, scheduling_decisions, summarize, write

import fastgen
from fastgen.core.stats import percentile
from fastgen.engines.config import BuildConfig, ExecutionOptions
from fastgen.export.config import ExportConfig
from fastgen.pipelines.generator import Generator
from fastgen.pipelines.scorer import Scorer
from fastgen.runtime import GenerateRequest, Runtime, ScoreRequest

logger = logging.getLogger("bench_load")
MODES = ("sequential", "request", "step")
SCENARIO_KINDS = {"text": {"text": 1.0}, "generate": {"generate": 1.0},
                  "mix": {"text": 0.7, "image": 0.2, "generate": 0.1}}


@dataclass
class Spec:
    kind: str  # generate | text | image
    item: object = None
    steps: int = 0
    size: int = 0
    seed: int = 0


# --- workload ---------------------------------------------------------------------------------------------

def text_pool(tokenizer, rng: random.Random, n: int = 600) -> list[tuple[str, int]]:
    """Texts of a long-tailed token length: 80% 3-20 tokens, 15% 20-64, 5% 100-128 (with [CLS]/[SEP])."""
    from fastgen.models.tokenizers import CORPUS

    out = []
    for _ in range(n):
        r = rng.random()
        target = rng.randint(3, 20) if r < 0.8 else rng.randint(20, 64) if r < 0.95 else rng.randint(100, 128)
        text = " ".join(rng.choice(CORPUS) for _ in range(max(target - 2, 1)))
        out.append((text, len(tokenizer(text, truncation=True, max_length=128)["input_ids"])))
    return out


class Workload:
    """One scenario's request sequence at unit rate; a load ``r`` replays it with arrival times / ``r``."""

    def __init__(self, kinds: dict[str, float], seed: str, texts, images, sizes) -> None:
        self.kinds, self.texts, self.images, self.sizes = kinds, texts, images, sizes
        self.rng = random.Random(seed)
        self.items: list[tuple[float, Spec]] = []
        self.t = 0.0

    def spec(self, kind: str) -> Spec:
        rng = self.rng
        if kind == "text":
            return Spec("text", rng.choice(self.texts)[0])
        if kind == "image":
            return Spec("image", rng.choice(self.images))
        return Spec("generate", rng.choice(self.texts)[0][:200], steps=rng.randint(4, 50),
                    size=self.sizes[0] if rng.random() < 0.7 else self.sizes[-1], seed=rng.randrange(2**31))

    def plan(self, rate: float, duration: float) -> list[tuple[float, Spec]]:
        names, weights = list(self.kinds), list(self.kinds.values())
        while self.t < rate * duration:  # extend the one sequence: a prefix never changes
            self.t += self.rng.expovariate(1.0)
            self.items.append((self.t, self.spec(self.rng.choices(names, weights)[0])))
        return [(t / rate, s) for t, s in self.items if t < rate * duration]


# --- servers ------------------------------------------------------------------------------------------------

def run_alone(gen, scorers, spec: Spec):
    if spec.kind == "text":
        return scorers["text"].score_texts([spec.item])[0]
    if spec.kind == "image":
        return scorers["image"].score_images([spec.item])[0]
    return gen.generate(spec.item, steps=spec.steps, height=spec.size, width=spec.size, seed=spec.seed,
                        scheduler="euler", output_type="uint8", progress=False)


class SequentialServer:
    """Each request run alone, in arrival order, on one thread."""

    def __init__(self, gen, scorers, mode: str = "sequential", args=None) -> None:
        self.gen, self.scorers = gen, scorers
        self.queue: queue.Queue = queue.Queue()
        self.abort = False
        self.thread = threading.Thread(target=self._loop, name="sequential", daemon=True)
        self.thread.start()

    def submit(self, spec: Spec) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((spec, fut))
        return fut

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            spec, fut = item
            if self.abort:
                fut.set_exception(TimeoutError("not served before the end of the run"))
                continue
            try:
                fut.set_result(run_alone(self.gen, self.scorers, spec))
            except Exception as exc:
                fut.set_exception(exc)

    def stop(self, grace: float) -> dict:
        self.queue.put(None)
        self.thread.join(grace)
        self.abort = True
        self.thread.join()
        return {}


class RuntimeServer:
    def __init__(self, gen, scorers, mode: str, args) -> None:
        cfg = dict(max_queue=10**6, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, batch_wait=args.batch_wait,
                   max_step_rows=args.max_step_rows)
        if args.slowdown_target is not None:
            cfg.update(slowdown_target=args.slowdown_target)
        if mode == "request":
            cfg.update(text_buckets=(), generation_batching="request")
        self.rt = Runtime(gen, list(scorers.values()), **cfg)

    def submit(self, spec: Spec) -> concurrent.futures.Future:
        if spec.kind == "generate":
            cfg = fastgen.GenerateConfig(steps=spec.steps, height=spec.size, width=spec.size, seed=spec.seed,
                                         scheduler="euler", output_type="uint8")
            return self.rt.submit(GenerateRequest(spec.item, cfg))
        return self.rt.submit(ScoreRequest(spec.item, kind=spec.kind))

    def stop(self, grace: float) -> dict:
        self.rt.shutdown(drain=True, timeout=grace)
        stats = self.rt.stats()
        stats["text_merge_tokens"] = self.rt.scheduler.merge_cost.get("text")
        return stats


def server_for(mode: str, gen, scorers, args):
    return (SequentialServer if mode == "sequential" else RuntimeServer)(gen, scorers, mode, args)


# --- one load point -------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    ordered = sorted(values) or [math.inf]
    return {q: percentile(ordered, float(q[1:])) for q in ("p50", "p90", "p99")} | {"max": ordered[-1]}


def run_point(server, plan, duration: float, grace: float, targets: dict, solo) -> dict:
    return point_stats(plan, *drive(server, plan, duration, grace), duration, targets, solo)


def point_stats(plan, done_at: list[float], ok: list[bool], stats: dict, duration: float, targets: dict,
                solo) -> dict:
    """One load point's figures from each request's completion (seconds after the probe's start)."""
    n = len(plan)
    t0 = WARMUP_FRACTION * duration
    counted = [i for i in range(n) if plan[i][0] >= t0]
    lat = {i: (done_at[i] - plan[i][0]) * 1e3 if ok[i] else math.inf for i in counted}
    window = sum(1 for i in range(n) if ok[i] and t0 <= done_at[i] <= duration)
    point: dict = {"offered_rps": n / duration, "achieved_rps": window / (duration - t0), "submitted": n,
                   "counted": len(counted), "missed": sum(1 for v in lat.values() if v == math.inf), "kinds": {}}
    worst = 0.0
    for kind in sorted({s.kind for _, s in plan}):
        idx = [i for i in counted if plan[i][1].kind == kind]
        row = {"requests": len(idx), "latency_ms": _summary([lat[i] for i in idx])}
        metric = [lat[i] for i in idx]
        if kind == "generate":
            metric = [lat[i] / solo(plan[i][1]) for i in idx]
            row["slowdown"] = _summary(metric)
        row["slo_attainment"] = sum(1 for v in metric if v <= targets[kind]) / len(idx)
        worst = max(worst, (row["slowdown"] if kind == "generate" else row["latency_ms"])["p99"] / targets[kind])
        point["kinds"][kind] = row
    point["worst_p99_over_target"] = worst
    if stats:
        point["runtime"] = {"batch_size_mean": {k: (v["batch_size"] or {}).get("mean") for k, v in stats["kinds"].items()},
                            "step_rows_mean": {b: v["rows"]["mean"] for b, v in stats["steps"].items()},
                            "schedule_decision_us": stats["schedule_decision_us"],
                            "text_merge_tokens": stats["text_merge_tokens"]}
    return point


def sweep(name: str, mode: str, run, unit: float, headline: float, top: float, args) -> list[dict]:
    """Probe ``run(rate)`` from a low load up to saturation, then bisect near the headline crossing."""
    points: list[dict] = []
    mult = args.start_sequential if mode == "sequential" else args.start_batched
    over = 0
    while len(points) < args.max_probes:
        p = run(unit * mult)
        points.append(p)
        y = p99_of(p, name)
        over = over + 1 if (y > 1.5 * top or p["achieved_rps"] < 0.85 * p["offered_rps"]) else 0
        if over >= 2 or y > 5 * top:
            break
        mult *= args.factor
    lowest = min(p["offered_rps"] for p in points)
    for _ in range(2):  # the headline is not met even at the lowest load: look lower
        if len(points) >= args.max_probes or p99_of(min(points, key=lambda p: p["offered_rps"]), name) <= headline:
            break
        lowest /= args.factor
        points.append(run(lowest))
    for _ in range(2):  # a probe far over the next higher load's is the shared machine's noise: repeat it
        pts = sorted(points, key=lambda p: p["offered_rps"])
        bad = [k for k in range(len(pts) - 1) if "repeated_p99" not in pts[k]
               and p99_of(pts[k], name) > 2 * p99_of(pts[k + 1], name)]
        if not bad or len(points) >= args.max_probes + 1:
            break
        old = pts[bad[0]]
        points[points.index(old)] = new = run(old["rate"])
        new["repeated_p99"] = p99_of(old, name)  # kept in the JSON: what the discarded probe measured
    for _ in range(args.refine):
        pts = sorted(points, key=lambda p: p["offered_rps"])
        logs = isotonic([math.log(max(min(p99_of(p, name), 1e30), 1e-9)) for p in pts])
        k = bisect.bisect_right(logs, math.log(headline))
        if (k == 0 or k == len(pts) or pts[k]["offered_rps"] / pts[k - 1]["offered_rps"] < 1.12
                or len(points) >= args.max_probes + 1):
            break
        points.append(run(math.sqrt(pts[k]["offered_rps"] * pts[k - 1]["offered_rps"])))
    return sorted(points, key=lambda p: p["offered_rps"])


# --- calibration ------------------------------------------------------------------------------------------------

def solo_seconds(gen, scorers, specs: list[Spec]) -> list[float]:
    """Seconds of each spec run alone on the sequential server's thread (as the sequential mode
    runs them; PyTorch's thread pool can make small ops much slower from the main thread)."""
    server = SequentialServer(gen, scorers)
    server.submit(specs[0]).result()
    out = []
    for s in specs:
        t0 = time.perf_counter()
        server.submit(s).result()
        out.append(time.perf_counter() - t0)
    server.stop(60)
    return out


def fit_solo(gen, scorers, sizes, reps: int) -> dict[int, tuple[float, float]]:
    """Per size, (a, b) of solo latency = a + b * steps (seconds), from 4, 16 and 50 steps."""
    model = {}
    for size in sizes:
        steps = [s for s in (4, 16, 50) for _ in range(reps)]
        secs = solo_seconds(gen, scorers, [Spec("generate", "a solo run", steps=s, size=size, seed=1) for s in steps])
        b, a = np.polyfit(steps, secs, 1)
        model[size] = (float(a), float(b))
    return model


def warm_up(server, specs: list[Spec]) -> None:
    """Every shape each mode will meet, once, so that first-call costs are not measured."""
    concurrent.futures.wait([server.submit(s) for s in specs], timeout=600)
    server.stop(600)


# --- main -------------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of the engines (torch and onnxruntime); 0: the libraries' defaults; "
                         "default: 1 on a CPU, 0 on a GPU")
    ap.add_argument("--scenarios", default="text,generate,mix")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--quick", action="store_true", help="shorter probes, a coarser sweep: a few minutes")
    ap.add_argument("--text-duration", type=float, default=None, help="seconds per probe (default 6; quick 4)")
    ap.add_argument("--generate-duration", type=float, default=None, help="default 20; quick 12")
    ap.add_argument("--mix-duration", type=float, default=None, help="default 12; quick 8")
    ap.add_argument("--grace", type=float, default=6.0, help="seconds after the last arrival before giving up")
    ap.add_argument("--factor", type=float, default=None, help="load step of the sweep (default 1.6; quick 2)")
    ap.add_argument("--start-sequential", type=float, default=0.4, help="first load, x sequential capacity")
    ap.add_argument("--start-batched", type=float, default=0.6, help="first load of the batched modes")
    ap.add_argument("--max-probes", type=int, default=7, help="per mode and scenario (one more to repeat a noisy one)")
    ap.add_argument("--refine", type=int, default=None, help="bisections near the headline (default 2; quick 1)")
    ap.add_argument("--sizes", default="64,128", help="the two generation resolutions (pixels)")
    ap.add_argument("--text-targets-ms", default="25,50,100", help="p99 latency targets of text scoring (ms)")
    ap.add_argument("--headline-text-ms", type=float, default=100.0)
    ap.add_argument("--slowdown-targets", default="3,5,10,20", help="p99 slowdown targets of generation")
    ap.add_argument("--headline-slowdown", type=float, default=10.0)
    ap.add_argument("--latency-targets-x-slowest", default="2,3,5",
                    help="raw p99 latency targets of generation, x the slowest request's solo latency")
    ap.add_argument("--slo-image-ms", type=float, default=100.0, help="the mix scenario's image target")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=4.0)
    ap.add_argument("--batch-wait", choices=["adaptive", "fixed"], default="adaptive",
                    help="RuntimeConfig.batch_wait of the batched modes")
    ap.add_argument("--max-step-rows", type=int, default=32)
    ap.add_argument("--slowdown-target", type=float, default=None,
                    help="RuntimeConfig.slowdown_target of the runtime modes (default: the runtime's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--update", action="store_true",
                    help="keep the other scenarios of the results file, replace only those run now")
    ap.add_argument("--resummarize", default=None, metavar="JSON", help="recompute summaries and plot of a results file")
    args = ap.parse_args()
    quick = args.quick
    for name, full, short in (("text_duration", 6.0, 4.0), ("generate_duration", 20.0, 12.0),
                              ("mix_duration", 12.0, 8.0), ("factor", 1.6, 2.0), ("refine", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if quick:
        args.max_probes = min(args.max_probes, 5)
    if args.threads is None:
        args.threads = 0 if args.device.startswith("cuda") else 1
    return args


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("fastgen", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.resummarize:
        path = Path(args.resummarize)
        result = json.loads(path.read_text())
        for name, sc in result["scenarios"].items():
            summarize(name, sc)
            logger.info("%s: %s", name, json.dumps(sc.get("goal") or sc["capacity"]))
        write(result, path)
        return 0
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    build = BuildConfig(backend=args.backend, device=args.device, precision=args.precision,
                        export=ExportConfig(verify="opt"), execution=ExecutionOptions(intra_op_threads=args.threads))
    gen = Generator.from_pretrained(args.preset, backend=args.backend, device=args.device, precision=args.precision,
                                    profile=f"batch=1:8:{args.max_step_rows},height={min(sizes)}:{sizes[0]}:"
                                            f"{max(sizes)},width={min(sizes)}:{sizes[0]}:{max(sizes)}",
                                    build_config=build)
    scorers = {kind: Scorer(fastgen.build(args.preset, component=comp, config=build))
               for kind, comp in (("text", "text-classifier"), ("image", "classifier"))}
    rng = random.Random(args.seed)
    texts = text_pool(scorers["text"].tokenizer, rng)
    np_rng = np.random.default_rng(args.seed)
    images = [np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (96, 128), (80, 80))] * 4
    pool = Workload(SCENARIO_KINDS["mix"], "warm", texts, images, sizes)
    warm = [pool.spec(k) for k in ("text", "image") for _ in range(64)]
    warm += [Spec("generate", "warm up", steps=s, size=z, seed=1) for z in sizes for s in (2, 3, 4, 5, 6, 7, 8, 9)]
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        warm_up(server_for(mode, gen, scorers, args), warm)

    # The unit of load: each kind's mean solo service time, on the sequential server's thread.
    scenarios = [s for s in args.scenarios.split(",") if s]
    kinds_needed = {k for name in scenarios for k in SCENARIO_KINDS[name]}
    service = {k: float(np.mean(solo_seconds(gen, scorers, [pool.spec(k) for _ in range(60)])))
               for k in ("text", "image") if k in kinds_needed}
    solo_model: dict = {}
    if "generate" in kinds_needed:
        solo_model = fit_solo(gen, scorers, sizes, reps=1 if args.quick else 2)
        mean_steps = 27.0  # uniform over 4..50
        service["generate"] = sum(share * (solo_model[z][0] + solo_model[z][1] * mean_steps)
                                  for z, share in ((sizes[0], 0.7), (sizes[-1], 0.3)))
    solo = lambda spec: 1e3 * (solo_model[spec.size][0] + solo_model[spec.size][1] * spec.steps)  # noqa: E731
    logger.info("solo service time: %s ms; generation solo model (a ms, b ms/step): %s",
                {k: round(v * 1e3, 2) for k, v in service.items()},
                {z: (round(a * 1e3, 1), round(b * 1e3, 2)) for z, (a, b) in solo_model.items()})

    text_targets = floats(args.text_targets_ms)
    slow_targets = floats(args.slowdown_targets)
    slowest_ms = solo(Spec("generate", steps=50, size=max(sizes))) if solo_model else 0.0
    ms_targets = [round(x * slowest_ms) for x in floats(args.latency_targets_x_slowest)]
    kind_targets = {"text": args.headline_text_ms, "image": args.slo_image_ms, "generate": args.headline_slowdown}
    result: dict = {
        "benchmark": "load", "preset": args.preset, "backend": args.backend, "device": device_name(args),
        "device_kind": "GPU" if args.device.startswith("cuda") else "CPU", "precision": args.precision,
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "versions": {"fastgen": fastgen.__version__, "torch": torch.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "method": "see the docstring of benchmarks/bench_load.py",
        "service_time_alone_ms": {k: v * 1e3 for k, v in service.items()},
        "generation_solo_model_ms": {str(z): {"a": a * 1e3, "b_per_step": b * 1e3} for z, (a, b) in solo_model.items()},
        "scenarios": {},
    }
    for name in scenarios:
        kinds = SCENARIO_KINDS[name]
        unit = 1.0 / sum(share * service[k] for k, share in kinds.items())
        duration = {"text": args.text_duration, "generate": args.generate_duration, "mix": args.mix_duration}[name]
        targets = {"text": {"text": text_targets}, "generate": {"generate": slow_targets, "generate_ms": ms_targets},
                   "mix": {"mix": [1.0]}}[name]
        headline = {"text": args.headline_text_ms, "generate": args.headline_slowdown, "mix": 1.0}[name]
        sc: dict = {"kinds": kinds, "targets": targets, "headline": headline, "kind_targets": kind_targets,
                    "metric_units": {"text": "p99 latency (ms)", "generate": "p99 slowdown (latency / solo latency)",
                                     "generate_ms": "p99 latency (ms)", "mix": "worst kind's p99 / its target"},
                    "probe_duration_s": duration, "sequential_capacity_rps": unit, "modes": {}}
        # A request that arrives near a probe's end may take the headline slowdown times its solo time
        # and still meet it: wait that long for the slowest kind before counting anything as missed.
        grace = args.grace if "generate" not in kinds else max(args.grace, args.headline_slowdown * slowest_ms / 1e3)
        sc["grace_s"] = grace
        logger.info("%s: sequential capacity %.2f requests/s, probes of %.0f s (+ up to %.0f s)", name, unit,
                    duration, grace)
        work = Workload(kinds, f"{args.seed}-{name}", texts, images, sizes)
        for mode in modes:
            def run(rate: float, mode=mode, work=work, duration=duration, grace=grace) -> dict:
                # What a service does once loaded: move everything alive now (the models, the
                # libraries, this script's request plans) out of the garbage collector's sight. A full
                # collection otherwise walks every object torch and transformers created, a 0.3 s pause
                # on this machine, whenever the plans of the larger loads have grown the heap enough.
                gc.collect()
                gc.freeze()
                p = run_point(server_for(mode, gen, scorers, args), work.plan(rate, duration), duration, grace,
                              kind_targets, solo)
                p["rate"] = rate
                logger.info("  %-10s offered %7.2f/s achieved %7.2f/s  %s", mode, p["offered_rps"], p["achieved_rps"],
                            ", ".join(f"{k} p50 {v['latency_ms']['p50']:.0f} p99 {v['latency_ms']['p99']:.0f} ms"
                                      + (f" (slowdown p99 {v['slowdown']['p99']:.1f})" if "slowdown" in v else "")
                                      for k, v in p["kinds"].items()))
                return p

            sc["modes"][mode] = sweep(name, mode, run, unit, headline, max(targets[name]), args)
        summarize(name, sc)
        logger.info("%s: %s", name, json.dumps(sc.get("goal") or sc["capacity"]))
        result["scenarios"][name] = sc

    result["schedule_decision_us_1000_queued"] = scheduling_decisions(random.Random(args.seed))
    logger.info("scheduling decision with 1000 queued: %s us", result["schedule_decision_us_1000_queued"])
    result["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out or Path(__file__).parent / "results" / f"load_{args.preset}_{args.backend}_{args.device}.json")
    for sc in result["scenarios"].values():
        sc["run"] = {"command": result["command"], "date": result["date"], "versions": result["versions"]}
    if args.update and out.exists():  # replace only the scenarios run now; each keeps its own run
        old = json.loads(out.read_text())
        old["scenarios"].update(result["scenarios"])
        old.update({k: v for k, v in result.items() if k not in ("scenarios", "service_time_alone_ms",
                                                                    "generation_solo_model_ms", "settings")})
        for key in ("service_time_alone_ms", "generation_solo_model_ms"):
            old[key] = {**old.get(key, {}), **result[key]}
        result = old
    write(result, out)
    return 0


def device_name(args) -> str:
    if args.device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(0)}"
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} intra-op thread(s)"


if __name__ == "__main__":
    sys.exit(main())
