"""``fastgen serve --ray`` on a local Ray instance: the real app (``fastgen.serve.create_app``) on Ray
Serve replicas of the tiny preset, over real HTTP through Ray's proxy on loopback.

One Ray instance and one application serve the whole module (Ray's start and each replica's engine
loading are the cost): the app deployment autoscales from 1 to 2 replicas, and the image classifier
runs in its own deployment. The tests run in file order and each brings the replicas it needs (the
first scales 1 -> 2 under load; the last kills a replica). Run them alone with ``pytest -m ray``.
Waits are bounded (a hang fails the test); nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fastgen.runtime.config import RuntimeConfig  # noqa: E402
from fastgen.serve.config import ServeConfig  # noqa: E402
from fastgen.serve.ray import (  # noqa: E402
    APP_DEPLOYMENT,
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    SCORER_DEPLOYMENT,
    RayOptions,
    run,
)
from fastgen.serve.ray_deploy import REPLICA_HEADER  # noqa: E402

pytestmark = pytest.mark.ray

#: Seconds any one wait may take before it counts as a hang (never a timing assertion).
TIMEOUT = 180.0
APP = "fastgen-test"
OPTIONS = RayOptions(
    replicas=1, min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0,
    max_ongoing_requests=2, max_queued_requests=4, retry_after_s=2, separate_scorer=True,
    replica_cpus=1, scorer_cpus=1, app_name=APP)
#: Ray's environment: no usage reports, no token file in ~/.ray, fast autoscaling metrics, and the
#: proxy middleware that gives Ray's own errors fastgen's JSON body.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    PROXY_CALLBACK_ENV: PROXY_CALLBACK,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The application on a fresh local Ray instance (loopback only, session files in a temp dir)."""
    import ray
    from ray import serve

    # A short path: Ray's socket paths under it must stay within the 107 bytes a Unix socket allows.
    temp_dir = tempfile.mkdtemp(prefix="fg-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        for name, value in RAY_ENV.items():
            env.setenv(name, value)  # before ray.init: Ray's processes inherit the environment
        # 4 logical CPUs: two app replicas, the scorer and a replacement for a killed replica fit.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
                 _node_ip_address="127.0.0.1")
        try:
            config = ServeConfig(model="tiny", scorers=("tiny",), backend="torch", device="cpu",
                                 port=_free_port(), runtime=RuntimeConfig(max_step_rows=8))
            started = time.monotonic()
            app = run(config, OPTIONS, blocking=False)
            print(f"ray serve application up in {time.monotonic() - started:.1f} s")
            yield app
            app.shutdown()
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _replicas(state: str = "RUNNING", deployment: str = APP_DEPLOYMENT) -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments[deployment].replica_states
    return int(states.get(state, 0))


def _running() -> int:
    return _replicas("RUNNING")


def _scaled_up() -> bool:
    """The autoscaler has decided on a second replica (starting or running)."""
    return _replicas("RUNNING") + _replicas("STARTING") >= 2


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def _generation(steps: int = 4, **extra) -> dict:
    return {"prompt": "a red sports car", "steps": steps, "seed": 1, **extra}


async def _post(client, body: dict):
    return await client.post("/v1/images/generations", json=body)


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=app.url, timeout=httpx.Timeout(TIMEOUT))


async def _load_until(app, done, *, workers: int = 4, steps: int = 8) -> list:
    """Keep ``workers`` generations in flight until ``done()`` (checked off the event loop) is true."""
    responses: list = []
    stop = asyncio.Event()
    async with _client(app) as client:
        async def worker() -> None:
            while not stop.is_set():
                responses.append(await _post(client, _generation(steps)))

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        deadline = time.monotonic() + TIMEOUT
        try:
            while not await asyncio.to_thread(done):
                assert time.monotonic() < deadline, "the condition never came true under load"
                await asyncio.sleep(0.25)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return responses


def _ensure_two_replicas(app) -> None:
    if _running() < 2:
        asyncio.run(_load_until(app, _scaled_up))
        _wait(lambda: _running() >= 2, "the second replica")


async def _replicas_seen(app, *, waves: int = 10, concurrent: int = 4) -> set[str]:
    """Replica ids that served waves of concurrent generations (until two are seen)."""
    seen: set[str] = set()
    async with _client(app) as client:
        for _ in range(waves):
            responses = await asyncio.gather(*(_post(client, _generation(8)) for _ in range(concurrent)))
            for r in responses:
                assert r.status_code == 200, r.text
                seen.add(r.headers[REPLICA_HEADER])
            if len(seen) >= 2:
                break
    return seen


def test_scales_from_one_to_two_replicas_under_load(server):
    assert _running() == 1
    # Load stops once the autoscaler has decided: the new replica then loads its engines without
    # competing for this machine's two cores (nothing scales down: downscale_delay_s is 600 s).
    responses = asyncio.run(_load_until(server, _scaled_up, workers=3))
    assert responses and all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    _wait(lambda: _running() >= 2, "the second replica")
    assert _running() == 2
    assert len(asyncio.run(_replicas_seen(server))) == 2  # both serve after the scale-up


