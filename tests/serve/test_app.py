"""The HTTP app over real HTTP: every endpoint's shapes, best-of-N and replay, SSE order, image-to-image,
scoring, input errors, body limits and metrics, against a live uvicorn on loopback (tiny preset)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_helpers import sse_events

from fastgen.serve import ServeConfig, Service, create_app

LABELS = ["clean", "text-heavy", "low-quality", "unsafe"]


@pytest.fixture(scope="module")
def server(live_server, tiny_models):
    config = ServeConfig(model="tiny", scorers=("tiny", "tiny:text-classifier"), max_body_bytes=1 << 20,
                         max_image_pixels=128 * 128, max_images=4, max_items=8)
    service = Service(config, generator=tiny_models["generator"], scorers=[tiny_models["image"], tiny_models["text"]])
    return live_server(create_app(config, service=service)).wait_ready()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response, status: int, param=None, code=None, contains: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "\n" not in error["message"] and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if contains is not None:
        assert contains in error["message"], error
    return error


# --- probes, page, models ------------------------------------------------------------------------------

def test_probes_page_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/index.html").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {"tiny", "tiny:classifier", "tiny:text-classifier"}
    assert by_id["tiny"]["kind"] == "generator" and by_id["tiny"]["ready"] is True
    assert by_id["tiny:classifier"]["kind"] == "image-classifier" and by_id["tiny:classifier"]["labels"] == LABELS
    assert by_id["tiny:text-classifier"]["kind"] == "text-classifier"
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/images/generations"), 405, code="method_not_allowed")


# --- generation ------------------------------------------------------------------------------------------

def test_generation_response_shape_and_seeds(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red car", "n": 2, "steps": 2, "seed": 7,
                                                     "model": "tiny", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int)
    assert [d["seed"] for d in body["data"]] == [7, 8]
    for d in body["data"]:
        assert d["revised_prompt"] is None and d["score"] is None and d["rank"] is None
        assert pixels(d["b64_json"]).shape == (64, 64, 3)
    meta = body["fastgen"]
    assert meta["seeds"] == [7, 8] and meta["size"] == "64x64" and meta["steps"] == 2 and meta["model"] == "tiny"
    assert isinstance(meta["request_id"], str) and meta["latency_ms"]["total"] > 0
    # Image j of seed s is image 0 of seed s + j: any image replays alone.
    again = client.post("/v1/images/generations", json={"prompt": "a red car", "steps": 2, "seed": 8}).json()
    assert np.abs(pixels(again["data"][0]["b64_json"]) - pixels(body["data"][1]["b64_json"])).max() <= 1


def test_best_of_n_ranks_keeps_and_replays(client):
    r = client.post("/v1/images/generations", json={"prompt": "a shoe", "steps": 2, "seed": 11, "candidates": 3,
                                                     "keep": 2, "rank_by": "unsafe"})
    assert r.status_code == 200, r.text
    body = r.json()
    data = body["data"]
    assert [d["rank"] for d in data] == [0, 1]
    assert body["fastgen"]["seeds"] == [11, 12, 13] and body["fastgen"]["candidates"] == 3
    assert body["fastgen"]["rank_by"] == "unsafe"
    values = [d["score"]["value"] for d in data]
    assert values == sorted(values, reverse=True)
    for d in data:
        assert d["seed"] in (11, 12, 13) and d["score"]["rank_by"] == "unsafe"
        assert list(d["score"]["scores"]) == LABELS and d["score"]["value"] == d["score"]["scores"]["unsafe"]
        assert abs(sum(d["score"]["scores"].values()) - 1) < 1e-4
        assert [t["label"] for t in d["score"]["top"]][0] == max(d["score"]["scores"], key=d["score"]["scores"].get)
    # The kept image replays from its seed alone, with the same settings.
    replay = client.post("/v1/images/generations", json={"prompt": "a shoe", "steps": 2, "seed": data[0]["seed"]})
    assert np.abs(pixels(replay.json()["data"][0]["b64_json"]) - pixels(data[0]["b64_json"])).max() <= 1
    # keep defaults to n; rank_by to the classifier's first label.
    default = client.post("/v1/images/generations", json={"prompt": "a shoe", "steps": 2, "seed": 11,
                                                           "candidates": 2}).json()
    assert len(default["data"]) == 1 and default["data"][0]["score"]["rank_by"] == LABELS[0]


def test_sse_events_arrive_in_order(client):
    body = {"prompt": "a lamp", "n": 2, "steps": 3, "seed": 5, "stream": True}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1 and names.count("image") == 2
    assert "error" not in names
    parsed = [(name, json.loads(data)) for name, data in events]
    for candidate in (0, 1):
        steps = [d for n, d in parsed if n == "progress" and d["candidate"] == candidate]
        image_at = next(i for i, (n, d) in enumerate(parsed) if n == "image" and d["index"] == candidate)
        assert steps, "no progress event"
        # Every step, in order: the progress hook is given at submission, so none is missed.
        assert [s["step"] for s in steps] == list(range(1, steps[0]["steps"] + 1))
        last_progress = max(i for i, (n, d) in enumerate(parsed) if n == "progress" and d["candidate"] == candidate)
        assert last_progress < image_at
        assert parsed[image_at][1]["seed"] == 5 + candidate and parsed[image_at][1]["score"] is None
    done = parsed[-1][1]
    assert [d["seed"] for d in done["data"]] == [5, 6] and done["fastgen"]["seeds"] == [5, 6]
    images = {d["index"]: d["b64_json"] for n, d in parsed if n == "image"}
    assert [d["b64_json"] for d in done["data"]] == [images[0], images[1]]


def test_sse_best_of_n_scores_each_image_then_ranks(client):
    body = {"prompt": "a lamp", "steps": 2, "seed": 1, "candidates": 2, "keep": 1, "stream": True}
    with client.stream("POST", "/v1/images/generations", json=body) as r:
        parsed = [(n, json.loads(d)) for n, d in sse_events(r.iter_lines())]
    images = [d for n, d in parsed if n == "image"]
    assert len(images) == 2 and all(d["score"]["rank_by"] == LABELS[0] for d in images)
    done = parsed[-1]
    assert done[0] == "done" and len(done[1]["data"]) == 1
    best = max(images, key=lambda d: (d["score"]["value"], -d["index"]))
    assert done[1]["data"][0]["seed"] == best["seed"] and done[1]["data"][0]["rank"] == 0


def test_edits_image_to_image(client):
    source = client.post("/v1/images/generations", json={"prompt": "a house", "steps": 2, "seed": 2}).json()
    upload = png_bytes(pixels(source["data"][0]["b64_json"]))
    form = {"prompt": "a house at night", "strength": "0.5", "steps": "4", "seed": "3", "n": "1"}
    r = client.post("/v1/images/edits", data=form, files={"image": ("in.png", upload, "image/png")})
    assert r.status_code == 200, r.text
    edited = r.json()["data"][0]
    assert edited["seed"] == 3 and pixels(edited["b64_json"]).shape == (64, 64, 3)
    again = client.post("/v1/images/edits", data=form, files={"image": ("in.png", upload, "image/png")}).json()
    assert np.abs(pixels(again["data"][0]["b64_json"]) - pixels(edited["b64_json"])).max() <= 1
    # Streamed: image-to-image runs strength x steps of the schedule.
    with client.stream("POST", "/v1/images/edits", data={**form, "stream": "true"},
                       files={"image": ("in.png", upload, "image/png")}) as s:
        parsed = [(n, json.loads(d)) for n, d in sse_events(s.iter_lines())]
    progress = [d for n, d in parsed if n == "progress"]
    assert parsed[-1][0] == "done" and progress and progress[-1]["steps"] < 4

    assert_error(client.post("/v1/images/edits", data=form, files={"other": ("x", b"1")}), 400)
    assert_error(client.post("/v1/images/edits", data=form, files={"image": ("in.png", b"not an image")}), 400,
                 param="image")
    big = png_bytes(np.zeros((200, 100, 3)))  # 20000 pixels > max_image_pixels (128 x 128)
    assert_error(client.post("/v1/images/edits", data=form, files={"image": ("big.png", big, "image/png")}), 413,
                 param="image", code="too_large")
    assert_error(client.post("/v1/images/edits", data={**form, "steps": "four"},
                             files={"image": ("in.png", upload, "image/png")}), 400, param="steps")


# --- scoring -------------------------------------------------------------------------------------------

def test_score_json_and_multipart(client):
    image = png_bytes(np.full((40, 30, 3), 120))
    r = client.post("/v1/score", json={"texts": ["Buy now!", "hello"], "images": [base64.b64encode(image).decode()]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [(d["index"], d["kind"]) for d in data] == [(0, "text"), (1, "text"), (0, "image")]
    assert list(data[2]["scores"]) == LABELS and abs(sum(data[2]["scores"].values()) - 1) < 1e-4
    assert [t["prob"] for t in data[0]["top"]] == sorted((t["prob"] for t in data[0]["top"]), reverse=True)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    multi = client.post("/v1/score", data={"texts": ["Buy now!"]}, files=[("files", ("a.png", image, "image/png"))])
    assert multi.status_code == 200, multi.text
    by_kind = {d["kind"]: d for d in multi.json()["data"]}
    np.testing.assert_allclose(list(by_kind["image"]["scores"].values()), list(data[2]["scores"].values()), atol=1e-5)
    np.testing.assert_allclose(list(by_kind["text"]["scores"].values()), list(data[0]["scores"].values()), atol=1e-5)
    assert client.post("/v1/score", json={"images": [url]}).status_code == 200

    assert_error(client.post("/v1/score", json={"images": ["%%%"]}), 400, param="images[0]")
    assert_error(client.post("/v1/score", json={"texts": ["x"] * 9}), 400, param="texts")
    assert_error(client.post("/v1/score", json={}), 400, param="texts")
    assert_error(client.post("/v1/score", json={"texts": "one"}), 400, param="texts")
    big = base64.b64encode(png_bytes(np.zeros((200, 100, 3)))).decode()
    assert_error(client.post("/v1/score", json={"images": [big]}), 413, code="too_large")
    # An upload is decoded as image files are: EPS (PIL would run Ghostscript on it) is never opened.
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n").decode()
    assert_error(client.post("/v1/score", json={"images": [eps]}), 400, param="images[0]", contains="cannot read image")


# --- input errors and limits ---------------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({"steps": 2}, "prompt"),
    ({"prompt": "x", "steps": "3"}, "steps"),
    ({"prompt": "x", "steps": 2.5}, "steps"),
    ({"prompt": "x", "stepz": 3}, "stepz"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "512x512"}, "size"),
    ({"prompt": "x", "model": "sdxl"}, "model"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "candidates": 5}, "candidates"),
    ({"prompt": "x", "candidates": 2, "keep": 3}, "keep"),
    ({"prompt": "x", "candidates": 2, "rank_by": "pretty"}, "rank_by"),
    ({"prompt": "x", "keep": 1}, "keep"),
    ({"prompt": "x", "scheduler": "fast"}, "scheduler"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "deadline_s": 0}, "deadline_s"),
])
def test_bad_generation_requests_are_400_naming_the_field(client, body, param):
    assert_error(client.post("/v1/images/generations", json=body), 400, param=param, code="invalid_argument")


def test_json_that_does_not_parse_is_400(client):
    r = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_bodies_over_the_limit_are_413(client):
    big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    assert_error(client.post("/v1/images/generations", content=big, headers={"content-type": "application/json"}),
                 413, code="too_large")

    def chunks():  # no Content-Length: counted while read
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    assert_error(client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}),
                 413, code="too_large")
    assert client.get("/healthz").status_code == 200


# --- metrics ---------------------------------------------------------------------------------------------

def test_metrics_parse_and_count(client):
    from prometheus_client.parser import text_string_to_metric_families

    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    ok = client.post("/v1/images/generations", json={"prompt": "m", "steps": 1, "seed": 0})
    assert ok.status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": "m", "steps": 0}).status_code == 400
    assert client.post("/v1/score", json={"texts": ["m"]}).status_code == 200  # JSONRoutes' fast path
    assert client.post("/v1/score", json={"texts": "m"}).status_code == 400
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def value(family: str, sample: str, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    for route in ("/v1/score", "/v1/images/generations"):  # labelled by route on either path
        assert value("fastgen_http_requests", "fastgen_http_requests_total", route=route, method="POST", code="400") >= 1
    route = "/v1/images/generations"
    assert value("fastgen_http_requests", "fastgen_http_requests_total", route=route, method="POST", code="200") >= 1
    assert value("fastgen_http_requests", "fastgen_http_requests_total", route=route, method="POST", code="400") >= 1
    assert families["fastgen_http_request_duration_seconds"].type == "histogram"
    assert value("fastgen_http_request_duration_seconds", "fastgen_http_request_duration_seconds_count",
                 route=route) >= 2
    inf = value("fastgen_http_request_duration_seconds", "fastgen_http_request_duration_seconds_bucket",
                route=route, le="+Inf")
    assert inf == value("fastgen_http_request_duration_seconds", "fastgen_http_request_duration_seconds_count",
                        route=route)
    # The runtime's own series are there too.
    assert value("fastgen_requests", "fastgen_requests_total", kind="generate", status="succeeded") >= 1
    assert families["fastgen_request_latency_seconds"].type == "histogram"
