"""The Ray Serve deployments of ``fastgen serve --ray`` (see :mod:`fastgen.serve.ray`).

* ``FastgenIngress`` + :func:`make_builder`: an app replica. ``serve.ingress(builder)`` runs the
  builder on each replica, so each builds its own app (:func:`fastgen.serve.create_app`: its own
  Service, Runtime and engines). Its ``reconfigure``, which Ray Serve calls after the app's startup
  and before routing any request to the replica, waits until the engines are loaded and warm.
  Every response carries ``X-Fastgen-Replica`` (the replica's id), so a client or test can see which
  replica served it.
* ``FastgenScorer``: the image classifier in its own deployment (a Service with that classifier
  alone); :class:`RayImageScorer` is the app's client of it (``image_scorer`` of ``create_app``).
  Images go as uint8 (H, W, 3) arrays and scores come back as plain dicts: no model object, and no
  fastgen class, crosses the process boundary.

Ray is imported by what calls into here (the replicas, :func:`fastgen.serve.ray.build_application`),
never at import time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastgen.errors import FastgenError
from fastgen.runtime.requests import EngineError, OverloadedError

logger = logging.getLogger(__name__)

#: Response header naming the replica that served the request.
REPLICA_HEADER = "X-Fastgen-Replica"
#: How often a starting replica checks whether its engines are ready (seconds).
READY_POLL_S = 0.1


class ReplicaHeader:
    """ASGI middleware: ``X-Fastgen-Replica: <replica id>`` on every HTTP response."""

    def __init__(self, app: Any, *, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # not on a replica (a test building the app directly)
        return "local"


def build_replica_app(config: dict[str, Any], *, app_name: str, scorer_deployment: str | None,
                      scorer_name: str | None = None) -> Any:
    """The ASGI app of one replica: ``create_app`` over ``config`` (a ServeConfig as a dict), with a
    :class:`RayImageScorer` on the scorer deployment when there is one (``scorer_name``: the name
    requests give for it; default ``image``)."""
    from fastgen.serve.app import create_app
    from fastgen.serve.config import ServeConfig

    image_scorer = None
    if scorer_deployment is not None:
        from ray import serve

        image_scorer = RayImageScorer(serve.get_deployment_handle(scorer_deployment, app_name=app_name),
                                      name=scorer_name)
    from fastgen.serve.server import freeze_heap

    app = create_app(ServeConfig.from_dict(config), image_scorer=image_scorer)
    app.state.on_ready = freeze_heap  # the replica's process is ours: its loaded heap out of the collector's sight
    app.add_middleware(ReplicaHeader, replica=_replica_id())
    return app


def make_builder(config: dict[str, Any], *, app_name: str, scorer_deployment: str | None,
                 scorer_name: str | None = None) -> Any:
    """The function ``serve.ingress`` calls on each replica to build its app (a plain closure: Ray
    ships it to the replicas by value, with ``config`` in it)."""

    def build() -> Any:
        return build_replica_app(config, app_name=app_name, scorer_deployment=scorer_deployment,
                                 scorer_name=scorer_name)

    return build


class FastgenIngress:
    """An app replica (wrapped by ``serve.ingress(builder)`` and ``serve.deployment``).

    ``scorer``: the scorer deployment's handle when there is one (binding it makes Ray deploy it
    with the app; the app reaches it through :class:`RayImageScorer`). ``ready_timeout_s``: how long
    the engines may take to load before the replica's start counts as failed.
    """

    def __init__(self, scorer: Any = None, *, ready_timeout_s: float = 1800.0) -> None:
        self._scorer = scorer
        self._ready_timeout_s = float(ready_timeout_s)

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Ray Serve calls this once the app has started (and again when the replica's rank changes),
        before the replica gets traffic: wait for the engines, so no request meets a cold replica
        (``rank`` in the signature is what makes Ray call it without a user_config)."""
        service = self.app.state.service  # type: ignore[attr-defined]  # set by ASGIAppReplicaWrapper
        client = getattr(service, "image_scorer", None)
        if isinstance(client, RayImageScorer) and client.labels is None:
            await client.fetch_labels()
        deadline = time.monotonic() + self._ready_timeout_s
        while service.state != "ready":
            if service.state == "failed":
                raise RuntimeError(f"the replica's engines failed to load: {service.error}")
            if service.state == "closed":
                raise RuntimeError("the replica was closed while its engines were loading")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica's engines were not ready after {self._ready_timeout_s:g} s "
                                   "(ready_timeout_s)")
            await asyncio.sleep(READY_POLL_S)


