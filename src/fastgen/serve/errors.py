"""How errors leave the HTTP app: one OpenAI-style JSON body, one line, the right status.

``{"error": {"message": "...", "type": "...", "param": ..., "code": ...}}``

=============================================== ====== ===================== ==========================
error                                           status type                  code
=============================================== ====== ===================== ==========================
InvalidArgumentError, UnsupportedError, a body  400    invalid_request_error invalid_argument
that does not validate (``param``: the argument)
missing or wrong API key                        401    authentication_error  invalid_api_key
unknown route / method                          404 /  invalid_request_error not_found /
                                                405                          method_not_allowed
body or image too large                         413    invalid_request_error too_large
OverloadedError (``Retry-After``)               429    rate_limit_error      overloaded
NumericalError                                  500    server_error          numerical_error
anything else (logged with its traceback)       500    server_error          internal_error
engines still loading (``Retry-After``), or     503    service_unavailable   not_ready / shutting_down
failed to load; ShutdownError, engine stuck                                  / engine_unavailable
DeadlineExceededError                           504    timeout_error         deadline_exceeded
=============================================== ====== ===================== ==========================
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from starlette.exceptions import HTTPException

from fastgen.errors import FastgenError, InvalidArgumentError, NumericalError, UnsupportedError
from fastgen.runtime.requests import (
    DeadlineExceededError,
    EngineError,
    EngineTimeoutError,
    OutOfMemoryError,
    OverloadedError,
    RequestError,
    ShutdownError,
)

logger = logging.getLogger(__name__)


def one_line(text: object, limit: int = 2000) -> str:
    """``text`` on one line (a library message may wrap), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class APIError(Exception):
    """An HTTP error of the app's own (auth, limits, readiness, routing) with its JSON body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, one_line(message), type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BodyTooLargeError(APIError, HTTPException):
    """The request body passed ``max_body_bytes`` (raised while it is being read). An HTTPException
    too: FastAPI turns any other error raised while it reads a body into a 400."""

    def __init__(self, limit: int) -> None:
        APIError.__init__(self, 413, f"request body too large: more than {limit} bytes (max_body_bytes)",
                          code="too_large")
        self.status_code, self.detail = self.status, self.message


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds))) if seconds == seconds and seconds != float("inf") else "1"


def param_name(argument: str) -> str:
    """fastgen's argument names (``guidance-scale``, ``prompts[0]``) as the request's field names."""
    return argument.lstrip("-").replace("-", "_")


def from_exception(exc: BaseException) -> APIError:
    """The :class:`APIError` an exception raised while serving a request maps to."""
    if isinstance(exc, APIError):
        return exc
    message = one_line(exc) or type(exc).__name__
    if isinstance(exc, OverloadedError):
        return APIError(429, message, type="rate_limit_error", code="overloaded",
                        headers={"Retry-After": retry_after(exc.retry_after_s)})
    if isinstance(exc, DeadlineExceededError):
        return APIError(504, message, type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, ShutdownError):
        return APIError(503, message, type="service_unavailable", code="shutting_down")
    if isinstance(exc, (EngineTimeoutError, OutOfMemoryError)):
        return APIError(503, message, type="service_unavailable", code="engine_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(exc, NumericalError):
        return APIError(500, message, type="server_error", code="numerical_error")
    if isinstance(exc, InvalidArgumentError):
        return APIError(400, message, code="invalid_argument", param=param_name(exc.argument))
    if isinstance(exc, UnsupportedError):
        return APIError(400, message, code="unsupported")
    if isinstance(exc, (EngineError, RequestError)):
        return APIError(500, message, type="server_error", code="engine_error")
    if isinstance(exc, FastgenError):
        return APIError(400, message, code="invalid_argument")
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError(500, "internal error", type="server_error", code="internal_error")


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A request body (or form) that did not validate: 400 naming the first field at fault."""
    if not errors:
        return APIError(400, "invalid request body", code="invalid_argument")
    first = errors[0]
    # A union's members (``str | list[str]``) name themselves in the location: the field is what the client sent.
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "form") and not _UNION_MEMBER.match(str(p))]
    param = loc[-1] if loc else None
    where = ".".join(loc) if loc else "request body"
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "missing":
        message = "required"
    return APIError(400, f"invalid {where}: {message}", code="invalid_argument", param=param)


__all__ = ["APIError", "BodyTooLargeError", "from_exception", "one_line", "param_name", "retry_after",
           "validation_error"]
