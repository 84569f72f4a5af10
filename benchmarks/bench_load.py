"""Load benchmark: open-loop Poisson arrivals against three ways of serving the same engines.

    python benchmarks/bench_load.py --backend torch --duration 8          # CPU, tiny preset
    python benchmarks/bench_load.py --backend onnxruntime --duration 8
    python benchmarks/bench_load.py --backend torch --device cuda --preset sd15 --sizes 512,768 ...

Modes, compared in one run on the very same engines:

- ``sequential``: per-request execution, first come first served: ``Generator.generate`` /
  ``Scorer.score_texts`` / ``Scorer.score_images`` on each request alone, on one thread;
- ``request``: request-level dynamic batching (``fastgen.Runtime`` with no text length buckets, each
  batch padded to its longest text, and static generation batches that form only once the last
  batch has finished: what Triton / Ray Serve style batching of whole requests gives);
- ``step``: fastgen (length buckets for texts; step-level continuous batching for generation).

Scenarios: ``text`` (texts with a long-tailed length: most under 20 tokens, some near 128),
``generate`` (4 to 50 steps, two resolutions, guidance 7.5) and ``mix`` (both, plus images). Each
mode is swept over offered loads (multiples of the sequential server's measured capacity) until it
saturates. Latency is measured from each request's *scheduled* arrival (no coordinated omission);
requests not done ``--grace`` seconds after the last arrival count as missed. Reports throughput,
p50 / p99 latency and SLO attainment per point, the throughput each mode sustains with its p99
within the SLO, and plots p99 latency against offered load (matplotlib, when installed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import math
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

import fastgen
from fastgen.engines.config import BuildConfig
from fastgen.export.config import ExportConfig
from fastgen.pipelines.generator import Generator
from fastgen.pipelines.scorer import Scorer
from fastgen.runtime import GenerateRequest, Runtime, ScoreRequest
from fastgen.runtime.metrics import percentile

logger = logging.getLogger("bench_load")
MODES = ("sequential", "request", "step")
MIX = {"text": 0.7, "image": 0.2, "generate": 0.1}  # the mix scenario's share of requests
SCENARIO_KINDS = {"text": {"text": 1.0}, "generate": {"generate": 1.0}, "mix": MIX}


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


def make_spec(kind: str, rng: random.Random, texts, images, sizes) -> Spec:
    if kind == "text":
        return Spec("text", rng.choice(texts)[0])
    if kind == "image":
        return Spec("image", rng.choice(images))
    return Spec("generate", rng.choice(texts)[0][:200], steps=rng.randint(4, 50),
                size=sizes[0] if rng.random() < 0.7 else sizes[-1], seed=rng.randrange(2**31))


def arrivals(rate: float, duration: float, kinds: dict[str, float], rng: random.Random, texts, images, sizes):
    """Open-loop Poisson arrivals: (time offset, spec), exponential gaps at ``rate`` per second."""
    t, out = 0.0, []
    names, weights = list(kinds), list(kinds.values())
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, make_spec(rng.choices(names, weights)[0], rng, texts, images, sizes)))


# --- servers ------------------------------------------------------------------------------------------------

class SequentialServer:
    """Each request run alone, in arrival order, on one thread."""

    def __init__(self, gen: Generator, scorers: dict[str, Scorer]) -> None:
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


def run_alone(gen, scorers, spec: Spec):
    if spec.kind == "text":
        return scorers["text"].score_texts([spec.item])[0]
    if spec.kind == "image":
        return scorers["image"].score_images([spec.item])[0]
    return gen.generate(spec.item, steps=spec.steps, height=spec.size, width=spec.size, seed=spec.seed,
                        scheduler="euler", output_type="uint8", progress=False)


class RuntimeServer:
    def __init__(self, gen, scorers: dict[str, Scorer], mode: str, args) -> None:
        cfg = dict(max_queue=10**6, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                   max_step_rows=args.max_step_rows)
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
        return self.rt.stats()


# --- one load point -------------------------------------------------------------------------------------------

def run_point(server, plan, duration: float, grace: float, slo_ms: dict[str, float]) -> dict:
    n = len(plan)
    done_at = [math.inf] * n
    ok = [False] * n
    start = time.perf_counter() + 0.05

    def mark(i: int, fut) -> None:
        done_at[i] = time.perf_counter()
        ok[i] = not fut.cancelled() and fut.exception() is None

    for i, (offset, spec) in enumerate(plan):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        server.submit(spec).add_done_callback(lambda f, i=i: mark(i, f))
    stats = server.stop(max(start + duration + grace - time.perf_counter(), 0.0))
    lat = [(done_at[i] - start - plan[i][0]) * 1e3 if ok[i] else math.inf for i in range(n)]
    last = max((d for d, good in zip(done_at, ok) if good), default=start + duration)
    span = max(last - start, duration)
    point: dict = {"offered_rps": n / duration, "submitted": n, "completed": sum(ok),
                   "achieved_rps": sum(ok) / span, "kinds": {}}
    for kind in sorted({s.kind for _, s in plan}):
        idx = [i for i in range(n) if plan[i][1].kind == kind]
        ks = sorted(lat[i] for i in idx)
        # Generation's SLO is on latency per denoising step (a 50-step request may take 12x a 4-step one;
        # per step, a short request stuck behind long ones shows); scoring's on latency.
        metric = sorted(lat[i] / plan[i][1].steps for i in idx) if kind == "generate" else ks
        good = sum(1 for x in metric if x <= slo_ms[kind])
        point["kinds"][kind] = {"requests": len(ks), "completed": sum(1 for x in ks if x < math.inf),
                                "achieved_rps": sum(1 for x in ks if x < math.inf) / span,
                                "p50_ms": percentile(ks, 50), "p99_ms": percentile(ks, 99),
                                "slo_metric": "ms per step" if kind == "generate" else "ms",
                                "p50_slo_metric": percentile(metric, 50), "p99_slo_metric": percentile(metric, 99),
                                "slo": slo_ms[kind], "slo_attainment": good / len(ks)}
    if stats:
        point["runtime"] = {"batch_size_mean": {k: (v["batch_size"] or {}).get("mean") for k, v in stats["kinds"].items()},
                            "step_rows_mean": {b: v["rows"]["mean"] for b, v in stats["steps"].items()},
                            "step_ms_p50": {b: v["latency_ms"]["p50"] for b, v in stats["steps"].items()},
                            "schedule_decision_us": stats["schedule_decision_us"]}
    return point


def meets_slo(point: dict) -> bool:
    return all(k["p99_slo_metric"] <= k["slo"] for k in point["kinds"].values())


def saturated(point: dict) -> bool:
    return point["achieved_rps"] < 0.8 * point["offered_rps"] or any(
        k["p99_slo_metric"] > 3 * k["slo"] for k in point["kinds"].values())


def capacity(points: list[dict], scale: float = 1.0) -> dict | None:
    """The highest-throughput point whose p99 meets ``scale`` times the SLO of every kind."""
    good = [p for p in points if all(k["p99_slo_metric"] <= scale * k["slo"] for k in p["kinds"].values())]
    return max(good, key=lambda p: p["achieved_rps"]) if good else None


GOALS = {"text": ("step", "sequential", "text scoring with length buckets vs per-request execution (goal >= 3x)"),
         "generate": ("step", "request", "step-level vs request-level generation (goal >= 1.3x)")}


def summarize(name: str, sc: dict) -> None:
    """Throughput each mode sustains within the SLO (and within 0.5x to 4x of it: one SLO is one point
    of view), and the goal ratio where the scenario has one."""
    caps = {m: capacity(p) for m, p in sc["modes"].items()}
    sc["throughput_at_slo"] = {m: (c["achieved_rps"] if c else 0.0) for m, c in caps.items()}
    sc["p99_slo_metric_at_that_throughput"] = {
        m: ({k: v["p99_slo_metric"] for k, v in c["kinds"].items()} if c else None) for m, c in caps.items()}
    sc["throughput_at_slo_multiples"] = {
        str(scale): {m: (capacity(p, scale) or {}).get("achieved_rps", 0.0) for m, p in sc["modes"].items()}
        for scale in (0.5, 1.0, 2.0, 4.0)}
    if name in GOALS:
        ours, base, label = GOALS[name]
        ratios = {}
        for scale, t in sc["throughput_at_slo_multiples"].items():
            ratios[scale] = (t.get(ours, 0.0) / t[base]) if t.get(base) else (math.inf if t.get(ours) else None)
        sc["goal"] = {label: ratios["1.0"], "at SLO multiples": ratios}


# --- main ---------------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(0)}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.machine()} ({torch.get_num_threads()} threads)"


def service_time(gen, scorers, specs: list[Spec]) -> float:
    """Mean seconds per request run alone, on the sequential server's own thread (not the main one:
    PyTorch's intra-op thread pool makes some small ops much slower there on a busy machine)."""
    server = SequentialServer(gen, scorers)
    server.submit(specs[0]).result()
    t0 = time.perf_counter()
    for fut in [server.submit(s) for s in specs]:
        fut.result()
    seconds = (time.perf_counter() - t0) / len(specs)
    server.stop(60)
    return seconds


