"""HTTP serving benchmark: open-loop load through ``fastgen serve`` and Ray Serve against the in-process runtime.

    python benchmarks/bench_http.py                                   # four modes, mix + text (~25 min, 2 cores)
    python benchmarks/bench_http.py --quick --modes inprocess,http    # a few minutes

Method: ``bench_load.py``'s, imported from it (its docstring has the details): open-loop Poisson
arrivals replaying one request sequence per scenario at every load (common random numbers), latency
from each request's scheduled arrival, a warm-up window, a geometric sweep to saturation then
bisection, p99 made non-decreasing in load and the goodput interpolated where it crosses the target.

Modes, one after the other, on the same engines (preset, backend, engine cache, ``RuntimeConfig``,
``--threads``):

- ``inprocess``: the :class:`fastgen.Runtime` a :class:`fastgen.serve.Service` builds from the same
  ``ServeConfig`` (``Service.load``: the server's loading, step-size fit and warm-up), sent the very
  runtime requests the Service sends (PIL images out), no HTTP. The Service's async layer (checks,
  PNG encoding, JSON) and the client's JSON and PNG decoding count as the HTTP layer's cost.
- ``http``: ``python -m fastgen.cli serve PRESET --scorer PRESET --scorer PRESET:text-classifier``
  in a subprocess on loopback (the same engine cache and runtime flags; as shipped: no access log,
  /metrics counts the requests). The client: a process of its own per probe (``http_targets.py client``: the probe's
  plan in, each request's completion out; as a client machine would, it never contends for the
  load generator's GIL), one asyncio loop, keep-alive connections (a minimal HTTP/1.1 client, or
  ``--client aiohttp`` / ``httpx``: see CLIENT_NOTE); every status is checked (not 200:
  failed, i.e. missed), every generated PNG decoded; image scoring sends base64 PNGs encoded once,
  up front. ``GET /healthz`` timed alone gives the HTTP stack's own latency.
- ``ray1``, ``ray2``: :func:`fastgen.serve.ray.run` with 1 and 2 replicas on a local Ray instance
  (``num_cpus=2``), the same client through Ray's proxy. Skipped, with the reason, without Ray.

Threads: ``fastgen serve`` has no intra-op thread setting (onnxruntime then takes a thread per core).
So that every mode runs the engines alike, :func:`pin_threads` gives ``ExecutionOptions`` left
automatic ``--threads`` threads, and torch as many, in this process, the server process and every
Ray worker (a ``worker_process_setup_hook``); ``--threads 0`` changes nothing.

Scenarios: ``mix`` (70% text, 20% image, 10% generation; every kind within its target: text and
image p99 <= 100 ms, generation p99 slowdown <= 10; probes of 30 s, so that a p99 is not one request's) and ``text`` (p99 <= 25 / 50 / 100 ms), which
also runs a low-load probe per mode (``--low-rps``): the difference of its medians is the latency
the HTTP layer adds. The machine's load is recorded before and after every mode and probe.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_load  # noqa: E402
from http_targets import (  # noqa: E402
    MAX_QUEUE,
    HttpTarget,
    InProcessTarget,
    RayTarget,
    RemoteClient,
    cmdline,
    pin_threads,
    proc_ticks,
)
from load_analysis import capacity_at, drive, goodput  # noqa: E402

logger = logging.getLogger("bench_http")
MODES = ("inprocess", "http", "ray1", "ray2")
SCENARIOS = ("mix", "text")
TEXT_TARGETS_MS = (25.0, 50.0, 100.0)
KIND_TARGETS = {"text": 100.0, "image": 100.0, "generate": 10.0}  # ms, ms, p99 slowdown: as bench_load's mix
SIZES = (64, 128)
GRACE_S = 6.0  # seconds after a probe's last arrival before a request counts as missed (generation: more)
#: First load of each sweep, x the sequential capacity: over HTTP, text saturates 10x lower than in-process.
START = {"text": 0.1, "mix": 0.4}
RAY_START = 0.25  # ... and through Ray's proxy 4-10x lower again on 2 shared cores (the sweep goes lower if needed)
CLIENT_NOTE = ("The client is raw by default (benchmarks/raw_http.py): keep-alive connections over asyncio streams "
               "and next to no work per request, as wrk or h2load would be, so that the client takes as little as "
               "possible of the two cores the server is measured on. Client libraries cost more CPU per request: "
               "aiohttp about 0.5 to 1.4 ms (--client aiohttp; text scoring over HTTP then saturated at 1007 instead "
               "of 1441 req/s in the same week's runs), httpx 0.29's AsyncClient 1.8 ms with one connection and 18 ms "
               "with 64 in one pool (httpcore's pool bookkeeping; --client httpx spreads the connections over "
               "AsyncClients of 8 each, 2.5 ms at 64).")
RATIOS = {"http/inprocess": ("http", "inprocess"), "ray1/inprocess": ("ray1", "inprocess"), "ray2/ray1": ("ray2", "ray1")}
NOTE_2CORE = ("2 cores: the load generator, its HTTP client (a process of its own), the server's event loop, Ray's proxy and the engines "
              "share them. In-process the engines have both cores but for the arrival thread; over HTTP the "
              "client's and the server's request handling come out of the same two cores, so the HTTP / "
              "in-process ratios are lower bounds of what a server with cores of its own would show. ray2's two "
              "replicas share these two cores with everything else: they can use both cores where one replica's "
              "process (its GIL) is the limit, and show no scaling beyond that.")


# --- probes and their reading ------------------------------------------------------------------------------------

def warm_up(target, args, specs: list, rounds: int) -> None:
    """Every shape the probes meet, through the mode's own path (Ray: each replica's share at random)."""
    client = target.client(args, remote=False)
    futures = [client.submit(s) for _ in range(rounds) for s in specs]
    client.stop(600)
    failed = [f for f in futures if f.cancelled() or f.exception() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} warm-up requests failed, e.g. "
                           f"{'cancelled' if failed[0].cancelled() else failed[0].exception()!r}")
    target.settle()


def probe(target, args, plan, duration: float, grace: float, solo) -> dict:
    from fastgen.core import cpus

    gc.collect()
    gc.freeze()  # as bench_load: this process's heap out of the collector's sight
    load, pids = cpus.load_snapshot(), target.server_pids()
    client = target.client(args)
    ticks, cpu = proc_ticks(), time.process_time()
    remote = isinstance(client, RemoteClient)
    marks = client.drive(plan, duration, grace) if remote else drive(client, plan, duration, grace)
    p = bench_load.point_stats(plan, *marks, duration, KIND_TARGETS, solo)
    # CPU per request: this process (in-process: the engines), the client's and the server's processes.
    mine, after = time.process_time() - cpu, proc_ticks()
    server = sum(after[q] - ticks[q] for q in pids if q in ticks and q in after) / os.sysconf("SC_CLK_TCK")
    p["cpu_ms_per_request"] = {"this_process": mine * 1e3 / p["submitted"],
                               "client": client.cpu_s * 1e3 / p["submitted"] if remote else None,
                               "server": server * 1e3 / p["submitted"] if pids else None}
    p["load_before"], p["requests"] = load, dict(client.counts)
    target.settle()
    return p


def machine(sample_s: float = 0.5, top: int = 5) -> dict:
    """The machine's load now, and the busiest processes over ``sample_s`` seconds (% of one core)."""
    from fastgen.core import cpus

    first = proc_ticks()
    time.sleep(sample_s)
    second, hz = proc_ticks(), os.sysconf("SC_CLK_TCK")
    busy = sorted(((second[p] - first[p]) / hz / sample_s * 100, p) for p in second if p in first)[::-1][:top]
    return {**cpus.load_snapshot(), "busiest": [f"{pct:.0f}%: {'this benchmark: ' if pid == os.getpid() else ''}"
                                                f"{cmdline(pid)[:100]}" for pct, pid in busy if pct >= 5]}


