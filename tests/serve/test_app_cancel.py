"""A client that disconnects cancels its runtime requests at the next step, streaming or not: the
runtime's counters say the request ended cancelled, and it never succeeded (500 steps would take
the tiny UNet far longer than these tests wait)."""

from __future__ import annotations

import json
import socket

import pytest
from serve_helpers import runtime_counts, wait_for

from fastgen.serve import ServeConfig, Service, create_app

LONG = {"prompt": "a very long generation", "steps": 500, "seed": 1}


@pytest.fixture(scope="module")
def server(live_server, tiny_models):
    config = ServeConfig(model="tiny", warmup=False)
    return live_server(create_app(config, service=Service(config, generator=tiny_models["generator"]))).wait_ready()


def idle(service) -> bool:
    stats = service.runtime.stats()
    return stats["inflight"] == 0 and not any(stats["queued"].values())


def test_closing_a_stream_cancels_its_requests(server):
    service = server.service
    before = runtime_counts(service)
    steps = []
    with server.client() as c:
        with c.stream("POST", "/v1/images/generations", json={**LONG, "n": 2, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    steps.append(json.loads(line[5:]))
                    break  # the first progress event: the requests run; now the client goes away
    assert steps[0]["steps"] > 100 and steps[0]["step"] < steps[0]["steps"]
    after = wait_for(lambda: (c := runtime_counts(service)).get("cancelled", 0) >= before.get("cancelled", 0) + 2
                     and c, "both requests to end cancelled")
    assert after.get("succeeded", 0) == before.get("succeeded", 0)
    wait_for(lambda: idle(service), "the runtime to be idle")


def test_disconnecting_from_a_plain_request_cancels_it(server):
    service = server.service
    before = runtime_counts(service)
    body = json.dumps(LONG).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: service.runtime.stats()["inflight"] >= 1, "the request to run")
    finally:
        sock.close()
    after = wait_for(lambda: (c := runtime_counts(service)).get("cancelled", 0) > before.get("cancelled", 0) and c,
                     "the request to end cancelled")
    assert after.get("succeeded", 0) == before.get("succeeded", 0)
    wait_for(lambda: idle(service), "the runtime to be idle")