class FastgenScorer:
    """The image classifier as a deployment: a Service with that classifier alone (its own runtime,
    batching the calls of every app replica), loaded and warm before the replica takes calls."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from fastgen.serve.config import ServeConfig
        from fastgen.serve.server import freeze_heap
        from fastgen.serve.service import Service

        self.service = Service(ServeConfig.from_dict(config))
        await asyncio.to_thread(self.service.load)
        freeze_heap()

    def labels(self) -> list[str]:
        """The classifier's labels, in logit order."""
        return list(self.service.image_labels() or [])

    async def score(self, images: list[Any]) -> list[dict[str, Any]]:
        """``Score.to_dict()`` of each uint8 (H, W, 3) image."""
        from PIL import Image

        pil = [Image.fromarray(a) for a in images]
        return [s.to_dict() for s in await self.service.score_images(pil)]

    def stats(self) -> dict[str, Any]:
        """The scorer runtime's stats (``Runtime.stats()``): counts, latencies, batch sizes."""
        return self.service.runtime.stats()

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close(timeout=service.config.drain_timeout_s)


def _score(row: dict[str, Any]) -> Any:
    from fastgen.pipelines.scorer import Score

    return Score(probs=dict(row["probs"]), top=[(t["label"], float(t["prob"])) for t in row["top"]],
                 logits=list(row["logits"]))


class RayImageScorer:
    """``image_scorer`` for ``create_app``: scores images on the scorer deployment through a handle.

    Ray's errors become fastgen's, so the app answers them as it would its own: the scorer's full
    queue (BackPressureError) is an OverloadedError (429 with Retry-After), a fastgen error raised
    on the scorer is re-raised as is, and a scorer replica that died is an EngineError.
    """

    def __init__(self, handle: Any, labels: list[str] | None = None, name: str | None = None) -> None:
        self.handle = handle
        self.labels = labels
        self.name = name
        """The scorer name requests may give for it (``--scorer NAME=MODEL``); None: ``image``."""

    async def fetch_labels(self) -> list[str]:
        """Ask the scorer deployment for its labels (the app checks ``rank_by`` against them)."""
        self.labels = list(await self.handle.labels.remote()) or None
        return self.labels or []

    async def score_images(self, images: list[Any]) -> list[Any]:
        import numpy as np

        arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
        try:
            rows = await self.handle.score.remote(arrays)
        except BaseException as exc:
            raise as_fastgen_error(exc) from None
        return [_score(r) for r in rows]


def as_fastgen_error(exc: BaseException) -> BaseException:
    """The fastgen error a failed call to the scorer deployment stands for."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        queued, limit = (list(exc.args[:2]) + [0, 0])[:2]
        return OverloadedError(int(queued), int(limit), exc.retry_after_s or 1.0)
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, FastgenError):
            return cause
        return EngineError(f"the scorer deployment failed: {type(cause or exc).__name__}: "
                           f"{' '.join(str(cause or exc).split())[:300]}")
    if isinstance(exc, RayActorError):
        return EngineError("the scorer replica stopped while scoring (it is being replaced): retry the request")
    return exc


__all__ = ["REPLICA_HEADER", "FastgenIngress", "FastgenScorer", "RayImageScorer", "ReplicaHeader",
           "build_replica_app", "make_builder"]
