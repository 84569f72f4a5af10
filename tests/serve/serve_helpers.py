"""Helpers of the HTTP tests: a live server in a thread, polling, SSE parsing, engines with faults."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx

#: Seconds any one wait in these tests may take before it counts as a hang (never a timing assertion).
TIMEOUT = 120.0


class LiveServer:
    """An app on uvicorn in a thread, on 127.0.0.1 and a free port (bound here, so no race for it)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # A thread is not the main thread: uvicorn installs no signal handlers there.
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def service(self):
        return self.app.state.service

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self, headers: dict | None = None) -> LiveServer:
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(f"{self.url}/readyz", headers=headers).status_code != 200:
            assert time.monotonic() < deadline and self.service.state != "failed", self.service.error
            time.sleep(0.05)
        return self

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


def runtime_counts(service, kind: str = "generate") -> dict[str, int]:
    """How the runtime's requests of ``kind`` ended so far: {status: count}."""
    stats = service.runtime.stats()
    return dict(stats["kinds"].get(kind, {}).get("requests", {}))


def wait_for(predicate, what: str, timeout: float = TIMEOUT):
    """Poll ``predicate`` until it is truthy (a hang fails after ``timeout``; no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sse_events(lines) -> list[tuple[str, str]]:
    """(event, data) pairs from an iterator of text/event-stream lines."""
    events, name, data = [], None, []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and name is not None:
            events.append((name, "\n".join(data)))
            name, data = None, []
    return events


class Faults:
    """Switches for :class:`FaultyEngine`: ``gate`` (a call waits until it is set) and ``nan`` (the
    output becomes NaN)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.nan = False
        self.calls = 0


class FaultyEngine:
    """An engine that waits on ``faults.gate`` before each call and returns NaN while ``faults.nan``."""

    def __init__(self, engine: Any, faults: Faults) -> None:
        self._engine = engine
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __call__(self, feeds: Any) -> Any:
        self._faults.calls += 1
        assert self._faults.gate.wait(TIMEOUT), "the gate was never opened"
        out = self._engine(feeds)
        if self._faults.nan:
            out = {k: v * float("nan") for k, v in out.items()}
        return out


def faulty_generator(generator: Any, faults: Faults) -> Any:
    """``generator``'s engines, its UNet behind :class:`FaultyEngine`."""
    from fastgen.pipelines.generator import Generator

    return Generator(unet=FaultyEngine(generator.unet, faults), vae_decoder=generator.vae_decoder,
                     text_encoder=generator.text_encoder, text_encoder_2=generator.text_encoder_2,
                     vae_encoder=generator.vae_encoder)
