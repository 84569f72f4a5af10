"""Reading a load benchmark's results: capacity at a p99 target, goal ratios, the plot, the JSON,
and the scheduling-decision timing. Used by ``bench_load.py`` (its docstring has the method)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

from fastgen.core.stats import percentile

WARMUP_FRACTION = 0.1
"""Requests arriving in a probe's first 10% are served but not counted (the queue starts empty)."""

logger = logging.getLogger("bench_load")
GOALS = {"text": ("step", "sequential", "text scoring with length buckets vs per-request execution, goal >= 3x"),
         "generate": ("step", "request", "step-level vs request-level generation, goal >= 1.3x")}

# --- reading capacity off the curves --------------------------------------------------------------------------

METRICS = {"text": ("text", "latency_ms"), "generate": ("generate", "slowdown"),
           "generate_ms": ("generate", "latency_ms"), "mix": (None, "worst_p99_over_target")}


def drive(server, plan, duration: float, grace: float) -> tuple[list[float], list[bool], dict]:
    """Submit ``plan``'s requests (``(offset_s, spec)``) at their offsets to ``server`` (``submit(spec)
    -> Future``, ``stop(grace) -> dict``), open loop; each request's completion in seconds after the
    start (inf: never), whether it succeeded, and what ``stop`` returned."""
    n = len(plan)
    done_at = [math.inf] * n
    ok = [False] * n
    start = time.perf_counter() + 0.05

    def mark(i: int, fut) -> None:
        done_at[i] = time.perf_counter() - start
        ok[i] = not fut.cancelled() and fut.exception() is None

    for i, (offset, spec) in enumerate(plan):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        server.submit(spec).add_done_callback(lambda f, i=i: mark(i, f))
    stats = server.stop(max(start + duration + grace - time.perf_counter(), 0.0))
    return done_at, ok, stats


def p99_of(point: dict, metric: str) -> float:
    kind, field = METRICS[metric]
    value = point[field] if kind is None else point["kinds"][kind][field]["p99"]
    return math.inf if value is None else value


def isotonic(ys: list[float]) -> list[float]:
    """Non-decreasing least-squares fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


def capacity_at(points: list[dict], metric: str, target: float) -> dict:
    """Throughput where the (isotonic) p99 curve crosses ``target``, interpolated between probes."""
    pts = sorted(points, key=lambda p: p["offered_rps"])
    big = math.log(target) + 50.0  # a missed request: far over any target, but finite for the fit
    logs = isotonic([min(math.log(max(p99_of(p, metric), 1e-9)), big) for p in pts])
    goal = math.log(target)
    if logs[0] > goal:
        return {"rps": 0.0, "offered_rps": 0.0, "bound": "not met", "lowest_probe_rps": pts[0]["offered_rps"]}
    i = max(k for k, y in enumerate(logs) if y <= goal)
    if i == len(pts) - 1:
        p = pts[i]
        return {"rps": p["goodput_rps"], "offered_rps": p["offered_rps"], "achieved_rps": p["achieved_rps"],
                "bound": "lower bound"}
    a, b = pts[i], pts[i + 1]
    frac = 0.0 if logs[i + 1] == logs[i] else (goal - logs[i]) / (logs[i + 1] - logs[i])
    lerp = lambda key: a[key] + frac * (b[key] - a[key])  # noqa: E731
    return {"rps": lerp("goodput_rps"), "offered_rps": lerp("offered_rps"), "achieved_rps": lerp("achieved_rps"),
            "bound": "interpolated"}


def goodput(point: dict, duration: float) -> float:
    """Requests per second that arrived in the measured window (after the warm-up) and completed,
    however late (within the grace): the rate the server sustains. Completions counted inside the
    window (``achieved_rps``) instead undercount a server that finishes long requests later, as
    earliest-deadline-first order does by design, even when every request meets its target."""
    return (point["counted"] - point["missed"]) / (duration * (1.0 - WARMUP_FRACTION))


def summarize(name: str, sc: dict) -> None:
    """Capacity of every mode at every target of the scenario's metrics, and the goal ratios."""
    sc["capacity"] = {}
    for pts in sc["modes"].values():
        for p in pts:
            p["goodput_rps"] = goodput(p, sc["probe_duration_s"])
    for metric, targets in sc["targets"].items():
        sc["capacity"][metric] = {str(t): {m: capacity_at(pts, metric, t) for m, pts in sc["modes"].items() if pts}
                                  for t in targets}
    if name not in GOALS:
        return
    ours, base, label = GOALS[name]
    ratios = {}
    for t, caps in sc["capacity"][name].items():
        if ours not in caps or base not in caps:
            continue
        o, b = caps[ours], caps[base]
        if o["bound"] == "not met":  # over the target even at its lowest probe: say so, not 0x
            ratios[t] = {"ratio": None, "bound": f"not met at its lowest probe ({o['lowest_probe_rps']:.3g}/s)"}
            continue
        ratio = o["rps"] / b["rps"] if b["rps"] > 0 else (math.inf if o["rps"] > 0 else None)
        kind = ("lower bound" if o["bound"] == "lower bound" or b["bound"] == "not met" else
                "upper bound" if b["bound"] == "lower bound" else "interpolated")
        ratios[t] = {"ratio": None if ratio in (None, math.inf) else ratio, "bound": kind}
    head = ratios.get(str(sc["headline"]), {})
    sc["goal"] = {"label": label, "metric": sc["metric_units"][name], "headline_target": sc["headline"],
                  "ratio_at_headline": head.get("ratio"), "bound_at_headline": head.get("bound"),
                  "ratio_by_target": ratios}


