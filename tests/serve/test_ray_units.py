"""``fastgen.serve.ray`` without a Ray instance: the options and their checks, what each deployment is
given, and the two ASGI middlewares (Ray's proxy errors as JSON, the replica header) on fake apps.
Fast: these run in the default suite; the Ray tests themselves are in test_ray.py (``-m ray``)."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.runtime.config import RuntimeConfig
from fastgen.runtime.requests import EngineError, OverloadedError
from fastgen.serve.config import ServeConfig
from fastgen.serve.ray import RayOptions, replica_config, scorer_config, scorer_ongoing_requests
from fastgen.serve.ray_deploy import REPLICA_HEADER, ReplicaHeader
from fastgen.serve.ray_proxy import JSONErrors

CONFIG = ServeConfig(model="tiny", scorers=("tiny", "tiny:text-classifier"), port=8123)


def test_options_round_trip_and_default_to_a_fixed_local_deployment():
    options = RayOptions(replicas=3, max_queued_requests=None)
    assert RayOptions.from_dict(options.to_dict()) == options
    assert not options.autoscaling and options.ray_address is None
    assert RayOptions(max_replicas=4).autoscaling


@pytest.mark.parametrize(("fields", "flag"), [
    ({"replicas": 0}, "replicas"),
    ({"replicas": True}, "replicas"),
    ({"min_replicas": -1}, "min-replicas"),
    ({"max_replicas": 0}, "max-replicas"),
    ({"replicas": 5, "max_replicas": 4}, "replicas"),
    ({"replicas": 1, "min_replicas": 2, "max_replicas": 4}, "replicas"),
    ({"max_ongoing_requests": 0}, "max-ongoing-requests"),
    ({"target_ongoing_requests": 0}, "target-ongoing-requests"),
    ({"target_ongoing_requests": 32, "max_replicas": 2}, "target-ongoing-requests"),  # > max_ongoing_requests
    ({"max_queued_requests": 0}, "max-queued-requests"),
    ({"retry_after_s": -1}, "retry-after-s"),
    ({"replica_gpus": float("nan")}, "replica-gpus"),
    ({"scorer_cpus": -0.5}, "scorer-cpus"),
    ({"ray_address": " "}, "ray-address"),
    ({"app_name": "a#b"}, "app-name"),
    ({"route_prefix": "api"}, "route-prefix"),
    ({"ready_timeout_s": 0}, "ready-timeout-s"),
    ({"separate_scorer": "yes"}, "separate-scorer"),
])
def test_bad_options_name_the_flag(fields, flag):
    with pytest.raises(InvalidArgumentError) as err:
        RayOptions(**fields)
    assert err.value.argument == flag
    assert "\n" not in str(err.value)


def test_each_replica_queues_everything_ray_may_send_it(monkeypatch):
    monkeypatch.setenv("FASTGEN_API_KEY", "secret")
    config = CONFIG.replace(max_images=8, max_items=32, runtime=RuntimeConfig(max_queue=10))
    replica = replica_config(config, RayOptions(max_ongoing_requests=4))
    # 4 HTTP requests of up to 32 runtime requests each: the runtime never rejects what Ray routed to it.
    assert replica.runtime.max_queue == 4 * 32
    assert replica.api_key == "secret"  # resolved here: replicas need not share this environment
    assert replica.scorers == CONFIG.scorers and replica.model == "tiny"


def test_a_separate_scorer_takes_the_image_classifier_out_of_the_app():
    options = RayOptions(separate_scorer=True, max_ongoing_requests=2)
    replica = replica_config(CONFIG, options)
    assert replica.scorers == ("tiny:text-classifier",)
    scorer = scorer_config(CONFIG, options)
    assert (scorer.model, scorer.scorers, scorer.api_key) == (None, ("tiny",), None)
    # A scorer replica takes enough calls to fill a batch (max_batch_size 32), each up to 64 images.
    assert scorer_ongoing_requests(CONFIG, options) == 32
    assert scorer.runtime.max_queue == 32 * max(CONFIG.max_images, CONFIG.max_items)
    with pytest.raises(InvalidArgumentError, match="no image classifier"):
        replica_config(CONFIG.replace(scorers=("tiny:text-classifier",)), options)
    with pytest.raises(InvalidArgumentError, match="serve nothing"):
        replica_config(ServeConfig(scorers=("tiny",)), options)


def test_deployment_options_map_onto_ray_serve():
    pytest.importorskip("ray.serve")
    from fastgen.serve.ray import deployment_options

    fixed = deployment_options(RayOptions(replicas=2, replica_gpus=1, retry_after_s=1.5), drain_timeout_s=12)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed["graceful_shutdown_timeout_s"] == 12
    assert (fixed["backpressure_config"].status_code, fixed["backpressure_config"].retry_after_s) == (429, 1.5)
    auto = deployment_options(RayOptions(replicas=2, min_replicas=1, max_replicas=6, target_ongoing_requests=3,
                                         max_queued_requests=None))
    assert "num_replicas" not in auto and auto["max_queued_requests"] == -1
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "initial_replicas": 2,
                                          "target_ongoing_requests": 3, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0}
    scorer = deployment_options(RayOptions(scorer_replicas=3, scorer_gpus=0.5), scorer_ongoing=40)
    assert scorer["num_replicas"] == 3 and scorer["ray_actor_options"]["num_gpus"] == 0.5
    assert scorer["max_ongoing_requests"] == 40 and scorer["max_queued_requests"] == -1  # bounded by its callers


def test_app_builder_makes_the_application_of_a_serve_config_file():
    pytest.importorskip("ray.serve")
    from ray.serve import Application

    from fastgen.serve.ray import app_builder

    app = app_builder({"config": {"model": "tiny", "scorers": ["tiny"]},
                       "options": {"max_replicas": 3, "separate_scorer": True}})
    assert isinstance(app, Application)  # built without a Ray instance: nothing starts until it is run
    with pytest.raises(InvalidArgumentError, match="args"):
        app_builder({"config": {"model": "tiny"}, "replicas": 2})
    with pytest.raises(InvalidArgumentError, match="replicas"):
        app_builder({"config": {"model": "tiny"}, "options": {"replicas": 0}})


def test_run_needs_a_fixed_port():
    from fastgen.serve.ray import run

    with pytest.raises(InvalidArgumentError) as err:
        run(CONFIG.replace(port=0), RayOptions(), blocking=False)
    assert err.value.argument == "port"


# --- the ASGI middlewares, on fake apps ------------------------------------------------------------------


def _call(middleware, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": scope_type, "path": "/"}, receive, send))
    return sent


def _app(*messages, then=None):
    async def app(scope, receive, send):
        for message in messages:
            await send(message)
        if then is not None:
            raise then
    return app


def _start(status: int, ctype: bytes, *extra) -> dict:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype), *extra]}


def _headers(message: dict) -> dict[bytes, bytes]:
    return {bytes(k).lower(): bytes(v) for k, v in message["headers"]}


def test_ray_backpressure_gets_the_apps_json_error_and_keeps_retry_after():
    text = b"Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
    sent = _call(JSONErrors(_app(_start(429, b"text/plain; charset=utf-8", (b"retry-after", b"2")),
                                 {"type": "http.response.body", "body": text})))
    start, body = sent
    assert start["status"] == 429
    headers = _headers(start)
    assert headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    error = json.loads(body["body"])["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    assert error["message"] == text.decode() and int(headers[b"content-length"]) == len(body["body"])


def test_the_apps_own_responses_pass_through_untouched():
    messages = (_start(429, b"application/json", (b"retry-after", b"3")),
                {"type": "http.response.body", "body": b'{"error": {}}'})
    assert _call(JSONErrors(_app(*messages))) == list(messages)
    stream = (_start(200, b"text/event-stream"), {"type": "http.response.body", "body": b"event: a\n\n", "more_body": True},
              {"type": "http.response.body", "body": b""})
    assert _call(JSONErrors(_app(*stream))) == list(stream)


def test_a_request_whose_replica_died_gets_a_503_to_retry():
    sent = _call(JSONErrors(_app()))  # Ray's proxy returns without a response when the replica dies
    assert sent[0]["status"] == 503 and _headers(sent[0])[b"retry-after"] == b"1"
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_failed"


def test_a_stream_whose_replica_died_ends_with_an_error_event():
    sent = _call(JSONErrors(_app(_start(200, b"text/event-stream"),
                                 {"type": "http.response.body", "body": b"event: progress\ndata: {}\n\n",
                                  "more_body": True})))
    last = sent[-1]
    assert last["type"] == "http.response.body" and not last.get("more_body", False)
    name, data = last["body"].decode().strip().split("\n")
    assert name == "event: error" and json.loads(data.removeprefix("data: "))["error"]["code"] == "replica_failed"


def test_an_exception_after_a_complete_response_is_not_hidden():
    with pytest.raises(RuntimeError):
        _call(JSONErrors(_app(_start(200, b"application/json"), {"type": "http.response.body", "body": b"{}"},
                              then=RuntimeError("late"))))


def test_every_response_names_its_replica():
    sent = _call(ReplicaHeader(_app(_start(200, b"application/json"), {"type": "http.response.body", "body": b"{}"}),
                               replica="abc123"))
    assert _headers(sent[0])[REPLICA_HEADER.lower().encode()] == b"abc123"


def test_scorer_deployment_errors_becomeas_fastgen_errors():
    pytest.importorskip("ray.serve")
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from fastgen.serve.ray_deploy import as_fastgen_error

    full = as_fastgen_error(BackPressureError(num_queued_requests=8, max_queued_requests=8, status_code=429,
                                            retry_after_s=2.0))
    assert isinstance(full, OverloadedError) and (full.queued, full.limit, full.retry_after_s) == (8, 8, 2.0)
    assert isinstance(as_fastgen_error(RayActorError()), EngineError)
    other = ValueError("x")
    assert as_fastgen_error(other) is other


def test_a_replica_that_cannot_load_fails_the_start_in_one_line():
    from fastgen.serve.ray import _deploy_error

    ray_says = RuntimeError("Deploying application fastgen failed: Failed to update the deployments ['FastgenApp'].")
    details = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File ...\n"
               "RuntimeError: the replica's engines failed to load: 'x' is neither a preset nor a path\n")
    error = _deploy_error(ray_says, details)
    assert str(error) == ("the Ray Serve application did not start: the replica's engines failed to load: "
                          "'x' is neither a preset nor a path")
    assert str(_deploy_error(ray_says)).endswith("Failed to update the deployments ['FastgenApp'].")
