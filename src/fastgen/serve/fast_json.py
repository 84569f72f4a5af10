"""The scoring routes' JSON requests, served at the ASGI level ahead of FastAPI's routing.

A scoring request's own work is a few milliseconds; FastAPI's per-request machinery (the router's
match over every route, the exception middleware, the dependency solver, the body parser) costs a
third of a millisecond of it on a small CPU, all of it holding the GIL the engines' threads need.
:class:`JSONRoutes` answers ``POST`` requests to its paths whose body is JSON (by its content type) with
the same handlers the FastAPI routes call (so the two cannot disagree), and passes everything else
on. The FastAPI routes stay: they document the API (``/docs``, ``/openapi.json``) and take every
other body (multipart forms; other content types, answered as before).

The handlers get the raw body and the ASGI ``receive`` (to watch for the client leaving) and return
a Response. Bodies that do not validate are answered as FastAPI's would be (400 naming the field);
other errors go on to the outer :class:`~fastgen.serve.middleware.Guard`, which maps them. The
request's ``scope["route"]`` is the FastAPI route of the same path, so the HTTP metrics label it
the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from fastgen.serve.errors import validation_error

#: ``handler(body, receive) -> Response``.
Handler = Callable[[bytes, Any], Awaitable[Response]]


async def read_body(receive: Any) -> bytes:
    """The whole request body (the Guard's receive counts it against the size limit)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _json_body(scope: dict[str, Any]) -> bool:
    """Whether the body is JSON as FastAPI reads one: no content type, ``application/json`` or
    ``...+json`` (anything else, multipart forms included, goes to the FastAPI routes, which answer it
    as before)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return True


def route_path(scope: dict[str, Any]) -> str:
    """The path the app routes on: under a mount or a proxy's route prefix (Ray Serve's), ``path``
    still starts with ``root_path``, which routing strips (as Starlette's router does)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class JSONRoutes:
    """ASGI middleware: a JSON ``POST`` to one of ``handlers``' paths goes to its handler;
    the rest to ``app``. ``routes``: path -> the FastAPI route object (for the metrics' label)."""

    def __init__(self, app: Any, *, handlers: dict[str, Handler], routes: dict[str, Any]) -> None:
        self.app = app
        self.handlers = handlers
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = route_path(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        handler = self.handlers.get(path) if path is not None else None
        if handler is None or not _json_body(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.routes.get(path)
        try:
            response = await handler(await read_body(receive), receive)
        except ValidationError as exc:
            error = validation_error(list(exc.errors()))
            response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        await response(scope, receive, send)


__all__ = ["Handler", "JSONRoutes", "read_body", "route_path"]
