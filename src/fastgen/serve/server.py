"""Serving an app on uvicorn until SIGTERM (or Ctrl-C), draining what was accepted, then exiting cleanly.

On the signal the listening socket closes at once (new connections are refused), idle connections
close, requests in flight get up to ``drain_timeout_s`` to finish (then they are cancelled), the
runtime shuts down, and :func:`run` returns: the process exits 0. uvicorn itself re-raises the
signal after its shutdown, so the process would die of it (exit -15): :class:`Server` does not.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from fastgen.errors import InvalidArgumentError
from fastgen.serve.config import ServeConfig

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server(uvicorn.Server):
    """uvicorn's server, ending on SIGTERM / SIGINT with a drain and a normal return."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.warning("%s: no new connections; finishing the requests in flight",
                           signal.Signals(sig).name)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); one line naming the port if taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgumentError("host", host, "an address or host name, e.g. 127.0.0.1 or 0.0.0.0",
                                   reason=str(exc.strerror or exc)) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError("port", port, reason=f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                   "choose another --port (0: any free port)") from None
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    """``http://host:port`` of a listening socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def freeze_heap() -> None:
    """Collect once, then move every object alive (the models, the engines, the libraries: millions of
    objects) out of the cyclic collector's sight (``gc.freeze``): a full collection that scans them
    takes a server's event loop away for 100 ms and more at random moments, which showed as p99
    spikes of 150 to 200 ms under load. Done by the server process only, once its engines are warm."""
    gc.collect()
    gc.freeze()
    logger.info("server heap frozen: %d objects out of the cyclic collector's sight", gc.get_freeze_count())


def run(config: ServeConfig, *, app: Any = None, sock: socket.socket | None = None,
        log_level: str = "info", on_listening: Callable[[str], None] | None = None,
        on_ready: Callable[[], None] | None = None) -> None:
    """Serve ``app`` (default: ``create_app(config)``) on ``sock`` (default: ``config.host:port``) until
    SIGTERM / SIGINT, then drain and return. If the engines fail to load, the server stops and the
    error is raised here. ``on_listening(url)``: called once the socket is bound; ``on_ready()``: once
    the engines are warm (on the loading thread)."""
    from fastgen.serve.app import create_app

    app = app if app is not None else create_app(config)
    sock = sock if sock is not None else bind(config.host, config.port)
    failures: list[BaseException] = []
    server_box: list[Server] = []

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        if server_box:
            server_box[0].should_exit = True

    def ready() -> None:
        freeze_heap()
        if on_ready is not None:
            on_ready()

    app.state.on_load_failure = on_load_failure
    app.state.on_ready = ready
    uconfig = uvicorn.Config(app, lifespan="on", log_level=log_level, timeout_graceful_shutdown=config.drain_timeout_s,
                             timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]  # a float works
                             proxy_headers=False, server_header=False, access_log=config.access_log)
    server = Server(uconfig)
    server_box.append(server)
    if config.resolved_api_key() is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s without an API key: anyone who can reach it can use it "
                       "(set --api-key or $FASTGEN_API_KEY)", config.host)
    if on_listening is not None:
        on_listening(address(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        raise failures[0]


__all__ = ["Server", "address", "bind", "run"]
