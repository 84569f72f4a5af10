"""``fastgen serve --ray``: the HTTP app of :mod:`fastgen.serve` as a Ray Serve application.

::

    from fastgen.serve import ServeConfig
    from fastgen.serve.ray import RayOptions, run

    server = run(ServeConfig(model="tiny", scorers=("tiny",)), RayOptions(replicas=2), blocking=False)
    ...                       # http://127.0.0.1:8000, the same routes as `fastgen serve`
    server.shutdown()

Every replica of the ``FastgenApp`` deployment builds its own app with
:func:`fastgen.serve.create_app` (``serve.ingress(builder)``: the builder runs on the replica), so
each holds its own :class:`fastgen.Runtime` and engines, and is handed traffic only once its
engines are loaded and warm. Ray Serve routes each request to a replica with room
(``max_ongoing_requests``), keeps what has no room in a bounded queue at each proxy
(``max_queued_requests``) and rejects the rest with 429 and ``Retry-After`` (the status and header
the single-machine app gives for a full runtime queue; the body is the same JSON when the proxy runs
:mod:`fastgen.serve.ray_proxy`, which :func:`run` arranges on a local instance). Each replica's
runtime ``max_queue`` is sized so that it holds every request Ray may send it: requests wait in
Ray's queue, where any replica can take them, never behind one busy replica. Autoscaling
(``max_replicas``) adds replicas when the requests per replica pass ``target_ongoing_requests``.

``separate_scorer``: the image classifier runs in its own deployment (``FastgenScorer``, e.g. on
another GPU); the app replicas rank best-of-N candidates and score ``/v1/score`` images through a
DeploymentHandle to it (:class:`fastgen.serve.ray_deploy.RayImageScorer`). Images cross as uint8
arrays, never as model objects.

Nothing here imports Ray until it is used: :class:`RayOptions` (and the CLI's flags) need only fastgen.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastgen.core.config import ConfigMixin
from fastgen.errors import FastgenError, InvalidArgumentError, UnsupportedError

logger = logging.getLogger(__name__)

#: Deployment names inside the Ray Serve application.
APP_DEPLOYMENT = "FastgenApp"
SCORER_DEPLOYMENT = "FastgenScorer"
#: Import path of the proxy middleware that gives Ray's own rejections fastgen's JSON error body.
PROXY_CALLBACK = "fastgen.serve.ray_proxy:middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
INSTALL_HINT = "fastgen serve --ray needs Ray Serve: pip install 'fastgen[ray]'"


def _int(name: str, value: Any, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidArgumentError(name.replace("_", "-"), value, f"integers >= {low}" + (", or none" if optional else ""))


def _float(name: str, value: Any, low: float, *, strict: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        raise InvalidArgumentError(name.replace("_", "-"), value, f"finite numbers {'>' if strict else '>='} {low:g}")


@dataclass(frozen=True)
class RayOptions(ConfigMixin):
    """How ``fastgen serve --ray`` runs the app on Ray Serve: replicas, their resources, their queues."""

    OPTION_NAME = "ray option"

    replicas: int = 1
    """Replicas of the app, each with its own runtime and engines; with max_replicas (autoscaling): the
    replicas to start with."""
    min_replicas: int = 1
    """Autoscaling: never fewer replicas than this (0: scale to zero when idle; the first request then
    waits for a replica to load its engines)."""
    max_replicas: int | None = None
    """Autoscaling: at most this many replicas, added while the requests per replica stay above
    target_ongoing_requests; none: a fixed number of replicas (replicas)."""
    target_ongoing_requests: float = 4.0
    """Autoscaling: the requests (running and waiting at the replica) per replica that Ray Serve scales
    the replica count to keep."""
    upscale_delay_s: float = 30.0
    """Autoscaling: seconds the load must stay above target before a replica is added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: seconds the load must stay below target before a replica is removed."""
    max_ongoing_requests: int = 16
    """HTTP requests one replica holds at once (its runtime batches them); more wait in Ray's queue. Each
    replica's runtime max_queue is set to hold this many requests of the largest size (max_images /
    max_items runtime requests each), so a replica never rejects what Ray sends it."""
    max_queued_requests: int | None = 64
    """Requests waiting at each Ray proxy for a replica with room; one more gets 429 with Retry-After,
    as a full runtime queue does on one machine. None: no limit."""
    retry_after_s: float = 1.0
    """The Retry-After (seconds, rounded up) of a request rejected by Ray's full queue."""
    ray_address: str | None = None
    """The Ray cluster to deploy to (ray://HOST:10001, HOST:6379 or auto); none: start a local Ray
    instance in this process, stopped on exit."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each app replica (logical: Ray places replicas by them)."""
    replica_gpus: float = 0.0
    """GPUs Ray reserves for each app replica (a fraction shares one GPU); Ray sets each replica's
    CUDA_VISIBLE_DEVICES, so --device cuda means the replica's own GPU."""
    separate_scorer: bool = False
    """Run the image classifier as its own deployment (e.g. on another GPU); the app replicas rank
    best-of-N candidates and score images through a handle to it. Text classifiers stay in the app."""
    scorer_replicas: int = 1
    """Replicas of the scorer deployment (with separate_scorer)."""
    scorer_cpus: float = 1.0
    """CPUs Ray reserves for each scorer replica (with separate_scorer)."""
    scorer_gpus: float = 0.0
    """GPUs Ray reserves for each scorer replica (with separate_scorer)."""
    app_name: str = "fastgen"
    """Name of the Ray Serve application (several can share a cluster, each on its own route prefix)."""
    route_prefix: str = "/"
    """The URL path the application is served under."""
    ready_timeout_s: float = 1800.0
    """Seconds a new replica may take to load and warm up its engines (building TensorRT engines is
    slow) before Ray Serve counts its start as failed and retries it."""

    def __post_init__(self) -> None:
        _int("replicas", self.replicas, 1)
        _int("min_replicas", self.min_replicas, 0)
        _int("max_replicas", self.max_replicas, 1, optional=True)
        if self.max_replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise InvalidArgumentError("replicas", self.replicas,
                                       f"integers from min-replicas ({self.min_replicas}) to max-replicas "
                                       f"({self.max_replicas}) when autoscaling")
        _int("max_ongoing_requests", self.max_ongoing_requests, 1)
        _float("target_ongoing_requests", self.target_ongoing_requests, 0.0, strict=True)
        if self.max_replicas is not None and self.target_ongoing_requests > self.max_ongoing_requests:
            raise InvalidArgumentError("target-ongoing-requests", self.target_ongoing_requests,
                                       f"numbers > 0 and at most max-ongoing-requests ({self.max_ongoing_requests}): "
                                       "a replica never holds more")
        _int("max_queued_requests", self.max_queued_requests, 1, optional=True)
        for name in ("upscale_delay_s", "downscale_delay_s", "retry_after_s", "replica_cpus", "replica_gpus",
                     "scorer_cpus", "scorer_gpus"):
            _float(name, getattr(self, name), 0.0)
        _float("ready_timeout_s", self.ready_timeout_s, 0.0, strict=True)
        _int("scorer_replicas", self.scorer_replicas, 1)
        if not isinstance(self.separate_scorer, bool):
            raise InvalidArgumentError("separate-scorer", self.separate_scorer, (True, False))
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise InvalidArgumentError("ray-address", self.ray_address, "a Ray address (ray://HOST:10001, HOST:6379, "
                                       "auto), or none for a local instance")
        if not isinstance(self.app_name, str) or not self.app_name.strip() or "#" in self.app_name:
            raise InvalidArgumentError("app-name", self.app_name, "a non-empty name without '#'")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise InvalidArgumentError("route-prefix", self.route_prefix, "a URL path starting with /")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None



