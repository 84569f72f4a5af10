"""``fastgen serve``: its one-line errors (in-process), and a real server process that serves the tiny
preset with a scorer, then drains on SIGTERM: the request in flight completes 200, the process exits
0, and new connections are refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from serve_helpers import TIMEOUT, wait_for

from fastgen.cli.main import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help(capsys):
    main(["serve", "--help"])  # click's --help returns (exit 0) under main's standalone_mode=False
    out = capsys.readouterr().out
    for flag in ("--scorer", "--host", "--port", "--api-key", "--max-queue", "--drain-timeout-s", "--warmup",
                 "--ray", "--replicas", "--max-replicas", "--max-queued-requests", "--separate-scorer",
                 "--intra-op-threads", "--keep-alive-s", "--batch-wait"):
        assert flag in out, flag


@pytest.mark.parametrize("args,needles", [
    ((), ["MODEL", "--scorer"]),
    (("/no/such/model",), ["/no/such/model"]),
    (("tiny", "--port", "70000"), ["port", "0 to 65535"]),
    (("tiny", "--scorer", "sd15"), ["scorer", "sd15"]),
    (("tiny", "--max-queue", "0"), ["max-queue"]),
    (("tiny", "--intra-op-threads", "2000"), ["intra-op-threads", "0 to 1024"]),
    (("tiny", "--keep-alive-s", "0"), ["keep-alive-s", "> 0"]),
    (("tiny", "--drain-timeout-s", "-1"), ["drain-timeout-s", ">= 0"]),
    (("tiny", "--batch-wait", "sometimes"), ["batch-wait", "adaptive", "fixed"]),
    (("tiny", "--lora", "/no/such/ink.safetensors:0.5"), ["lora", "no such file"]),
    (("--scorer", "tiny", "--lora", "ink.safetensors"), ["lora", "need a generator"]),
    (("tiny", "--profile", "batch=1:x"), ["profile"]),
    (("tiny", "--replicas", "2"), ["replicas", "add --ray"]),  # a Ray option without --ray
    (("tiny", "--ray", "--replicas", "0"), ["replicas"]),
    (("tiny", "--ray", "--port", "0"), ["port"]),  # Ray's proxy needs a fixed port
])
def test_bad_arguments_are_one_line_exit_2(capsys, args, needles):
    assert_one_line(*run_cli(capsys, *args), *needles)


def test_a_port_in_use_is_one_line_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line(*run_cli(capsys, "tiny", "--backend", "torch", "--port", str(port)), "port", str(port))


def test_without_the_serve_extra_it_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    assert_one_line(*run_cli(capsys, "tiny"), "fastapi", "pip install 'fastgen[serve]'")


class Process:
    """``fastgen serve`` in a subprocess, its stderr collected by a thread (so the pipe never fills)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgen.cli", "serve", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def url(self) -> str:
        def found():
            assert self.proc.poll() is None, "\n".join(self.lines)
            return next((ln.split("listening on ", 1)[1].split()[0] for ln in self.lines if "listening on " in ln),
                        None)

        return wait_for(found, "the server to listen")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


def inflight(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "fastgen_inflight_requests"
               for s in f.samples)


def refused(url: str) -> bool:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_serve_tiny_then_drain_on_sigterm():
    server = Process("tiny", "--scorer", "tiny", "--backend", "torch", "--device", "cpu", "--port", "0",
                     "--drain-timeout-s", "60", "--keep-alive-s", "1")
    try:
        url = server.url()
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200, "the server to be ready")
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as idle:  # --keep-alive-s: 1 s idle
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                answer += idle.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            assert idle.recv(4096) == b""  # closed by the server, after its keep-alive timeout
        wait_for(lambda: any("fastgen serve: ready" in line for line in server.lines), "the ready line")
        best = httpx.post(f"{url}/v1/images/generations", timeout=TIMEOUT,
                          json={"prompt": "a car", "steps": 2, "seed": 3, "candidates": 2})
        assert best.status_code == 200, best.text
        assert best.json()["data"][0]["rank"] == 0 and best.json()["data"][0]["seed"] in (3, 4)

        results: list = []

        def slow() -> None:
            results.append(httpx.post(f"{url}/v1/images/generations", timeout=TIMEOUT,
                                      json={"prompt": "a slow one", "steps": 40, "seed": 1}))

        client = threading.Thread(target=slow, daemon=True)
        client.start()
        wait_for(lambda: inflight(url) >= 1, "the request to run")
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refused(url), "new connections to be refused")
        client.join(TIMEOUT)
        assert results and results[0].status_code == 200, results and results[0].text
        assert json.loads(results[0].text)["data"][0]["seed"] == 1
        assert server.proc.wait(TIMEOUT) == 0, "\n".join(server.lines)
        assert any("SIGTERM" in line for line in server.lines)
    finally:
        server.kill()