# --- output ---------------------------------------------------------------------------------------------------

PANELS = [("text", "text", "text p99 latency (ms)"), ("generate", "generate", "generation p99 slowdown"),
          ("generate", "generate_ms", "generation p99 latency (ms)"), ("mix", "mix", "mix: worst p99 / target")]


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    panels = [(s, m, y) for s, m, y in PANELS if s in result["scenarios"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.3), squeeze=False)
    for ax, (name, metric, ylabel) in zip(axes[0], panels):
        sc = result["scenarios"][name]
        for mode, pts in sc["modes"].items():
            xs = [p["offered_rps"] for p in pts]
            line, = ax.plot(xs, [min(p99_of(p, metric), 1e7) for p in pts], "o-", ms=3, label=f"{mode} p99")
            if metric != "mix":
                kind, field = METRICS[metric]
                ax.plot(xs, [min(p["kinds"][kind][field]["p50"] or math.inf, 1e7) for p in pts], ":", color=line.get_color())
            for t in sc["targets"][metric]:
                cap = sc["capacity"][metric][str(t)].get(mode)
                if cap and cap["bound"] == "interpolated":
                    ax.plot([cap["offered_rps"]], [t], "x", color=line.get_color(), ms=8)
        for t in sc["targets"][metric]:
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.7)
        ax.set(xscale="log", yscale="log", xlabel="offered load (requests/s)", ylabel=ylabel,
               title=f"{name} ({result['backend']}, {result['device_kind']})")
        ax.legend(fontsize=7, title="dotted: p50; x: capacity at a target", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    logger.info("wrote %s", path)


def write(result: dict, out: Path) -> None:
    def clean(v):  # missed requests are infinite latency: null in the JSON
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else (
            [clean(x) for x in v] if isinstance(v, list) else v)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(result), indent=1) + "\n")
    tmp.replace(out)
    logger.info("wrote %s", out)
    plot(result, out.with_suffix(".png"))


def scheduling_decisions(rng: random.Random, rounds: int = 3000) -> dict:
    """One decision with 1,000 queued, as tests/runtime/test_request_scheduler_bench.py (its workload)."""
    from fastgen.runtime.config import RuntimeConfig
    from fastgen.runtime.request_scheduler import GENERATE, Job, RequestScheduler
    from fastgen.runtime.requests import RequestStatus

    clock = [0.0]
    sched = RequestScheduler(RuntimeConfig(max_queue=2000, max_batch_size=32, max_wait_ms=0, max_step_rows=16),
                      clock=lambda: clock[0])
    sched.set_merge_cost("text", 64.0)
    ids = iter(range(10**9))
    timings = []
    for _ in range(rounds):
        clock[0] += 0.001
        for j in sched.active():
            if rng.random() < 0.2:
                sched.finish(j, RequestStatus.SUCCEEDED)
        while sched.queued < 1000:
            r = rng.random()
            if r < 0.6:
                kind, bucket, rows = "text", rng.choice((16, 16, 16, 32, 64, 128)), 1
            else:
                kind, bucket, rows = ("image", (64, 64), 1) if r < 0.8 else (GENERATE, rng.choice(((64, 64), (128, 128))), 2)
            sched.submit(Job(next(ids), kind, bucket, priority=rng.randrange(3), rows=rows,
                             cost=float(bucket) if kind == "text" else 4096.0 if kind == "image" else 2.0,
                             deadline=clock[0] + 5 if rng.random() < 0.3 else None))
        t0 = time.perf_counter()
        d = sched.schedule()
        timings.append((time.perf_counter() - t0) * 1e6)
        if d.kind != GENERATE:
            for j in d.jobs:
                sched.finish(j, RequestStatus.SUCCEEDED)
    timings.sort()
    return {"p50": percentile(timings, 50), "p99": percentile(timings, 99), "mean": sum(timings) / len(timings),
            "decisions": rounds}