def test_requests_spread_across_replicas(server):
    _ensure_two_replicas(server)
    # max_ongoing_requests is 2: four requests at once cannot all sit on one replica.
    seen = asyncio.run(_replicas_seen(server))
    assert len(seen) == 2, seen

    async def probes():
        async with _client(server) as client:
            ready = await client.get("/readyz")
            models = await client.get("/v1/models")
        return ready, models

    ready, models = asyncio.run(probes())
    assert ready.status_code == 200 and ready.headers[REPLICA_HEADER] in seen  # every route is tagged
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]  # the image classifier lives apart


def test_best_of_n_ranks_through_the_scorer_deployment(server):
    from ray import serve

    scorer = serve.get_deployment_handle(SCORER_DEPLOYMENT, app_name=APP)
    before = scorer.stats.remote().result()["kinds"]["image"]["requests"]["succeeded"]
    labels = scorer.labels.remote().result()

    async def requests():
        async with _client(server) as client:
            best = await _post(client, _generation(4, candidates=3, keep=2, rank_by=labels[1]))
            scored = await client.post("/v1/score", json={"images": [best.json()["data"][0]["b64_json"]]})
        return best, scored

    best, scored = asyncio.run(requests())
    assert best.status_code == 200, best.text
    data = best.json()["data"]
    assert [d["rank"] for d in data] == [0, 1]
    values = [d["score"]["value"] for d in data]
    assert values == sorted(values, reverse=True) and all(d["score"]["rank_by"] == labels[1] for d in data)
    assert set(data[0]["score"]["scores"]) == set(labels)
    assert scored.status_code == 200, scored.text
    assert scored.json()["data"][0]["kind"] == "image"
    after = scorer.stats.remote().result()["kinds"]["image"]["requests"]["succeeded"]
    assert after - before == 4  # three candidates and one /v1/score image, all scored by the deployment


def test_a_full_ray_queue_answers_429_with_retry_after(server):
    _ensure_two_replicas(server)

    async def burst():
        async with _client(server) as client:
            return await asyncio.gather(*(_post(client, _generation(12)) for _ in range(16)))

    # 2 replicas x 2 ongoing + 4 queued at the proxy: 16 at once cannot all be accepted.
    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and codes.count(200) >= 4, codes
    for r in rejected:
        assert r.headers["retry-after"] == "2"  # retry_after_s, rounded up as the app rounds its own
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
        assert "backpressure" in error["message"] and "\n" not in error["message"]


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_a_replica_killed_mid_load_loses_no_request_silently(server):
    import ray

    _ensure_two_replicas(server)
    outcomes: list[tuple[str, int, str]] = []
    first_progress: dict[str, asyncio.Event] = {}

    async def streamed(client) -> None:
        async with client.stream("POST", "/v1/images/generations", json=_generation(40, stream=True)) as r:
            replica = r.headers.get(REPLICA_HEADER, "?")
            text = ""
            async for chunk in r.aiter_text():
                text += chunk
                if "event: progress" in text:
                    first_progress.setdefault(replica, asyncio.Event()).set()
            events = _sse(text) if r.status_code == 200 else []
            last = events[-1][0] if events else None
            outcomes.append(("stream", r.status_code, last or text[:200]))

    async def plain(client) -> None:
        r = await _post(client, _generation(20))
        body = r.json()  # every answer is JSON: the images, or an error
        outcomes.append(("plain", r.status_code, "done" if r.status_code == 200 and body["data"] else r.text))

    async def scenario() -> str:
        async with _client(server) as client:
            tasks = [asyncio.create_task(streamed(client)) for _ in range(3)]
            tasks += [asyncio.create_task(plain(client)) for _ in range(3)]
            deadline = time.monotonic() + TIMEOUT
            while not first_progress:
                assert time.monotonic() < deadline, "no stream started"
                await asyncio.sleep(0.05)
            victim = next(iter(first_progress))
            name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].endswith(f"#{victim}"))
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)  # none hangs
        return victim

    asyncio.run(scenario())
    print("outcomes after the kill:", [(kind, status, detail[:80]) for kind, status, detail in outcomes])
    assert len(outcomes) == 6
    failed = []
    for kind, status, detail in outcomes:
        if kind == "stream" and status == 200:
            assert detail in ("done", "error"), detail  # a stream ends with its result or an error event
            if detail == "error":
                failed.append(kind)
        elif status == 200:
            assert detail == "done"
        else:
            error = json.loads(detail)["error"]  # a clear error: fastgen's JSON body with a message
            assert error["message"] and status in (429, 500, 503), (status, detail)
            failed.append(kind)
    assert failed, outcomes  # the killed replica was serving at least one of them

    async def after():
        async with _client(server) as client:
            return await _post(client, _generation(2))

    assert asyncio.run(after()).status_code == 200  # the surviving replica still serves
