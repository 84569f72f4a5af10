"""Ray Serve's own HTTP errors in fastgen's JSON shape: a middleware for Ray's proxy.

Some answers never reach a replica, so the app cannot shape them: Ray's proxy answers a full queue
(``max_queued_requests``) with 429 and ``Retry-After`` (as :mod:`fastgen.serve.ray` configures
it) but a plain-text body, an application with no replica up with a plain-text 503, and a replica
that dies mid-request with uvicorn's bare 500. This middleware, wrapped around the proxy, turns
those into ``{"error": {"message", "type", "param", "code"}}`` bodies (status and headers kept),
a response its replica left unfinished (it died) into 503 ``replica_failed`` with ``Retry-After``
when nothing was sent yet, and into a final ``error`` event when it was an event stream, so a client
sees one error shape whichever machine failed. Responses of the app itself pass through untouched (they are JSON
already, or not errors).

Ray's proxy loads it from the environment variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
fastgen.serve.ray_proxy:middlewares``, read in the proxy's process: :func:`fastgen.serve.ray.run`
sets it before starting a local Ray instance; on a cluster, set it where ``ray start`` runs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastgen.serve.errors import APIError, one_line

logger = logging.getLogger(__name__)

#: Statuses Ray's proxy answers by itself: 408 request timeout, 429 / 503 backpressure and unavailability.
PROXY_STATUSES = {
    408: ("timeout_error", "request_timeout"),
    429: ("rate_limit_error", "overloaded"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "unavailable"),
}
#: Retry-After (seconds) of a request whose replica died before answering.
REPLICA_FAILED_RETRY_S = 1


def _error_body(error: APIError) -> bytes:
    return json.dumps(error.body()).encode()


class JSONErrors:
    """ASGI middleware around Ray's proxy (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"started": False, "complete": False, "stream": False, "held": None, "body": b""}

        async def shaped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = message.get("headers") or []
                ctype = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"")
                state["started"] = True
                state["stream"] = ctype.startswith(b"text/event-stream")
                if message["status"] in PROXY_STATUSES and ctype.startswith(b"text/plain"):
                    state["held"] = message  # Ray's own answer: rewritten once its body is complete
                    return
            elif kind == "http.response.body":
                if not message.get("more_body", False):
                    state["complete"] = True
                if state["held"] is not None:
                    state["body"] += message.get("body", b"")
                    if message.get("more_body", False):
                        return
                    held, state["held"] = state["held"], None
                    await self._send_json(send, held, state["body"])
                    return
            await send(message)

        failure: Exception | None = None
        try:
            await self.app(scope, receive, shaped)
        except Exception as exc:  # Ray's proxy answers its own failures; anything else is a surprise
            failure = exc
        if not state["complete"]:
            # Ray's proxy ends a request whose replica died without finishing its response (nothing
            # sent: uvicorn would answer a bare 500; a stream: the connection just closes).
            await self._unfinished(send, state, failure)
        elif failure is not None:
            raise failure

    @staticmethod
    async def _send_json(send: Any, start: dict[str, Any], text: bytes) -> None:
        status = start["status"]
        kind, code = PROXY_STATUSES[status]
        message = one_line(text.decode("utf-8", "replace")) or f"HTTP {status}"
        body = _error_body(APIError(status, message, type=kind, code=code))
        headers = [(k, v) for k, v in start.get("headers") or []
                   if bytes(k).lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _unfinished(send: Any, state: dict[str, Any], failure: Exception | None) -> None:
        """The response did not finish: its replica stopped (or the proxy failed) while serving it."""
        why = f" ({type(failure).__name__})" if failure is not None else ""
        logger.warning("a request ended before its response was complete%s", why)
        error = APIError(503, f"the replica serving this request stopped before it finished{why}: retry the "
                         "request", type="service_unavailable", code="replica_failed",
                         headers={"Retry-After": str(REPLICA_FAILED_RETRY_S)})
        if not state["started"]:
            body = _error_body(error)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"retry-after", str(REPLICA_FAILED_RETRY_S).encode())]
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif state["stream"]:  # an event stream: end it with the error event the app's streams end with
            data = json.dumps(error.body(), separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"event: error\ndata: {data}\n\n".encode()})
        elif failure is not None:
            raise failure  # a body cut short: only closing the connection tells the client
        # else: a body cut short; returning lets the server close the connection, which the client sees


def middlewares() -> list[Any]:
    """What Ray's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its extra middleware."""
    from starlette.middleware import Middleware

    return [Middleware(JSONErrors)]


__all__ = ["JSONErrors", "middlewares"]