def ratio(ours: dict | None, base: dict | None) -> dict:
    """``ours.rps / base.rps`` at one target, with what bounds it (as load_analysis.summarize)."""
    if not ours or not base:
        return {"ratio": None, "bound": "mode not run"}
    if ours["bound"] == "not met":
        return {"ratio": None, "bound": f"not met at its lowest probe ({ours['lowest_probe_rps']:.3g}/s)"}
    if base["rps"] <= 0:
        return {"ratio": None, "bound": "the base not met at its lowest probe"}
    bounds = (ours["bound"] == "lower bound", base["bound"] == "lower bound")
    kind = {(True, True): "both lower bounds", (True, False): "lower bound", (False, True): "upper bound"}
    return {"ratio": ours["rps"] / base["rps"], "bound": kind.get(bounds, "interpolated")}


def summarize(sc: dict) -> None:
    sc["capacity"], sc["ratios"] = {}, {}
    for pts in sc["modes"].values():
        for p in pts:
            p["goodput_rps"] = goodput(p, sc["probe_duration_s"])
    for metric, targets in sc["targets"].items():
        caps = {str(t): {m: capacity_at(pts, metric, t) for m, pts in sc["modes"].items() if pts} for t in targets}
        sc["capacity"][metric] = caps
        sc["ratios"][metric] = {t: {name: ratio(c.get(a), c.get(b)) for name, (a, b) in RATIOS.items()}
                                for t, c in caps.items()}


