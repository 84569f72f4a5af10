"""``bench_http.py``'s load generators and each mode's server targets.

The load generators speak ``bench_load``'s server protocol (``submit(spec) -> Future``,
``stop(grace) -> dict``): :class:`InProcess` sends runtime requests to a Service's runtime,
:class:`HttpClient` sends HTTP requests from one asyncio loop. The targets start each mode's
server once for all its probes: :class:`InProcessTarget`, :class:`HttpTarget` (``fastgen serve``
in a subprocess) and :class:`RayTarget` (Ray Serve). :func:`pin_threads` runs in this process, in
the server's (``SERVE_CHILD``) and in every Ray worker (this directory is on their PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import importlib.util
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONNECTIONS = 256  # the HTTP client's pool: more than a probe keeps in flight below saturation
MAX_QUEUE = 100_000  # every mode's runtime queue never fills: past saturation shows as latency, not 429
RAY_MAX_ONGOING = 64  # RayOptions.max_ongoing_requests: room for two text batches per replica
THREADS_ENV = "FASTGEN_BENCH_INTRA_OP_THREADS"
#: The server process: ``fastgen serve`` itself, after pin_threads (http_targets is on its PYTHONPATH).
SERVE_CHILD = "import http_targets; http_targets.pin_threads(); from fastgen.cli.main import main; main()"


def pin_threads(threads: int | None = None) -> None:
    """Every ``ExecutionOptions`` made from now on in this process with automatic intra-op threads (0)
    gets ``threads`` (default: ``$FASTGEN_BENCH_INTRA_OP_THREADS``), and torch uses that many."""
    import os

    n = int(os.environ.get(THREADS_ENV, "0") or 0) if threads is None else threads
    if n <= 0:
        return
    import torch

    from fastgen.engines.config import ExecutionOptions

    torch.set_num_threads(n)
    original = ExecutionOptions.__post_init__
    if getattr(original, "pinned", False):
        return

    def post_init(self) -> None:
        if self.intra_op_threads == 0:
            object.__setattr__(self, "intra_op_threads", n)
        original(self)

    post_init.pinned = True
    ExecutionOptions.__post_init__ = post_init


# --- load generators (bench_load's server protocol: submit(spec) -> Future, stop(grace) -> dict) ---------------

class Relay:
    """The futures handed to ``run_point``, completed from the real ones. ``concurrent.futures.wait``
    returns before a future's done-callbacks have run (the runtime runs them on its own threads), so
    :meth:`stop` waits for the relayed callbacks too: none of run_point's marks comes late."""

    def __init__(self) -> None:
        self.inner: list = []
        self.relayed = 0
        self.cond = threading.Condition()
        self.counts: collections.Counter = collections.Counter()

    def wrap(self, inner) -> concurrent.futures.Future:
        outer: concurrent.futures.Future = concurrent.futures.Future()

        def relay(f) -> None:
            error = None if f.cancelled() else f.exception()
            if f.cancelled():
                outer.cancel()
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(f.result())
            with self.cond:
                self.relayed += 1
                if error is not None:
                    self.counts[type(error).__name__] += 1
                self.cond.notify_all()

        self.inner.append(inner)
        inner.add_done_callback(relay)
        return outer

    def stop(self, grace: float) -> dict:
        """Wait up to ``grace`` seconds for every request, cancel the rest, wait for their callbacks."""
        _, late = concurrent.futures.wait(self.inner, timeout=grace)
        self.counts["cancelled"] += sum(1 for f in late if f.cancel())
        concurrent.futures.wait(self.inner, timeout=60)  # a running generation ends at its next step
        with self.cond:
            self.cond.wait_for(lambda: self.relayed >= len(self.inner), timeout=60)
        return {}


class InProcess(Relay):
    """The Service's runtime, sent the runtime requests the Service sends for each HTTP request."""

    def __init__(self, runtime, pil: dict) -> None:
        super().__init__()
        self.rt, self.pil = runtime, pil

    def submit(self, spec) -> concurrent.futures.Future:
        import fastgen
        from fastgen.runtime import GenerateRequest, ScoreRequest

        if spec.kind == "generate":
            cfg = fastgen.GenerateConfig(steps=spec.steps, height=spec.size, width=spec.size, seed=spec.seed,
                                         scheduler="euler", output_type="pil")
            return self.wrap(self.rt.submit(GenerateRequest(spec.item, cfg)))
        item = spec.item if spec.kind == "text" else self.pil[id(spec.item)]
        return self.wrap(self.rt.submit(ScoreRequest(item, kind=spec.kind)))