# --- what each deployment gets -------------------------------------------------------------------------


def _image_scorer_spec(config: Any) -> str | None:
    """The ``scorers`` entry of the (first) image classifier (a plain [NAME=]MODEL is one), or None;
    other image classifiers, named, stay in the app."""
    for spec, (_, component) in zip(config.scorers, config.scorer_specs()):
        if component in (None, "classifier"):
            return spec
    return None


def replica_config(config: Any, options: RayOptions) -> Any:
    """The :class:`~fastgen.serve.ServeConfig` each app replica serves.

    Its runtime ``max_queue`` holds ``max_ongoing_requests`` requests of the largest size (an image
    is one runtime request: up to ``max_images`` per generation, ``max_items`` per /v1/score), so a
    replica queues everything Ray routes to it and Ray's queue, shared by all replicas, is where the
    rest waits. The API key is resolved here (the replicas may not share this process's
    environment); with ``separate_scorer`` the image classifier is left to the scorer deployment.
    """
    per_request = max(config.max_images, config.max_items)
    runtime = config.runtime.replace(max_queue=options.max_ongoing_requests * per_request)
    if runtime.max_queue != config.runtime.max_queue:
        logger.info("each replica's runtime max_queue is %d (max_ongoing_requests %d x %d runtime requests per "
                    "HTTP request): Ray's queue holds what waits beyond that", runtime.max_queue,
                    options.max_ongoing_requests, per_request)
    changes: dict[str, Any] = {"runtime": runtime, "api_key": config.resolved_api_key()}
    if options.separate_scorer:
        image = _image_scorer_spec(config)
        if image is None:
            raise InvalidArgumentError("separate-scorer", True, reason="no image classifier to deploy apart: add "
                                       "--scorer MODEL")
        changes["scorers"] = tuple(s for s in config.scorers if s != image)
        if config.model is None and not changes["scorers"]:
            raise InvalidArgumentError("separate-scorer", True, reason="the app would serve nothing: there is no "
                                       "generator, and the image classifier is deployed apart")
    return config.replace(**changes)