def headline(result: dict) -> dict:
    """The figures docs/benchmarks.md quotes, and the issue's goals."""
    out: dict = {}
    mix, text = result["scenarios"].get("mix"), result["scenarios"].get("text")
    if mix:
        out["mix_rps_at_target"] = {m: c["rps"] for m, c in mix["capacity"]["mix"]["1.0"].items()}
        out["mix_ratios"] = mix["ratios"]["mix"]["1.0"]
    if text:
        out["text_rps_at_100ms"] = {m: c["rps"] for m, c in text["capacity"]["text"]["100.0"].items()}
        out["text_ratios_at_100ms"] = text["ratios"]["text"]["100.0"]
        out["text_p50_ms_low_load"] = low = {m: p["kinds"]["text"]["latency_ms"]["p50"]
                                             for m, p in text["low_load"].items()}
        out["text_p50_ms_lowest_sweep_probe"] = {m: min(pts, key=lambda p: p["offered_rps"])["kinds"]["text"][
            "latency_ms"]["p50"] for m, pts in text["modes"].items() if pts}
        out["text_p50_added_ms"] = {m: v - low["inprocess"] for m, v in low.items() if m != "inprocess"
                                    and "inprocess" in low}
    goals = {}
    r = (out.get("mix_ratios") or {}).get("http/inprocess", {}).get("ratio")
    if r is not None:
        goals["mix_http_over_inprocess_ge_0.9"] = r >= 0.9
    if "http" in out.get("text_p50_added_ms", {}):
        goals["text_p50_added_by_http_le_2ms"] = out["text_p50_added_ms"]["http"] <= 2.0
    out["goals_met"] = goals
    return out