class HttpClient(Relay):
    """One asyncio loop on a thread and keep-alive connections: one ``aiohttp.ClientSession``, one
    :class:`raw_http.RawClient`, or ``httpx.AsyncClient``s of at most 8 connections each (see
    bench_http.CLIENT_NOTE); a future per request."""

    def __init__(self, url: str, pngs: dict, kind: str) -> None:
        super().__init__()
        self.pngs, self.kind, self.turn = pngs, kind, itertools.count()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-client", daemon=True)
        self.thread.start()

        async def make() -> list:
            if kind == "raw":
                from raw_http import RawClient

                return [RawClient(url, CONNECTIONS)]
            if kind == "aiohttp":
                import aiohttp

                return [aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                                              timeout=aiohttp.ClientTimeout(total=300))]
            import httpx

            return [httpx.AsyncClient(base_url=url, trust_env=False, timeout=httpx.Timeout(300.0, pool=None),
                                      limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
                    for _ in range(CONNECTIONS // 8)]

        self.clients = self.call(make())

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def http(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        client = self.clients[next(self.turn) % len(self.clients)]
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if body is not None else {}
        if self.kind == "raw":
            return await client.request(method, path, data)
        if self.kind == "aiohttp":
            async with client.request(method, path, data=data, headers=headers) as response:
                return response.status, await response.read()
        response = await client.request(method, path, content=data, headers=headers)
        return response.status_code, response.content

    async def _request(self, spec) -> list:
        from PIL import Image

        if spec.kind == "generate":
            path = "/v1/images/generations"
            body = {"prompt": spec.item, "steps": spec.steps, "size": f"{spec.size}x{spec.size}", "seed": spec.seed,
                    "scheduler": "euler"}
        else:
            path = "/v1/score"
            body = {"texts": [spec.item]} if spec.kind == "text" else {"images": [self.pngs[id(spec.item)]]}
        status, content = await self.http("POST", path, body)
        self.counts[str(status)] += 1
        if status != 200:
            raise RuntimeError(f"{path}: HTTP {status}: {content[:200]!r}")
        data = json.loads(content)["data"]
        if spec.kind == "generate":  # what a client does with the answer: a decoded image
            with Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))) as image:
                image.load()
                if image.size != (spec.size, spec.size):
                    raise RuntimeError(f"a {image.size} image for {spec.size}x{spec.size}")
        elif len(data) != 1 or not data[0]["scores"]:
            raise RuntimeError(f"{path}: {len(data)} scores for one item")
        return data

    def submit(self, spec) -> concurrent.futures.Future:
        return self.wrap(asyncio.run_coroutine_threadsafe(self._request(spec), self.loop))

    def ping(self, n: int = 200) -> dict:
        """The HTTP stack alone: ``n`` GET /healthz one after the other, p50 / p99 (ms), and the
        client's CPU time per request (ms; this process's, the client being nearly all it does)."""
        async def run() -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _ = await self.http("GET", "/healthz")
                if status != 200:
                    raise RuntimeError(f"GET /healthz: HTTP {status}")
                out.append((time.perf_counter() - t0) * 1e3)
            return sorted(out)

        cpu = time.process_time()
        ms = self.call(run())
        return {"p50": ms[n // 2], "p99": ms[int(n * 0.99)], "requests": n,
                "client_cpu_ms_per_request": (time.process_time() - cpu) * 1e3 / n}

    def stop(self, grace: float) -> dict:
        super().stop(grace)

        async def close() -> None:  # let the cancelled requests unwind, then close the connections
            await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}), return_exceptions=True)
            for client in self.clients:
                await (client.aclose() if self.kind == "httpx" else client.close())

        try:
            self.call(close(), 60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        return {}


class RemoteClient:
    """:class:`HttpClient` in a process of its own (``python http_targets.py client``), sent one probe's
    plan as JSON: a client machine's work (the asyncio loop, JSON, PNG decoding) never contends for
    the load generator's GIL, as it would on a thread beside it (there, generation latency doubled at
    a third of the capacity). The process times the arrivals itself and returns each request's
    completion (seconds after its start), its status counts and its CPU time."""

    def __init__(self, url: str, pngs: dict, kind: str) -> None:
        self.url, self.kind = url, kind
        self.keys = {key: i for i, key in enumerate(pngs)}
        self.pngs = list(pngs.values())
        self.counts: collections.Counter = collections.Counter()
        self.cpu_s = 0.0

    def drive(self, plan, duration: float, grace: float) -> tuple[list[float], list[bool], dict]:
        rows = [[offset, spec.kind, self.keys[id(spec.item)] if spec.kind == "image" else spec.item, spec.steps,
                 spec.size, spec.seed] for offset, spec in plan]
        job = {"url": self.url, "client": self.kind, "pngs": self.pngs, "plan": rows, "duration": duration,
               "grace": grace}
        proc = subprocess.run([sys.executable, str(HERE / "http_targets.py"), "client"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=duration + grace + 300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the client process failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout)
        self.counts.update(out["counts"])
        self.cpu_s = out["cpu_s"]
        return [float("inf") if t is None else t for t in out["done_at"]], out["ok"], {}


def client_main() -> None:
    """``python http_targets.py client``: one probe's plan from stdin (see :class:`RemoteClient`)."""
    import types

    from load_analysis import drive

    job = json.load(sys.stdin)
    images = [object() for _ in job["pngs"]]
    client = HttpClient(job["url"], {id(im): png for im, png in zip(images, job["pngs"])}, job["client"])
    plan = [(offset, types.SimpleNamespace(kind=kind, item=images[item] if kind == "image" else item, steps=steps,
                                           size=size, seed=seed))
            for offset, kind, item, steps, size, seed in job["plan"]]
    cpu = time.process_time()
    done_at, ok, _ = drive(client, plan, job["duration"], job["grace"])
    json.dump({"done_at": [t if t != float("inf") else None for t in done_at], "ok": ok,
               "counts": dict(client.counts), "cpu_s": time.process_time() - cpu}, sys.stdout)


# --- each mode's server, started once for all its probes -----------------------------------------------------

def wait_until(check, what: str, timeout: float, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def inflight(metrics_text: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines()
               if line.startswith("fastgen_inflight_requests"))


class InProcessTarget:
    def __init__(self, service, pil) -> None:
        self.service, self.pil, self.info = service, pil, {"server": "fastgen.serve.Service(config).load(): its runtime"}

    def client(self, args, remote: bool = False):  # noqa: ARG002 (in-process: nothing remote)
        return InProcess(self.service.runtime, self.pil)

    def settle(self) -> None:
        wait_until(lambda: inflight(self.service.runtime.metrics_text()) == 0, "the runtime to be idle", 60)

    def server_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass


class HttpTarget:
    """``fastgen serve`` in a subprocess, its log in a file (the tail is shown if it fails to start)."""

    def __init__(self, args, workdir: Path) -> None:
        import httpx

        self.httpx = httpx
        cmd = [sys.executable, "-c", SERVE_CHILD, "serve", args.preset, "--scorer", args.preset, "--scorer",
               f"{args.preset}:text-classifier", "--backend", args.backend, "--device", args.device, "--precision",
               args.precision, "--port", "0", "--cache-dir", args.cache_dir, "--max-queue", str(MAX_QUEUE)]
        self.log_path = workdir / "serve.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env={**os.environ, **child_env(args), "PYTHONUNBUFFERED": "1"})
        self.info = {"server": "python -m fastgen.cli " + " ".join(cmd[3:])}
        try:
            wait_until(lambda: "listening on " in self.log_path.read_text(), "fastgen serve to listen", 300, self.proc)
            line = next(ln for ln in self.log_path.read_text().splitlines() if "listening on " in ln)
            self.url = line.split("listening on ", 1)[1].split()[0]
            wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200,
                       "fastgen serve to be ready", 600, self.proc)
        except BaseException:
            self.close()
            tail = "\n".join(self.log_path.read_text().splitlines()[-20:])
            raise RuntimeError(f"fastgen serve did not start:\n{tail}") from None

    def client(self, args, remote: bool = True):
        return (RemoteClient if remote else HttpClient)(self.url, args.pngs, args.client)

    def settle(self) -> None:
        wait_until(lambda: inflight(self.httpx.get(f"{self.url}/metrics", timeout=10).text) == 0, "server idle", 60)

    def server_pids(self) -> list[int]:
        return [self.proc.pid]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


class RayTarget(HttpTarget):
    """``fastgen.serve.ray.run(config, RayOptions(replicas=N), blocking=False)`` on a local Ray instance,
    started once for both Ray modes (Serve's proxy keeps the port it started on)."""

    port = 0

    def __init__(self, args, config, replicas: int) -> None:
        import httpx
        import ray

        from fastgen.serve import ray as fray

        self.httpx = httpx
        if not ray.is_initialized():
            os.environ.setdefault(fray.PROXY_CALLBACK_ENV, fray.PROXY_CALLBACK)  # what fray.run's own init does
            env: dict = {"env_vars": child_env(args)}
            if args.threads:
                env["worker_process_setup_hook"] = pin_threads
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
            RayTarget.port = free_port()
        # Ray's queue unbounded, as the other modes' runtime queue: past saturation is latency, not 429.
        options = fray.RayOptions(replicas=replicas, max_ongoing_requests=RAY_MAX_ONGOING, max_queued_requests=None)
        self.server = fray.run(config.replace(port=RayTarget.port), options, blocking=False)
        self.url = self.server.url
        self.info = {"server": f"fastgen.serve.ray.run(config, RayOptions(replicas={replicas}, max_ongoing_requests="
                               f"{RAY_MAX_ONGOING}, max_queued_requests=None)), ray.init(num_cpus=2)"}
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200, "Ray Serve ready", 600)

    def settle(self) -> None:
        time.sleep(1.0)  # /metrics is one replica's: give cancelled requests a moment instead

    def server_pids(self) -> list[int]:  # Ray's own processes and its workers (replicas, proxy, controller)
        return [p for p in proc_ticks() if any(k in cmdline(p) for k in ("ray::", "raylet", "gcs_server"))]

    def close(self) -> None:
        self.server.shutdown()

    @staticmethod
    def shutdown_ray() -> None:
        if importlib.util.find_spec("ray") is not None and "ray" in sys.modules:
            import ray
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()


def child_env(args) -> dict:
    return {THREADS_ENV: str(args.threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes ---------------------------------------------------------------------------------------------------

def proc_ticks() -> dict[int, int]:
    """CPU time (clock ticks, user + system) of every process now."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split())
    except OSError:
        return ""


if __name__ == "__main__" and sys.argv[1:] == ["client"]:
    client_main()