def scorer_ongoing_requests(config: Any, options: RayOptions) -> int:
    """Calls one scorer replica takes at once: enough to fill one batch of its classifier (a
    best-of-N candidate is one call of one image), and no fewer than an app replica takes."""
    return max(options.max_ongoing_requests, config.runtime.max_batch_size)


def scorer_config(config: Any, options: RayOptions) -> Any:
    """The ServeConfig of a scorer replica: the image classifier alone, its runtime queue holding
    every call Ray may send it (each of up to ``max(max_images, max_items)`` images)."""
    image = _image_scorer_spec(config)
    per_call = max(config.max_images, config.max_items)
    runtime = config.runtime.replace(max_queue=scorer_ongoing_requests(config, options) * per_call)
    return config.replace(model=None, scorers=(image,), runtime=runtime, api_key=None)


def deployment_options(options: RayOptions, *, drain_timeout_s: float = 30.0,
                       scorer_ongoing: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``serve.deployment`` for the app deployment, or with ``scorer_ongoing``
    (its ``max_ongoing_requests``) for the scorer deployment.

    The scorer's callers are the app replicas, whose own admission already bounds how many calls
    they make, so calls waiting for a scorer replica are not limited: a best-of-N request is never
    refused after its images were generated."""
    from ray.serve.config import BackpressureConfig

    scorer = scorer_ongoing is not None
    queued = -1 if options.max_queued_requests is None or scorer else options.max_queued_requests
    out: dict[str, Any] = {
        "name": SCORER_DEPLOYMENT if scorer else APP_DEPLOYMENT,
        "max_ongoing_requests": scorer_ongoing if scorer else options.max_ongoing_requests,
        "max_queued_requests": queued,
        # Ray's default for a full queue is 503 without Retry-After: fastgen's backpressure is 429 with it.
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=options.retry_after_s),
        "ray_actor_options": {"num_cpus": options.scorer_cpus if scorer else options.replica_cpus,
                              "num_gpus": options.scorer_gpus if scorer else options.replica_gpus},
        # Stopping a replica (scale down, update, shutdown) lets its requests finish first, as SIGTERM does.
        "graceful_shutdown_timeout_s": float(drain_timeout_s),
        # A replica that cannot load its engines (a bad model path) fails the same way every time.
        "max_constructor_retry_count": 3,
    }
    if scorer:
        out["num_replicas"] = options.scorer_replicas
    elif options.autoscaling:
        out["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "initial_replicas": options.replicas, "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s, "downscale_delay_s": options.downscale_delay_s,
        }
    else:
        out["num_replicas"] = options.replicas
    return out


def build_application(config: Any, options: RayOptions) -> Any:
    """The bound Ray Serve application (``serve.run`` it, or name :func:`app_builder` in a Serve
    config file): the app deployment, and with ``separate_scorer`` the scorer deployment it calls."""
    try:
        from ray import serve
    except ImportError:
        raise UnsupportedError(INSTALL_HINT) from None
    from fastgen.serve.config import parse_scorer
    from fastgen.serve.ray_deploy import FastgenIngress, FastgenScorer, make_builder

    app_config = replica_config(config, options)
    scorer_name = SCORER_DEPLOYMENT if options.separate_scorer else None
    apart = _image_scorer_spec(config) if options.separate_scorer else None
    builder = make_builder(app_config.to_dict(), app_name=options.app_name, scorer_deployment=scorer_name,
                           scorer_name=None if apart is None else parse_scorer(apart)[0])
    ingress = serve.deployment(**deployment_options(options, drain_timeout_s=config.drain_timeout_s))(
        serve.ingress(builder)(FastgenIngress))
    scorer = None
    if options.separate_scorer:
        scorer = serve.deployment(**deployment_options(options, drain_timeout_s=config.drain_timeout_s,
                                                       scorer_ongoing=scorer_ongoing_requests(config, options)))(
            FastgenScorer)
        scorer = scorer.bind(scorer_config(config, options).to_dict())
    return ingress.bind(scorer, ready_timeout_s=options.ready_timeout_s)


def app_builder(args: dict[str, Any]) -> Any:
    """Ray Serve's application-builder hook, for a Serve config file or a KubeRay RayService::

        import_path: fastgen.serve.ray:app_builder
        args: {config: {model: tiny, scorers: [tiny]}, options: {max_replicas: 4}}

    ``config``: :class:`~fastgen.serve.ServeConfig` fields, ``options``: :class:`RayOptions` fields
    (the address, app name and route prefix come from the config file instead)."""
    from fastgen.serve.config import ServeConfig

    unknown = sorted(set(args) - {"config", "options"})
    if unknown:
        raise InvalidArgumentError("args", unknown[0], ("config", "options"))
    config = ServeConfig.from_dict(dict(args.get("config") or {}))
    return build_application(config, RayOptions.from_dict(dict(args.get("options") or {})))


# --- running ---------------------------------------------------------------------------------------------


class RayServer:
    """A running application: its URL, a handle to the app deployment, and :meth:`shutdown`."""

    def __init__(self, url: str, options: RayOptions, *, owns_ray: bool) -> None:
        self.url = url
        self.options = options
        self._owns_ray = owns_ray

    def handle(self) -> Any:
        """A DeploymentHandle to the app deployment."""
        from ray import serve

        return serve.get_app_handle(self.options.app_name)

    def shutdown(self) -> None:
        """Delete the application (its replicas finish their requests first, up to drain_timeout_s);
        a Ray instance this process started is stopped too."""
        import ray
        from ray import serve

        try:
            serve.delete(self.options.app_name)
        finally:
            if self._owns_ray:
                serve.shutdown()
                ray.shutdown()


def _start_ray(options: RayOptions) -> bool:
    """Connect to ``ray_address``, or start a local instance; True when this process started it."""
    import ray

    if ray.is_initialized():
        return False
    if options.ray_address is not None:
        ray.init(address=options.ray_address, log_to_driver=False)
        return False
    # The proxy's JSON error bodies: read by Ray's proxy actor from its environment, which a local
    # instance inherits from this process (on a cluster, set it where `ray start` runs).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # Ray places replicas by logical CPUs: on one machine, N replicas are what was asked for even
    # where they outnumber the cores (they share them), so the instance counts enough for all of them.
    most = options.max_replicas or options.replicas
    wanted = most * options.replica_cpus + (options.scorer_replicas * options.scorer_cpus
                                           if options.separate_scorer else 0.0)
    num_cpus = max(os.cpu_count() or 1, math.ceil(wanted))
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _deployment_messages(app_name: str) -> str:
    """What Ray Serve says about each deployment of the application (a failed replica's traceback)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the status is only a better message: never let it hide the failure
        return ""
    return "\n".join(d.message for d in app.deployments.values() if d.message) if app is not None else ""


def _deploy_error(exc: BaseException, details: str = "") -> FastgenError:
    """Ray's "Deploying application failed" (and each deployment's status, a traceback per replica)
    as one line: fastgen's own message from the replica when there is one (its engines failed to
    load), else Ray's first line."""
    ours = [line.strip() for line in f"{exc}\n{details}".splitlines()
            if "engines failed to load" in line or "engines were not ready" in line]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = ours[-1].split("RuntimeError: ", 1)[-1] if ours else (lines or [type(exc).__name__])[0]
    return FastgenError(f"the Ray Serve application did not start: {' '.join(detail.split())[:500]}")


def run(config: Any, options: RayOptions | None = None, *, blocking: bool = True,
        on_ready: Callable[[str], Any] | None = None) -> RayServer | None:
    """Serve ``config`` (a :class:`~fastgen.serve.ServeConfig`) on Ray Serve at ``config.host``:
    ``config.port``. Returns once every replica is loaded and warm (``on_ready(url)`` is called
    then): with ``blocking``, waits for SIGINT / SIGTERM and shuts down (returns None); else returns
    the :class:`RayServer`. A replica that cannot start (its engines fail to load) raises a one-line
    FastgenError once Ray Serve gives up on it."""
    options = options or RayOptions()
    if config.port == 0:
        raise InvalidArgumentError("port", 0, "a fixed TCP port (1 to 65535)", reason="Ray Serve's proxy needs a "
                                   "port known in advance")
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise UnsupportedError(INSTALL_HINT) from None
    app = build_application(config, options)  # bad options raise here, before Ray starts
    owns_ray = _start_ray(options)
    try:
        serve.start(http_options={"host": config.host, "port": config.port,
                                 "keep_alive_timeout_s": max(1, round(config.keep_alive_s))})
        try:
            serve.run(app, name=options.app_name, route_prefix=options.route_prefix, blocking=False)
        except RuntimeError as exc:
            raise _deploy_error(exc, _deployment_messages(options.app_name)) from None
    except BaseException:
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
        raise
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    server = RayServer(f"http://{host}:{config.port}{options.route_prefix.rstrip('/')}", options, owns_ray=owns_ray)
    logger.info("fastgen is serving on Ray Serve at %s (application %r)", server.url, options.app_name)
    if on_ready is not None:
        on_ready(server.url)
    if not blocking:
        return server
    _wait_for_signal()
    server.shutdown()
    return None


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (handlers restored after)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopping: the replicas finish their requests first")


__all__ = ["APP_DEPLOYMENT", "SCORER_DEPLOYMENT", "RayOptions", "RayServer", "app_builder", "build_application",
           "deployment_options", "replica_config", "run", "scorer_config", "scorer_ongoing_requests"]
