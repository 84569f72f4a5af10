"""The app's outer layer, as plain ASGI (no buffering, so event streams and disconnects pass through):
the API key, the body size limit, the HTTP metrics, and the last word on an unexpected error.

* API key: every route but the open ones (``/``, ``/static/...``, ``/healthz``, ``/readyz``) needs
  ``Authorization: Bearer KEY`` when the server has a key; else 401 with ``WWW-Authenticate: Bearer``.
* Body size: a ``Content-Length`` over ``max_body_bytes`` is refused before anything is read; a body
  without one (chunked) is counted as it is read, and refused as soon as it passes the limit.
* Metrics: ``fastgen_http_requests_total{route,method,code}`` and
  ``fastgen_http_request_duration_seconds{route}`` (the route's path template: a bounded set of labels).
* An exception nothing else handled: logged with its traceback, answered 500 ``internal error``.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastgen.serve.errors import APIError, BodyTooLargeError, from_exception

logger = logging.getLogger(__name__)

#: Routes any client may call without the API key: the page, its files, and the probes.
OPEN_PATHS = ("/", "/healthz", "/readyz")
OPEN_PREFIXES = ("/static/",)
#: Seconds: from a cached page to a long generation.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class HTTPMetrics:
    """The HTTP series, in their own registry (one per app: two apps in a process never clash)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fastgen_http_requests", "HTTP requests answered, by route, method and status code.",
                                ("route", "method", "code"), registry=self.registry)
        self.duration = Histogram("fastgen_http_request_duration_seconds",
                                  "Time from the request to the end of its response (streams included), by route.",
                                  ("route",), buckets=DURATION_BUCKETS, registry=self.registry)

    def observe(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(route, method, str(code)).inc()
        self.duration.labels(route).observe(seconds)

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


async def send_error(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: key, body limit, metrics, last-resort 500 (see the module docstring)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: HTTPMetrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, scope: dict[str, Any]) -> bool:
        path = scope.get("path", "")
        if self.api_key is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # Constant-time comparison: the time taken must not tell how much of a guess was right.
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _content_length(self, scope: dict[str, Any]) -> int | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            if not self._authorized(scope):
                await send_error(send_wrapper, APIError(
                    401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                    type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
            length = self._content_length(scope)
            if length is not None and length > self.max_body_bytes:
                await send_error(send_wrapper, BodyTooLargeError(self.max_body_bytes))
                return
            await self.app(scope, self._counting(receive), send_wrapper)
        except Exception as exc:  # nothing inside handled it
            if status:  # the response had started: nothing left to say but to end the connection
                logger.error("error after the response started (%s %s)", scope.get("method"), scope.get("path"),
                             exc_info=exc)
                raise
            await send_error(send_wrapper, from_exception(exc))
        finally:
            route = scope.get("route")
            # Answered before routing (401, 413 by Content-Length): "other"; no such route: "unmatched".
            label = getattr(route, "path", None) or ("unmatched" if status and status[0] == 404 else "other")
            self.metrics.observe(label, scope.get("method", ""), status[0] if status else 500,
                                 time.perf_counter() - start)

    def _counting(self, receive: Any) -> Any:
        seen = 0
        limit = self.max_body_bytes

        async def wrapper() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        return wrapper


__all__ = ["DURATION_BUCKETS", "Guard", "HTTPMetrics", "OPEN_PATHS", "OPEN_PREFIXES", "send_error"]