def warm_up(server, specs: list[Spec]) -> None:
    """A burst of every kind, so that first-call costs (allocator, kernels per shape) are not measured."""
    futures = [server.submit(s) for s in specs]
    concurrent.futures.wait(futures, timeout=600)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    scenarios = result["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.2), squeeze=False)
    for ax, (name, sc) in zip(axes[0], scenarios.items()):
        kind = "text" if name in ("text", "mix") else "generate"
        for mode, points in sc["modes"].items():
            xs = [p["offered_rps"] for p in points]
            ax.plot(xs, [min(p["kinds"][kind]["p99_slo_metric"], 1e6) for p in points], "o-", label=f"{mode} p99")
            ax.plot(xs, [min(p["kinds"][kind]["p50_slo_metric"], 1e6) for p in points], ":",
                    color=ax.lines[-1].get_color())
        ax.axhline(sc["slo"][kind], color="grey", linestyle="--", label="SLO")
        unit = "latency per step" if kind == "generate" else "latency"
        ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s)", ylabel=f"{kind} {unit} (ms)",
               title=f"{name} ({result['backend']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    logger.info("wrote %s", path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--scenarios", default="text,generate,mix")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per load point (text)")
    ap.add_argument("--generate-duration", type=float, default=30.0,
                    help="seconds of arrivals per load point of the generate and mix scenarios (slower requests)")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds after the last arrival before giving up")
    ap.add_argument("--loads", default="0.25,0.5,0.75,1,1.25,1.5,2,2.5,3,4,5,6,8,10,12,16",
                    help="offered loads as multiples of the sequential server's measured capacity")
    ap.add_argument("--sizes", default="64,128", help="the two generation resolutions (pixels)")
    ap.add_argument("--slo-text-ms", type=float, default=100.0)
    ap.add_argument("--slo-image-ms", type=float, default=100.0)
    ap.add_argument("--slo-generate-ms-per-step", type=float, default=None,
                    help="generation SLO on latency per step; default: 3x the solo latency per step of the "
                         "slowest request (50 steps at the larger size)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=4.0)
    ap.add_argument("--max-step-rows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the whole run (every mode alike); default: Python's 5 ms. "
                         "Client and device threads share the GIL: a shorter interval shortens GIL hand-offs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="recompute the summaries and the plot of a results file, and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("fastgen", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.resummarize:
        path = Path(args.resummarize)
        result = json.loads(path.read_text())
        for name, sc in result["scenarios"].items():
            summarize(name, sc)
            logger.info("%s: %s", name, json.dumps(sc.get("goal") or sc["throughput_at_slo"]))
        write(result, path)
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    build = BuildConfig(export=ExportConfig(verify="opt"))
    gen = Generator.from_pretrained(args.preset, backend=args.backend, device=args.device, precision=args.precision,
                                    profile=f"batch=1:8:{args.max_step_rows},height={min(sizes)}:{sizes[0]}:"
                                            f"{max(sizes)},width={min(sizes)}:{sizes[0]}:{max(sizes)}",
                                    build_config=build)
    scorers = {kind: Scorer.from_pretrained(args.preset, comp, backend=args.backend, device=args.device,
                                            precision=args.precision)
               for kind, comp in (("text", "text-classifier"), ("image", "classifier"))}
    rng = random.Random(args.seed)
    texts = text_pool(scorers["text"].tokenizer, rng)
    np_rng = np.random.default_rng(args.seed)
    images = [np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (96, 128), (80, 80))] * 4
    warm = [make_spec(k, rng, texts, images, sizes) for k in ("text", "image") for _ in range(64)]
    warm += [Spec("generate", "warm up", steps=s, size=z, seed=1) for z in sizes for s in (2, 3, 4, 5, 6, 7, 8, 9)]
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:  # every shape each mode will meet, once, before anything is timed
        server = SequentialServer(gen, scorers) if mode == "sequential" else RuntimeServer(gen, scorers, mode, args)
        warm_up(server, warm)
        server.stop(600)
    # Each kind's mean service time alone, on the sequential server's thread: the unit of offered load.
    kinds_needed = {k for name in args.scenarios.split(",") if name for k in SCENARIO_KINDS[name]}
    counts = {"text": 60, "image": 30, "generate": 16}
    service = {k: service_time(gen, scorers, [make_spec(k, rng, texts, images, sizes) for _ in range(counts[k])])
               for k in sorted(kinds_needed)}
    logger.info("service time alone: %s ms", {k: round(v * 1e3, 2) for k, v in service.items()})
    if args.slo_generate_ms_per_step is None:
        slowest = Spec("generate", "the slowest request", steps=50, size=max(sizes), seed=0)
        args.slo_generate_ms_per_step = 3e3 * service_time(gen, scorers, [slowest, slowest]) / 50
        logger.info("generation SLO: %.1f ms per step (3x the solo latency per step of 50 steps at %d px)",
                    args.slo_generate_ms_per_step, max(sizes))
    slo = {"text": args.slo_text_ms, "image": args.slo_image_ms, "generate": args.slo_generate_ms_per_step}
    lengths = sorted(n for _, n in texts)
    logger.info("text lengths: median %d tokens, p90 %d, max %d", lengths[len(lengths) // 2],
                lengths[int(0.9 * len(lengths))], lengths[-1])

    result: dict = {
        "benchmark": "load", "preset": args.preset, "backend": args.backend, "device": device_name(args.device),
        "precision": args.precision, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "versions": {"fastgen": fastgen.__version__, "torch": torch.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "scenarios": {},
    }
    for name in [s for s in args.scenarios.split(",") if s]:
        kinds = SCENARIO_KINDS[name]
        seq_capacity = 1.0 / sum(share * service[k] for k, share in kinds.items())
        logger.info("%s: sequential service capacity %.1f requests/s", name, seq_capacity)
        sc: dict = {"kinds": kinds, "slo": slo, "slo_metric": {"generate": "ms per step", "text": "ms", "image": "ms"},
                    "service_time_alone_ms": {k: service[k] * 1e3 for k in kinds},
                    "sequential_capacity_rps": seq_capacity, "modes": {}}
        for mode in modes:
            points = []
            for mult in (float(x) for x in args.loads.split(",")):
                rate = seq_capacity * mult
                duration = args.duration if name == "text" else args.generate_duration
                plan = arrivals(rate, duration, kinds, random.Random(f"{args.seed}-{name}-{mult}"),
                                texts, images, sizes)
                server = SequentialServer(gen, scorers) if mode == "sequential" else RuntimeServer(gen, scorers, mode,
                                                                                                  args)
                point = run_point(server, plan, duration, args.grace, slo)
                point["load_multiple"] = mult
                points.append(point)
                summary = ", ".join(f"{k} p50 {v['p50_ms']:.0f} p99 {v['p99_ms']:.0f} ms (p99 {v['p99_slo_metric']:.1f} "
                                    f"{v['slo_metric']}) SLO {v['slo_attainment']:.0%}" for k, v in point["kinds"].items())
                logger.info("  %-10s offered %7.1f/s achieved %7.1f/s  %s", mode, point["offered_rps"],
                            point["achieved_rps"], summary)
                # Two saturated points in a row end the sweep (one may be a burst of noise on a shared machine).
                if saturated(point) and len(points) > 1 and saturated(points[-2]):
                    break
            sc["modes"][mode] = points
        summarize(name, sc)
        logger.info("%s: throughput at the p99 SLO %s %s", name,
                    {m: round(v, 1) for m, v in sc["throughput_at_slo"].items()}, sc.get("goal", ""))
        result["scenarios"][name] = sc

    from fastgen.runtime.config import RuntimeConfig
    from fastgen.runtime.requests import RequestStatus
    from fastgen.runtime.scheduler import GENERATE, Job, Scheduler

    # Scheduling decisions with 1,000 requests queued (as tests/runtime/test_scheduler_bench.py).
    clock = [0.0]
    sched = Scheduler(RuntimeConfig(max_queue=4000, max_wait_ms=0), clock=lambda: clock[0])
    ids = iter(range(10**9))
    timings = []
    for _ in range(3000):
        clock[0] += 0.001
        while sched.queued < 1000:
            kind = rng.choice(("text", "text", "image", GENERATE))
            bucket = rng.choice((16, 32, 64, 128)) if kind == "text" else (64, 64)
            sched.submit(Job(next(ids), kind, bucket, priority=rng.randrange(3), rows=2 if kind == GENERATE else 1,
                             deadline=clock[0] + 5 if rng.random() < 0.3 else None))
        for j in sched.active():
            if rng.random() < 0.2:
                sched.finish(j, RequestStatus.SUCCEEDED)
        t0 = time.perf_counter()
        sched.schedule()
        timings.append((time.perf_counter() - t0) * 1e6)
    timings.sort()
    result["schedule_decision_us_1000_queued"] = {"p50": percentile(timings, 50), "p99": percentile(timings, 99),
                                                  "mean": sum(timings) / len(timings)}
    logger.info("scheduling decision with 1000 queued: %s us", result["schedule_decision_us_1000_queued"])

    write(result, Path(args.out or Path(__file__).parent / "results" /
                       f"load_{args.preset}_{args.backend}_{args.device}.json"))
    return 0


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")  # a missed request's latency is Infinity
    tmp.replace(out)
    logger.info("wrote %s", out)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
