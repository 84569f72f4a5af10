"""Error mapping over real HTTP: 401 (API key), 429 with Retry-After (a full queue behind a gated
engine), 503 (loading, failed to load), 504 (deadline), 500 (NumericalError; anything else as
"internal error", never its message)."""

from __future__ import annotations

import threading

import httpx
import pytest
from serve_helpers import TIMEOUT, Faults, faulty_generator, runtime_counts, wait_for

from fastgen.runtime.config import RuntimeConfig
from fastgen.serve import ServeConfig, Service, create_app


def error_of(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def faults():
    return Faults()


@pytest.fixture(scope="module")
def faulty(live_server, tiny_models, faults):
    """A server whose UNet waits on ``faults.gate`` and returns NaN while ``faults.nan``; a queue of 1."""
    config = ServeConfig(model="tiny", warmup=False, runtime=RuntimeConfig(max_queue=1))
    service = Service(config, generator=faulty_generator(tiny_models["generator"], faults))
    return live_server(create_app(config, service=service)).wait_ready()


def post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    def main() -> None:
        results.append(httpx.post(url, json=body, timeout=TIMEOUT))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread


def test_full_queue_is_429_with_retry_after(faulty, faults):
    url = f"{faulty.url}/v1/images/generations"
    runtime = faulty.service.runtime
    faults.gate.clear()
    results: list = []
    try:
        calls = faults.calls
        first = post_in_thread(url, {"prompt": "a", "steps": 2, "seed": 1}, results)
        wait_for(lambda: faults.calls > calls, "the first request's UNet call")  # it holds the engine thread
        second = post_in_thread(url, {"prompt": "b", "steps": 2, "seed": 2}, results)
        wait_for(lambda: runtime.stats()["queued"].get("generate") == 1, "the second request to queue")
        r = httpx.post(url, json={"prompt": "c", "steps": 2}, timeout=TIMEOUT)
        error = error_of(r, 429, "overloaded")
        assert error["type"] == "rate_limit_error"
        assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
    finally:
        faults.gate.set()
    first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert sorted(x.status_code for x in results) == [200, 200]


def test_numerical_error_is_500_with_its_message(faulty, faults):
    faults.nan = True
    try:
        r = httpx.post(f"{faulty.url}/v1/images/generations", json={"prompt": "nan", "steps": 2}, timeout=TIMEOUT)
    finally:
        faults.nan = False
    error = error_of(r, 500, "numerical_error")
    assert "non-finite" in error["message"] or "NaN" in error["message"]


def test_deadline_is_504(faulty):
    before = runtime_counts(faulty.service).get("expired", 0)
    r = httpx.post(f"{faulty.url}/v1/images/generations", json={"prompt": "slow", "steps": 500, "deadline_s": 0.05},
                   timeout=TIMEOUT)
    error_of(r, 504, "deadline_exceeded")
    assert runtime_counts(faulty.service).get("expired", 0) == before + 1


def test_unexpected_error_is_500_internal_error_without_its_message(faulty, monkeypatch):
    def boom(params):
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(faulty.service, "submit_generation", boom)
    r = httpx.post(f"{faulty.url}/v1/images/generations", json={"prompt": "x"}, timeout=TIMEOUT)
    error = error_of(r, 500, "internal_error")
    assert error["message"] == "internal error" and "secret" not in r.text


class GatedService(Service):
    """Loads only once ``release`` is set: the server is up but not ready until then."""

    release = threading.Event()

    def load(self) -> None:
        assert self.release.wait(TIMEOUT)
        super().load()


def test_not_ready_is_503_with_retry_after_until_loaded(live_server, tiny_models):
    config = ServeConfig(model="tiny", warmup=False)
    server = live_server(create_app(config, service=GatedService(config, generator=tiny_models["generator"])))
    with server.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "loading" and ready.headers["Retry-After"]
        r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 1})
        error_of(r, 503, "not_ready")
        assert r.headers["Retry-After"].isdigit()
        error_of(c.post("/v1/score", json={"texts": ["x"]}), 503, "not_ready")
        assert c.get("/v1/models").json()["data"][0]["ready"] is False
        GatedService.release.set()
        server.wait_ready()
        assert c.post("/v1/images/generations", json={"prompt": "x", "steps": 1}).status_code == 200


def test_a_model_that_fails_to_load_is_503_with_its_error(live_server, tmp_path):
    config = ServeConfig(model=str(tmp_path / "missing"), warmup=False)
    server = live_server(create_app(config))
    with server.client() as c:
        wait_for(lambda: c.get("/readyz").json()["status"] == "failed", "the load to fail")
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "missing" in ready.json()["error"]
        error = error_of(c.post("/v1/images/generations", json={"prompt": "x"}), 503, "load_failed")
        assert "missing" in error["message"]


def test_api_key_guards_every_route_but_the_open_ones(live_server, tiny_models):
    config = ServeConfig(model="tiny", scorers=("tiny",), warmup=False, api_key="s3cret")
    service = Service(config, generator=tiny_models["generator"], scorers=[tiny_models["image"]])
    server = live_server(create_app(config, service=service))
    with server.client() as c:
        for path in ("/healthz", "/", "/static/index.html"):
            assert c.get(path).status_code == 200, path
        server.wait_ready()  # /readyz is open too
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/images/generations"),
                             ("POST", "/v1/score"), ("POST", "/v1/images/edits"), ("GET", "/docs")):
            r = c.request(method, path, json={"prompt": "x"})
            error = error_of(r, 401, "invalid_api_key")
            assert r.headers["WWW-Authenticate"] == "Bearer" and error["type"] == "authentication_error"
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(c.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        assert c.get("/metrics", headers=good).status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "x", "steps": 1}, headers=good)
        assert r.status_code == 200, r.text


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTGEN_API_KEY", "from-env")
    assert ServeConfig(model="tiny").resolved_api_key() == "from-env"
    assert ServeConfig(model="tiny", api_key="given").resolved_api_key() == "given"
    assert "given" not in repr(ServeConfig(model="tiny", api_key="given"))


def test_a_request_refused_part_way_cancels_what_it_had_submitted():
    # /v1/score submits one runtime request per item: when the queue fills at the third, the two already
    # accepted must not stay queued for a client that got a 429.
    from concurrent.futures import Future

    from fastgen.runtime.requests import OverloadedError
    from fastgen.serve.service import submit_all

    class Runtime:
        def __init__(self) -> None:
            self.accepted: list[Future] = []

        def submit(self, request):
            if len(self.accepted) == 2:
                raise OverloadedError(2, 2, 1.0)
            self.accepted.append(Future())
            return self.accepted[-1]

    runtime = Runtime()
    with pytest.raises(OverloadedError):
        submit_all(runtime, ["a", "b", "c"])
    assert [f.cancelled() for f in runtime.accepted] == [True, True]
    assert len(submit_all(Runtime(), ["a", "b"])) == 2