# --- main --------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of the engines in every mode (default 1 on a CPU, 0 on a GPU; 0: defaults)")
    ap.add_argument("--cache-dir", default=None, help="engine cache of every mode (default: fastgen's)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="shorter probes, a coarser sweep")
    ap.add_argument("--text-duration", type=float, default=None, help="seconds per probe (default 6; quick 3)")
    ap.add_argument("--mix-duration", type=float, default=None,
                    help="default 30 (about 150 generations per probe near the knee: with 12 s, about 60, the p99 "
                         "slowdown was their maximum and the mix ratio moved from 0.81 to 1.03 run to run); quick 8")
    ap.add_argument("--factor", type=float, default=None, help="mix load step (default 1.6; quick 2)")
    ap.add_argument("--max-probes", type=int, default=None, help="per mode and scenario (default 7; quick 5)")
    ap.add_argument("--refine", type=int, default=None, help="bisections near the headline (default 2; quick 1)")
    ap.add_argument("--loads", default=None, help="fixed loads (x sequential capacity) instead of a sweep")
    ap.add_argument("--low-rps", type=float, default=20.0, help="the text scenario's low-load probe (requests/s)")
    ap.add_argument("--low-duration", type=float, default=None, help="default 10; quick 5; 0: none")
    ap.add_argument("--client", choices=["raw", "aiohttp", "httpx"], default="raw",
                    help="the HTTP client: raw (default; a wrk-like minimal HTTP/1.1 client, benchmarks/raw_http.py), "
                         "aiohttp or httpx (client libraries, see CLIENT_NOTE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for name, full, short in (("text_duration", 6.0, 3.0), ("mix_duration", 30.0, 8.0), ("factor", 1.6, 2.0),
                              ("refine", 2, 1), ("max_probes", 7, 5), ("low_duration", 10.0, 5.0)):
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    if args.threads is None:
        args.threads = 0 if args.device.startswith("cuda") else 1
    bad = sorted(set(args.modes.split(",")) - set(MODES)) + sorted(set(args.scenarios.split(",")) - set(SCENARIOS))
    if bad:
        ap.error(f"unknown mode or scenario {bad[0]!r} (modes: {', '.join(MODES)}; scenarios: {', '.join(SCENARIOS)})")
    if args.threads < 0:
        ap.error("--threads: 0 or more")
    return args


def versions() -> dict:
    import fastgen

    out = {"fastgen": fastgen.__version__, "python": platform.python_version()}
    for name in ("torch", "onnxruntime", "fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "ray"):
        if importlib.util.find_spec(name) is not None:
            out[name] = getattr(__import__(name), "__version__", "?")
    return out


def clean(v):
    """Missed requests are infinite latency: null in the JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v


def main(argv=None) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from fastgen.core.fs import write_json_atomic
    from fastgen.engines.cache import default_root
    from fastgen.runtime.config import RuntimeConfig
    from fastgen.serve import ServeConfig
    from fastgen.serve.images import png_base64
    from fastgen.serve.service import Service

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("fastgen", "httpx", "ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t_start = time.perf_counter()
    args.cache_dir = str(Path(args.cache_dir or default_root()).expanduser().resolve())
    modes, scenarios = [m for m in args.modes.split(",") if m], [s for s in args.scenarios.split(",") if s]
    pin_threads(args.threads)  # this process: the in-process engines and the calibration
    command = ["benchmarks/bench_http.py", *(sys.argv[1:] if argv is None else argv)]
    result: dict = {"benchmark": "http", "preset": args.preset, "backend": args.backend, "precision": args.precision,
                    "device": bench_load.device_name(args), "date": datetime.date.today().isoformat(),
                    "command": " ".join(command), "versions": versions(), "note": NOTE_2CORE, "client": CLIENT_NOTE,
                    "method": "see the docstring of benchmarks/bench_http.py (and bench_load.py)",
                    "machine": {"start": machine()}, "modes": {}, "skipped": {}, "scenarios": {}}
    config = ServeConfig(model=args.preset, scorers=(args.preset, f"{args.preset}:text-classifier"),
                         backend=args.backend, device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                         runtime=RuntimeConfig(max_queue=MAX_QUEUE))
    service = Service(config)
    service.load()  # the server's own loading: engines from the shared cache, step-size fit, warm-up
    gen, scorers = service.generator, {s.kind: s for s in service.scorers}
    result["engines"] = {"unet_intra_op_threads": gen.unet.execution.intra_op_threads, "profile": str(gen.unet.spec.profile),
                         "torch_threads": torch.get_num_threads(), "runtime": service.runtime.config.to_dict()}
    rng, np_rng = random.Random(args.seed), np.random.default_rng(args.seed)
    texts = bench_load.text_pool(scorers["text"].tokenizer, rng)
    images = [np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (96, 128), (80, 80))] * 4
    pil = {id(a): Image.fromarray(a) for a in images}
    args.pngs = {key: png_base64(im) for key, im in pil.items()}  # encoded once, up front
    pool = bench_load.Workload(bench_load.SCENARIO_KINDS["mix"], "warm", texts, images, SIZES)
    warm = [pool.spec(k) for k in ("text", "image") for _ in range(64)]
    warm += [bench_load.Spec("generate", "warm up", steps=s, size=z, seed=1) for z in SIZES for s in range(2, 10)]

    # The unit of load (each kind's solo service time) and generation's solo model: in-process, alone.
    service_s = {k: float(np.mean(bench_load.solo_seconds(gen, scorers, [pool.spec(k) for _ in range(60)])))
                 for k in ("text", "image")}
    solo_model = bench_load.fit_solo(gen, scorers, SIZES, reps=1 if args.quick else 2)
    service_s["generate"] = sum(share * (solo_model[z][0] + solo_model[z][1] * 27.0)
                                for z, share in ((SIZES[0], 0.7), (SIZES[-1], 0.3)))
    solo = lambda spec: 1e3 * (solo_model[spec.size][0] + solo_model[spec.size][1] * spec.steps)  # noqa: E731
    slowest_ms = solo(bench_load.Spec("generate", steps=50, size=max(SIZES)))
    result["service_time_alone_ms"] = {k: v * 1e3 for k, v in service_s.items()}
    result["generation_solo_model_ms"] = {str(z): {"a": a * 1e3, "b_per_step": b * 1e3} for z, (a, b) in solo_model.items()}
    logger.info("solo service time: %s ms", {k: round(v * 1e3, 2) for k, v in service_s.items()})
    work, setup = {}, {}
    for name in scenarios:
        kinds = bench_load.SCENARIO_KINDS[name]
        text = name == "text"
        result["scenarios"][name] = {
            "kinds": kinds, "targets": {name: list(TEXT_TARGETS_MS) if text else [1.0]},
            "headline": 100.0 if text else 1.0, "kind_targets": KIND_TARGETS,
            "metric_units": {name: "p99 latency (ms)" if text else "worst kind's p99 / its target (generation: slowdown)"},
            "probe_duration_s": args.text_duration if text else args.mix_duration,
            # A request arriving at a probe's end may take the target slowdown x its solo time and meet it.
            "grace_s": GRACE_S if text else max(GRACE_S, KIND_TARGETS["generate"] * slowest_ms / 1e3),
            "sequential_capacity_rps": 1.0 / sum(share * service_s[k] for k, share in kinds.items()),
            "modes": {}, "low_load": {}}
        work[name] = bench_load.Workload(kinds, f"{args.seed}-{name}", texts, images, SIZES)
        setup[name] = argparse.Namespace(**{**vars(args), "factor": 2.0 if text else args.factor,
                                            "start_batched": START[name]})

    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        for mode in modes:
            if mode.startswith("ray") and importlib.util.find_spec("ray") is None:
                result["skipped"][mode] = "Ray is not installed (pip install 'fastgen[ray]')"
                logger.warning("%s skipped: %s", mode, result["skipped"][mode])
                continue
            before, t_mode, target = machine(), time.perf_counter(), None
            try:
                target = (InProcessTarget(service, pil) if mode == "inprocess" else HttpTarget(args, Path(tmp))
                          if mode == "http" else RayTarget(args, config, int(mode[3:])))
                target.info["startup_s"] = time.perf_counter() - t_mode
                warm_up(target, args, warm, rounds=int(mode[3:]) if mode.startswith("ray") else 1)
                if mode != "inprocess":  # the HTTP stack's own latency: GET /healthz, one at a time
                    client = target.client(args, remote=False)
                    target.info["healthz_ms"] = client.ping()
                    client.stop(1)
                for name in scenarios:
                    sc, wl = result["scenarios"][name], work[name]

                    def run(rate, sc=sc, wl=wl, name=name, target=target, mode=mode):
                        p = probe(target, args, wl.plan(rate, sc["probe_duration_s"]), sc["probe_duration_s"],
                                  sc["grace_s"], solo)
                        p["rate"] = rate
                        logger.info("  %-4s %-9s offered %7.2f/s achieved %7.2f/s  %s", name, mode, p["offered_rps"],
                                    p["achieved_rps"], ", ".join(f"{k} p50 {v['latency_ms']['p50']:.1f} p99 "
                                                                 f"{v['latency_ms']['p99']:.0f} ms" for k, v in p["kinds"].items()))
                        return p

                    if name == "text" and args.low_duration > 0:
                        sc["low_load"][mode] = probe(target, args, wl.plan(args.low_rps, args.low_duration),
                                                     args.low_duration, sc["grace_s"], solo)
                    unit, cfg = sc["sequential_capacity_rps"], setup[name]
                    if mode.startswith("ray"):
                        cfg = argparse.Namespace(**{**vars(cfg), "start_batched": cfg.start_batched * RAY_START})
                    sc["modes"][mode] = ([run(float(x) * unit) for x in args.loads.split(",")] if args.loads else
                                         bench_load.sweep(name, mode, run, unit, sc["headline"],
                                                          max(sc["targets"][name]), cfg))
                result["modes"][mode] = target.info
            except Exception as exc:
                ok = False
                result["skipped"][mode] = f"failed: {' '.join(str(exc).split())[:800]}"
                logger.error("%s failed: %s", mode, exc)
            finally:
                if target is not None:
                    target.close()
                if mode == "ray2" or "ray2" not in modes:
                    RayTarget.shutdown_ray()
            result["machine"][mode] = {"before": before, "after": machine(), "wall_s": time.perf_counter() - t_mode}
    service.close(30)
    RayTarget.shutdown_ray()
    for name, sc in result["scenarios"].items():
        summarize(sc)
        logger.info("%s capacity: %s", name, json.dumps({t: {m: round(c["rps"], 2) for m, c in caps.items()}
                                                         for t, caps in sc["capacity"][name].items()}))
    result["summary"] = headline(result)
    logger.info("summary: %s", json.dumps(clean(result["summary"])))
    result["machine"]["end"] = machine()
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "pngs")}
    result["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out or HERE / "results" / f"http_{args.preset}_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, clean(result))
    logger.info("wrote %s", out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
