"""The FastAPI app of ``fastgen serve``: an OpenAI-style Images API, scoring, probes and metrics over
one :class:`~fastgen.serve.service.Service`.

Routes: ``GET /`` (the playground), ``/static/...``, ``GET /healthz`` (the process answers),
``GET /readyz`` (503 until the engines are loaded and warm), ``GET /metrics`` (Prometheus),
``GET /v1/models``, ``POST /v1/images/generations`` (JSON; ``"stream": true`` for server-sent
events), ``POST /v1/images/edits`` (multipart: image-to-image, inpainting with a ``mask``), ``POST /v1/score`` (JSON or
multipart; ``model``: which scorer), ``POST /v1/embeddings`` (OpenAI's), ``POST /v1/detect``
(:mod:`fastgen.serve.content`). Errors: :mod:`fastgen.serve.errors`. The event loop never decodes, encodes or waits
on the device: images are decoded and encoded on worker threads, and runtime requests are awaited
as futures. A client that disconnects cancels its runtime requests at their next step. The JSON
bodies of the scoring routes are answered ahead of FastAPI's routing, by the same handlers
(:mod:`fastgen.serve.fast_json`: half of the HTTP layer's cost per scoring request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastgen.errors import FastgenError, InvalidArgumentError
from fastgen.serve import content, sse
from fastgen.serve.config import ServeConfig
from fastgen.serve.errors import APIError, from_exception, one_line, validation_error
from fastgen.serve.fast_json import Handler, JSONRoutes
from fastgen.serve.images import decode_base64_image, decode_image, decode_mask
from fastgen.serve.middleware import Guard, HTTPMetrics
from fastgen.serve.schemas import DetectBody, EmbeddingsBody, GenerationBody, ImageSettings, ScoreBody
from fastgen.serve.service import GenerationParams, ImageScorerClient, Service
from fastgen.version import __version__

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Status recorded for a request whose client went away before its response (nginx's convention).
CLIENT_CLOSED = 499
#: Seconds between disconnect checks, on an ASGI server whose receive() does not wait for the disconnect.
DISCONNECT_POLL_S = 0.1
#: Retry-After (seconds) while the engines load.
LOADING_RETRY_S = 2


def _json(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class ClientGone(Exception):
    """The client disconnected while its request was running (its runtime requests are cancelled)."""


async def until_disconnected(receive: Any, work: Awaitable[Any]) -> Any:
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (its runtime
    requests with it) and :class:`ClientGone` raised. ``receive``: the request's ASGI receive, its
    body already read. A ``receive`` that fails (a proxy's error) counts as the client gone, as
    nobody is left to answer; a cancellation from outside (the server stopping) stays one."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        try:
            # Once the body is read, an ASGI server's receive() waits until the client disconnects:
            # one pending await per request, where polling is_disconnected() cost a cancel scope each
            # time. A server that answers with more (empty) body messages instead is polled.
            while (await receive())["type"] != "http.disconnect":
                await asyncio.sleep(DISCONNECT_POLL_S)
        except Exception as exc:  # noqa: BLE001 (any failure of the connection ends the request)
            logger.info("the request's connection failed (%s): cancelling it", one_line(exc))
        gone = True
        current.cancel()

    # The work runs in this task (one task less per request than awaiting both): the watcher cancels
    # this task when the client goes, and the cancellation runs the work's own clean-up.
    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:  # cancelled from outside: not the client's doing
            raise
        # Take back the watcher's cancel (Python >= 3.11 counts them); one from outside still pending
        # in the same turn stays a cancellation.
        uncancel = getattr(current, "uncancel", None)
        if uncancel is not None and uncancel() > 0:
            raise
        raise ClientGone() from None
    finally:
        watcher.cancel()


def create_app(config: ServeConfig, *, service: Service | None = None,
               image_scorer: ImageScorerClient | None = None) -> FastAPI:
    """The app serving ``config``'s models (or ``service``'s). Its engines load on a thread once the
    server starts (``/readyz`` says when they are warm); its shutdown drains the runtime for up to
    ``config.drain_timeout_s``. ``image_scorer``: ranks best-of-N candidates instead of a local image
    classifier. ``app.state.service`` is the Service; ``app.state.on_ready()`` and
    ``app.state.on_load_failure(error)``, if set, are called (on the loading thread) when the engines
    are warm or failed to load (``fastgen serve`` says so, or stops the server)."""
    service = service if service is not None else Service(config, image_scorer=image_scorer)
    if image_scorer is not None:
        service.image_scorer = image_scorer
    metrics = HTTPMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.state == "loading":
            # Looked up when called: the server that runs the app sets them after create_app.
            service.start_loading(on_failure=lambda exc: app.state.on_load_failure and app.state.on_load_failure(exc),
                                  on_ready=lambda: app.state.on_ready and app.state.on_ready())
        yield
        await anyio.to_thread.run_sync(service.close, config.drain_timeout_s)

    app = FastAPI(title="fastgen", version=__version__, lifespan=lifespan,
                  description="Image generation and classification on fastgen engines.")
    app.state.service = service
    app.state.http_metrics = metrics
    app.state.on_load_failure = None
    app.state.on_ready = None
    _handlers(app)
    handlers = _routes(app, service, config, metrics)
    routes = {route.path: route for route in app.routes if getattr(route, "path", None) in handlers}
    app.add_middleware(JSONRoutes, handlers=handlers, routes=routes)  # inside the Guard (added last: outermost)
    app.add_middleware(Guard, api_key=config.resolved_api_key(), max_body_bytes=config.max_body_bytes, metrics=metrics)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _json(exc)

    @app.exception_handler(FastgenError)
    async def fastgen_error(request: Request, exc: FastgenError) -> JSONResponse:
        return _json(from_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(validation_error(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError) -> JSONResponse:
        return _json(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, APIError):
            return _json(exc)
        codes = {404: ("not_found", f"no route {request.method} {request.url.path}"),
                 405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}")}
        code, message = codes.get(exc.status_code, ("http_error", one_line(exc.detail)))
        return _json(APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


def _routes(app: FastAPI, service: Service, config: ServeConfig, metrics: HTTPMetrics) -> dict[str, Handler]:
    """Adds the routes; returns the handlers of the JSON bodies JSONRoutes serves."""
    def ready() -> Service:
        if service.state == "ready":
            return service
        if service.state == "failed":
            raise APIError(503, f"the engines failed to load: {one_line(service.error)}",
                           type="service_unavailable", code="load_failed")
        if service.state == "closed":
            raise APIError(503, "the server is shutting down", type="service_unavailable", code="shutting_down")
        raise APIError(503, "the engines are still loading", type="service_unavailable", code="not_ready",
                       headers={"Retry-After": str(LOADING_RETRY_S)})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(404, "no playground page in this installation", code="not_found")
        return FileResponse(page, media_type="text/html")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if service.state == "ready":
            return JSONResponse({"status": "ready", "models": [m["id"] for m in service.models()]})
        body: dict[str, Any] = {"status": service.state}
        headers = {}
        if service.state == "loading":
            headers["Retry-After"] = str(LOADING_RETRY_S)
        if service.error is not None:
            body["error"] = one_line(service.error)
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics_text() + metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.models()}

    async def generate(request: Request, params: GenerationParams, stream: bool) -> Response:
        job = ready().submit_generation(params, stream=stream)
        if stream:
            return StreamingResponse(sse.stream(job), media_type="text/event-stream", headers=sse.HEADERS)
        try:
            return await answer(request.receive, job.run())
        finally:
            job.cancel()

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request) -> Response:
        return await generate(request, body.to_params(), body.stream)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        ready()
        async with _form(request) as form:
            fields: dict[str, Any] = {}
            image = mask = None
            for name, value in form.multi_items():
                if name in ("image", "mask"):
                    if not isinstance(value, UploadFile):
                        raise InvalidArgumentError(name, "a form field", "an image file (multipart upload)")
                    if name == "image":
                        image = value
                    else:
                        mask = value
                elif isinstance(value, UploadFile):
                    raise InvalidArgumentError(name, "a file", reason="only image (and mask) are files")
                else:
                    fields[name] = value
            if image is None:
                raise InvalidArgumentError("image", None, reason="the image to edit is required (a file field)")
            if "adapters" in fields:  # a form field holds the JSON object as text
                fields["adapters"] = _json_object("adapters", fields["adapters"])
            settings = ImageSettings.model_validate(fields, strict=False)
            data = await image.read()
            mask_data = await mask.read() if mask is not None else None

        def decode() -> tuple[Any, Any]:
            pil = decode_image(data, argument="image", max_pixels=config.max_image_pixels)
            if mask_data is None:
                return pil, None
            mask_pil = decode_mask(mask_data, argument="mask", max_pixels=config.max_image_pixels)
            if mask_pil.size != pil.size:
                raise InvalidArgumentError("mask", "{}x{}".format(*mask_pil.size),
                                           reason="the mask must have the image's size ({}x{})".format(*pil.size))
            return pil, mask_pil

        pil, mask_pil = await anyio.to_thread.run_sync(decode)
        return await generate(request, settings.to_params(image=pil, mask=mask_pil), settings.stream)

    async def scores(receive: Any, texts: list[str], raw_images: list[bytes | str], deadline_s: float | None,
                     model: str | None) -> Response:
        service = ready()
        config.check_items(len(texts) + len(raw_images), "images" if raw_images else "texts")
        images = await decode_images(raw_images)
        return await answer(receive, service.score(texts, images, deadline_s=deadline_s, model=model),
                            lambda data: {"object": "list", "data": data})

    async def answer(receive: Any, work: Awaitable[Any], body: Callable[[Any], Any] = lambda out: out) -> Response:
        """``body(await work)`` as JSON; 499 if the client went away first (``work`` cancelled)."""
        try:
            out = await until_disconnected(receive, work)
        except ClientGone:
            logger.info("the client went away: its request was cancelled")
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(body(out))

    async def decode_images(raw_images: list[bytes | str]) -> list[Any]:
        """Uploaded or base64 images as PIL images, decoded on a worker thread (never the event loop's)."""
        def decode_all() -> list[Any]:
            return [decode_image(item, argument=f"images[{i}]", max_pixels=config.max_image_pixels)
                    if isinstance(item, bytes) else
                    decode_base64_image(item, argument=f"images[{i}]", max_pixels=config.max_image_pixels)
                    for i, item in enumerate(raw_images)]

        return await anyio.to_thread.run_sync(decode_all) if raw_images else []

    async def embeddings_of(body: EmbeddingsBody, receive: Any) -> Response:
        service = ready()
        texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
        config.check_items(len(texts) + len(body.images or []), "input" if texts else "images")
        images = await decode_images(list(body.images or []))
        return await answer(receive, content.embeddings(
            service, texts=texts, images=images, model=body.model, encoding_format=body.encoding_format,
            deadline_s=body.deadline_s))

    async def detections_of(body: DetectBody, receive: Any) -> Response:
        service = ready()
        config.check_items(len(body.images), "images")
        images = await decode_images(list(body.images))
        return await answer(receive, content.detect(
            service, images=images, model=body.model, conf=body.conf, iou=body.iou, max_det=body.max_det,
            deadline_s=body.deadline_s))

    # The JSON bodies of these three go through JSONRoutes (fast_json.py); the FastAPI routes below
    # document them and take /v1/score's multipart forms.
    async def score_json(data: bytes, receive: Any) -> Response:
        body = ScoreBody.model_validate_json(data)
        return await scores(receive, list(body.texts or []), list(body.images or []), body.deadline_s, body.model)

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await score_json(await request.body(), request.receive)
        ready()
        texts: list[str] = []
        raw_images: list[bytes | str] = []
        model = None
        async with _form(request) as form:
            for name, value in form.multi_items():
                if name == "files" and isinstance(value, UploadFile):
                    raw_images.append(await value.read())
                elif name == "texts" and not isinstance(value, UploadFile):
                    texts.append(value)
                elif name == "model" and not isinstance(value, UploadFile) and model is None:
                    model = value
                else:
                    raise InvalidArgumentError(name, "a form field", reason="send files (images), texts and "
                                               "at most one model")
        return await scores(request.receive, texts, raw_images, None, model)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsBody, request: Request) -> Response:
        return await embeddings_of(body, request.receive)

    @app.post("/v1/detect")
    async def detect(body: DetectBody, request: Request) -> Response:
        return await detections_of(body, request.receive)

    return {"/v1/score": score_json,
            "/v1/embeddings": lambda data, receive: embeddings_of(EmbeddingsBody.model_validate_json(data), receive),
            "/v1/detect": lambda data, receive: detections_of(DetectBody.model_validate_json(data), receive)}


def _json_object(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidArgumentError(name, text[:40], 'a JSON object, e.g. {"style": 0.8}') from None


@contextlib.asynccontextmanager
async def _form(request: Request):
    """The request's multipart form (uploads closed after use); one that cannot be parsed is a 400."""
    try:
        form = await request.form(max_files=16, max_fields=128)
    except APIError:
        raise
    except StarletteHTTPException as exc:  # starlette's own parse errors (a malformed body)
        raise APIError(400, f"invalid multipart body: {one_line(exc.detail)}", code="invalid_argument") from None
    try:
        yield form
    finally:
        await form.close()


__all__ = ["create_app", "until_disconnected"]
