"""Named scorers over real HTTP (a live uvicorn on loopback, tiny preset): ``--scorer NAME=MODEL`` specs,
``/v1/models`` listing them, ``/v1/score`` picking one by ``model`` (requests to three scorers interleaved
score as each scorer does alone, batched per scorer, counted per name), best-of-N ranked by the ``scorer``
named, one-line 400s naming the choices; the CLI's parsing and the Ray deployments' configs."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from serve_helpers import runtime_counts

from fastgen.cli.main import main
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.scorer import Scorer
from fastgen.serve import ServeConfig, Service, create_app
from fastgen.serve.config import parse_scorer
from fastgen.serve.ray import RayOptions, replica_config, scorer_config

SPECS = ("moderation=tiny:text-classifier", "brief=tiny:text-classifier", "quality=tiny", "tiny")


@pytest.fixture(scope="module")
def scorers(tiny_models):
    text, image = tiny_models["text"], tiny_models["image"]
    # Two text and two image classifiers (each pair over one engine, with its own settings).
    return [text, Scorer(text.engine, multi_label=True, top_k=2), image, Scorer(image.engine, top_k=1)]


@pytest.fixture(scope="module")
def server(live_server, tiny_models, scorers):
    config = ServeConfig(model="tiny", scorers=SPECS, max_images=4, max_items=16)
    service = Service(config, generator=tiny_models["generator"], scorers=scorers)
    return live_server(create_app(config, service=service)).wait_ready()


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_400(response, param: str, *needles: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"], error
    for needle in needles:
        assert needle in error["message"], error
    return error["message"]


def test_models_lists_every_scorer_by_id_with_its_name(client, scorers):
    by_id = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(by_id) == ["tiny", "moderation", "brief", "quality", "tiny:classifier"]
    assert [by_id[i]["scorer"] for i in list(by_id)[1:]] == ["moderation", "brief", "quality", "image"]
    assert [by_id[i]["kind"] for i in list(by_id)[1:]] == ["text-classifier"] * 2 + ["image-classifier"] * 2
    assert by_id["quality"]["labels"] == scorers[2].labels and all(m["ready"] for m in by_id.values())


def test_interleaved_requests_to_three_scorers_equal_each_scorers_own(server, client, scorers):
    rng = np.random.default_rng(3)
    texts = ["buy now", "", "five stars " * 9, "électrique ☕", "x " * 40, "great"]
    pics = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 30), (64, 64), (9, 70))]
    jobs = [("moderation", {"texts": [t]}) for t in texts] + [("brief", {"texts": [t]}) for t in texts] + [
        ("quality", {"images": [png_b64(p)]}) for p in pics]
    jobs = jobs[::3] + jobs[1::3] + jobs[2::3]  # interleaved

    def post(job):
        name, body = job
        r = client.post("/v1/score", json={**body, "model": name})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]

    before = {n: runtime_counts(server.service, n).get("succeeded", 0) for n in ("moderation", "brief", "quality")}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(post, jobs))
    own = {"moderation": scorers[0], "brief": scorers[1], "quality": scorers[2]}
    for (name, body), data in zip(jobs, got):
        if "texts" in body:
            ref = own[name].score_texts(body["texts"])[0]
        else:
            ref = own[name].score_images([Image.open(io.BytesIO(base64.b64decode(body["images"][0])))])[0]
        np.testing.assert_allclose(list(data["scores"].values()), list(ref.probs.values()), atol=1e-5)
        assert [t["label"] for t in data["top"]] == [k for k, _ in ref.top]
    stats = server.service.runtime.stats()["kinds"]
    for name, n in (("moderation", 6), ("brief", 6), ("quality", 3)):
        assert stats[name]["requests"]["succeeded"] - before[name] == n
    assert 'fastgen_requests_total{kind="brief",status="succeeded"}' in client.get("/metrics").text


def test_score_picks_by_id_or_name_and_names_the_choices(client, scorers):
    image = png_b64(np.full((32, 32, 3), 90))
    ref = scorers[3].score_images([Image.open(io.BytesIO(base64.b64decode(image)))])[0]
    for model in ("tiny:classifier", "image"):
        data = client.post("/v1/score", json={"images": [image], "model": model}).json()["data"]
        assert len(data[0]["top"]) == 1 and data[0]["top"][0]["label"] == ref.label
    # Texts and images in one request, one model: the model must take both kinds.
    assert_400(client.post("/v1/score", json={"texts": ["a"], "images": [image], "model": "moderation"}),
               "model", "moderation is a text classifier", "quality", "tiny:classifier")
    # No model and two classifiers of a kind; an unknown one; the generator's name.
    assert_400(client.post("/v1/score", json={"texts": ["a"]}), "model", "2 text classifiers", "moderation, brief")
    assert_400(client.post("/v1/score", json={"images": [image]}), "model", "quality, tiny:classifier")
    assert_400(client.post("/v1/score", json={"texts": ["a"], "model": "moderaton"}), "model",
               "moderation, brief, quality, tiny:classifier")
    assert_400(client.post("/v1/score", json={"texts": ["a"], "model": "tiny"}), "model", "generator")
    files = [("files", ("a.png", base64.b64decode(image), "image/png"))]
    multi = client.post("/v1/score", data={"model": "quality"}, files=files)  # multipart: a model field
    assert multi.status_code == 200, multi.text
    assert multi.json()["data"][0]["top"][0]["label"] == scorers[2].score_images(
        [Image.open(io.BytesIO(base64.b64decode(image)))])[0].label


def test_best_of_n_ranks_by_the_scorer_named(client, scorers):
    body = {"prompt": "a red car", "steps": 2, "seed": 11, "candidates": 3, "keep": 2, "scorer": "quality",
            "rank_by": scorers[2].labels[1]}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["fastgen"]["scorer"] == "quality"
    values = [d["score"]["value"] for d in out["data"]]
    assert values == sorted(values, reverse=True) and len(values) == 2
    for d in out["data"]:  # each candidate's score is the named scorer's own on that image
        image = Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")
        ref = scorers[2].score_images([image])[0]
        assert abs(ref.probs[body["rank_by"]] - d["score"]["value"]) < 1e-5
    assert_400(client.post("/v1/images/generations", json={**body, "scorer": None, "rank_by": None}), "scorer",
               "quality, tiny:classifier")
    assert_400(client.post("/v1/images/generations", json={**body, "scorer": "moderation"}), "scorer",
               "text classifier")
    assert_400(client.post("/v1/images/generations", json={**body, "scorer": "nope"}), "scorer")
    assert_400(client.post("/v1/images/generations", json={"prompt": "x", "scorer": "quality"}), "scorer",
               "only used with candidates")


def test_specs_parse_and_bad_ones_are_refused():
    assert parse_scorer("tiny") == (None, "tiny", None)
    assert parse_scorer("q=tiny:text-classifier") == ("q", "tiny", "text-classifier")
    assert parse_scorer("./a=b/model:classifier") == (None, "./a=b/model", "classifier")  # a path stays a path
    assert parse_scorer("C:/x=1") == (None, "C:/x=1", None)
    config = ServeConfig(model="tiny", scorers=SPECS)
    assert config.scorer_specs()[0] == ("tiny", "text-classifier")
    assert [n for n, _, _ in config.named_scorer_specs()] == ["moderation", "brief", "quality", None]
    for scorers, needle in [(("q=tiny", "q=tiny:text-classifier"), "two scorers named 'q'"),
                            (("tiny=tiny",), "generator's name"), (("=tiny",), "NAME"),
                            (("generate=tiny",), "not 'generate'")]:
        with pytest.raises(InvalidArgumentError) as err:
            ServeConfig(model="tiny", scorers=scorers)
        assert err.value.argument == "scorer" and needle in str(err.value) and "\n" not in str(err.value)


def test_cli_takes_named_scorers(capsys, monkeypatch):
    import fastgen.serve.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "bind", lambda host, port: None)
    monkeypatch.setattr(server_module, "run", lambda config, **kw: seen.setdefault("config", config))
    main(["serve", "tiny", "--scorer", "q=tiny", "--scorer", "tiny:text-classifier"])
    assert seen["config"].named_scorer_specs() == [("q", "tiny", None), (None, "tiny", "text-classifier")]
    for args, needle in [(("--scorer", "q=sd15"), "sd15"), (("--scorer", "q=tiny", "--scorer", "q=tiny"), "two")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "tiny", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_ray_deployments_keep_the_names():
    config = ServeConfig(model="tiny", scorers=("moderation=tiny:text-classifier", "quality=tiny", "aesthetic=tiny"),
                         port=8123)
    options = RayOptions(separate_scorer=True)
    assert replica_config(config, options).scorers == ("moderation=tiny:text-classifier", "aesthetic=tiny")
    assert scorer_config(config, options).scorers == ("quality=tiny",)


class RemoteScorer:
    """An ``image_scorer`` client (as the Ray scorer deployment's) that answers with fixed scores."""

    name = "quality"
    labels = ["a", "b"]

    def __init__(self) -> None:
        self.calls = 0

    async def score_images(self, images):
        from fastgen.pipelines.scorer import Score

        self.calls += len(images)
        return [Score(probs={"a": 0.25, "b": 0.75}, top=[("b", 0.75), ("a", 0.25)], logits=[0.0, 1.1])] * len(images)


def test_a_remote_image_scorer_is_picked_by_its_name(tiny_models):
    config = ServeConfig(scorers=("moderation=tiny:text-classifier", "local=tiny"), warmup=False)
    remote = RemoteScorer()
    service = Service(config, scorers=[tiny_models["text"], tiny_models["image"]], image_scorer=remote)
    service.load()
    try:
        image = Image.new("RGB", (20, 20))
        assert asyncio.run(service.score_images([image], scorer="quality"))[0].probs == {"a": 0.25, "b": 0.75}
        assert remote.calls == 1 and service.image_labels("quality") == ["a", "b"]
        local = asyncio.run(service.score_images([image]))[0]  # none named: the only local one
        assert list(local.probs) == tiny_models["image"].labels and remote.calls == 1
    finally:
        service.close()


def test_an_image_scoring_request_picks_its_scorer_once(tiny_models, monkeypatch):
    """``/v1/score``'s images and a best-of-N ranking each pick their scorer once (and score by it)."""
    service = Service(ServeConfig(scorers=("local=tiny",), warmup=False), scorers=[tiny_models["image"]])
    service.load()
    try:
        picks, pick = [], service._image_classifier
        monkeypatch.setattr(service, "_image_classifier", lambda *a, **k: picks.append(a) or pick(*a, **k))
        image = Image.new("RGB", (20, 20))
        data = asyncio.run(service.score([], [image], model="local"))
        assert len(picks) == 1 and list(data[0]["scores"]) == tiny_models["image"].labels
        ranked = asyncio.run(service.rank_images([image], ["a prompt"], scorer="local"))
        assert len(picks) == 2 and list(ranked[0].probs) == tiny_models["image"].labels
    finally:
        service.close()


# --- embeddings and detections ---------------------------------------------------------------------------

DET_LABELS = ["person", "car", "dog"]


class TinyYolo:
    """A tiny yolov8-layout detector (strided convs, a 1x1 head per level), exported to ONNX as
    ultralytics exports it (names, imgsz, stride in the metadata)."""

    @staticmethod
    def export(path):
        import inspect

        import onnx
        import torch

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(5)
                conv = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, 2, 1), torch.nn.SiLU())  # noqa: E731
                self.p3 = torch.nn.Sequential(conv(3, 8), conv(8, 8), conv(8, 8))
                self.p4, self.p5 = conv(8, 8), conv(8, 8)
                self.heads = torch.nn.ModuleList(torch.nn.Conv2d(8, 7, 1) for _ in range(3))

            def forward(self, x):  # (batch, 3, H, W) -> (batch, 4 + 3, anchors)
                f3 = self.p3(x)
                f4 = self.p4(f3)
                outs = []
                for feat, head, stride in zip((f3, f4, self.p5(f4)), self.heads, (8, 16, 32)):
                    y = (head(feat) * 3).flatten(2)
                    h, w = feat.shape[2:]
                    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                                            torch.arange(w, dtype=torch.float32), indexing="ij")
                    cx = (gx.flatten() + 0.5 + torch.tanh(y[:, 0])) * stride
                    cy = (gy.flatten() + 0.5 + torch.tanh(y[:, 1])) * stride
                    wh = torch.exp(y[:, 2:4].clamp(-2, 2)) * stride * 2
                    outs.append(torch.cat([cx[:, None], cy[:, None], wh, torch.sigmoid(y[:, 4:])], dim=1))
                return torch.cat(outs, dim=2)

        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 64, 64),), str(path), opset_version=17,
                          input_names=["images"], output_names=["output0"],
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, **legacy)
        model = onnx.load(str(path))
        for key, value in {"names": str(dict(enumerate(DET_LABELS))), "imgsz": "[64, 64]", "stride": "32"}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(model, str(path))
        return path


@pytest.fixture(scope="module")
def content_models(tmp_path_factory):
    det = TinyYolo.export(tmp_path_factory.mktemp("det") / "det.onnx")
    return {"retrieval": Scorer.from_pretrained("tiny-embed", "text-encoder", backend="torch", device="cpu"),
            "vision": Scorer.from_pretrained("tiny-embed", "image-encoder", backend="torch", device="cpu"),
            "nsfw": Scorer.from_pretrained(det), "path": det}


@pytest.fixture(scope="module")
def content_client(live_server, tiny_models, content_models):
    specs = ("retrieval=tiny-embed:text-encoder", "vision=tiny-embed:image-encoder", f"nsfw={content_models['path']}")
    config = ServeConfig(model="tiny", scorers=specs, max_items=8, max_images=4)
    scorers = {k: content_models[k] for k in ("retrieval", "vision", "nsfw")}
    server = live_server(create_app(config, service=Service(config, generator=tiny_models["generator"],
                                                             scorers=scorers))).wait_ready()
    with server.client() as c:
        yield c


def odd_pictures(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((77, 113), (9, 200), (64, 64))]


def test_embeddings_are_openai_shaped_and_equal_the_encoders(content_client, content_models):
    by_id = {m["id"]: m for m in content_client.get("/v1/models").json()["data"]}
    assert by_id["retrieval"]["kind"] == "text-embedder" and "labels" not in by_id["retrieval"]
    assert by_id["vision"]["kind"] == "image-embedder" and by_id["nsfw"]["kind"] == "image-detector"
    assert by_id["nsfw"]["labels"] == DET_LABELS
    encoder = content_models["retrieval"]
    texts = ["buy now", "", "a photo of a red car " * 20, "☕"]
    r = content_client.post("/v1/embeddings", json={"input": texts, "model": "retrieval"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "retrieval"
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3] and {d["object"] for d in body["data"]} == {"embedding"}
    ref = encoder.embed(texts)
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), ref.numpy(), atol=2e-5)
    tokens = sum(encoder.text_preprocessor.lengths(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # One string, base64 (float32 little-endian, as OpenAI's clients decode it), no model: the only text encoder.
    one = content_client.post("/v1/embeddings", json={"input": "buy now", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, ref[0].numpy(), atol=2e-5)
    # fastgen's images: the image encoder.
    pics = odd_pictures()
    got = content_client.post("/v1/embeddings", json={"images": [png_b64(p) for p in pics]}).json()
    np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]),
                               content_models["vision"].embed(pics).numpy(), atol=2e-5)
    assert got["model"] == "vision" and got["usage"]["prompt_tokens"] == 0
    assert_400(content_client.post("/v1/embeddings", json={"input": "x", "model": "nsfw"}), "model", "retrieval")
    assert_400(content_client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"}),
               "encoding_format", "float, base64")
    assert_400(content_client.post("/v1/embeddings", json={}), "input")
    assert_400(content_client.post("/v1/embeddings", json={"input": ["x"] * 9}), "input", "max_items")
    assert_400(content_client.post("/v1/embeddings", json={"input": [1, 2]}), "input")


def test_detections_through_score_and_detect_equal_the_detectors(content_client, content_models):
    detector = content_models["nsfw"]
    pics = odd_pictures(1)
    r = content_client.post("/v1/score", json={"images": [png_b64(p) for p in pics], "model": "nsfw"})
    assert r.status_code == 200, r.text
    found_any = 0
    for data, ref_score, ref in zip(r.json()["data"], detector.score_images(pics), detector.detect(pics)):
        assert data["scores"] == pytest.approx(ref_score.probs, abs=1e-6)
        assert [d["label"] for d in data["detections"]] == ref.labels
        np.testing.assert_allclose(np.array([d["box"] for d in data["detections"]]).reshape(-1, 4), ref.boxes,
                                   rtol=1e-5, atol=1e-3)
        found_any += len(ref)
    assert found_any > 0
    r = content_client.post("/v1/detect", json={"images": [png_b64(p) for p in pics], "conf": 0.5, "iou": 0.3,
                                                "max_det": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "nsfw"
    for data, ref in zip(r.json()["data"], detector.detect(pics, conf=0.5, iou=0.3, max_det=3)):
        assert [d["label"] for d in data["detections"]] == ref.labels and len(ref) <= 3
        np.testing.assert_allclose([d["confidence"] for d in data["detections"]], ref.scores, rtol=1e-5)
    assert_400(content_client.post("/v1/detect", json={"images": [png_b64(pics[0])], "conf": 2}), "conf")
    assert_400(content_client.post("/v1/detect", json={"images": [png_b64(pics[0])], "model": "vision"}), "model",
               "nsfw")
    assert_400(content_client.post("/v1/score", json={"texts": ["x"], "model": "retrieval"}), "model",
               "text embedder")


def test_a_detector_ranks_best_of_n(content_client, content_models):
    detector = content_models["nsfw"]
    body = {"prompt": "a red car", "steps": 2, "seed": 4, "candidates": 3, "keep": 3, "rank_by": "car"}
    r = content_client.post("/v1/images/generations", json=body)  # the only image scorer: the detector
    assert r.status_code == 200, r.text
    for d in r.json()["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")
        assert abs(detector.score_images([image])[0].probs["car"] - d["score"]["value"]) < 1e-5


def test_a_two_tower_scorer_embeds_scores_by_its_head_and_ranks_by_prompt(live_server, tiny_models):
    import torch

    torch.manual_seed(1)
    clip = Scorer.from_pretrained("tiny-clip", backend="torch", device="cpu",
                                  aesthetic=torch.nn.Sequential(torch.nn.Linear(16, 1)))
    config = ServeConfig(model="tiny", scorers=("clip=tiny-clip",), max_items=8, max_images=4)
    service = Service(config, generator=tiny_models["generator"], scorers={"clip": clip})
    server = live_server(create_app(config, service=service)).wait_ready()
    with server.client() as client:
        by_id = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert by_id["clip"]["kind"] == "image-text-similarity" and by_id["clip"]["labels"] == ["aesthetic"]
        texts = ["a red car", "a shoe on a table, studio light " * 4]
        got = client.post("/v1/embeddings", json={"input": texts}).json()  # the only text embedder: its text tower
        np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]), clip.embed(texts).numpy(),
                                   atol=2e-5)
        assert got["usage"]["prompt_tokens"] == sum(clip.text_preprocessor.lengths(texts))
        pics = odd_pictures(2)
        got = client.post("/v1/embeddings", json={"images": [png_b64(p) for p in pics], "model": "clip"}).json()
        np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]), clip.embed(pics).numpy(),
                                   atol=2e-5)
        scored = client.post("/v1/score", json={"images": [png_b64(p) for p in pics]}).json()["data"]
        for data, ref in zip(scored, clip.score_images(pics)):
            assert data["scores"] == pytest.approx(ref.probs, rel=1e-5)
        assert_400(client.post("/v1/score", json={"texts": ["a"]}), "texts", "no text classifier")
        # Best-of-N ranked by prompt adherence: each candidate against its own prompt (Scorer.score_pairs).
        body = {"prompt": "a red car", "steps": 2, "seed": 9, "candidates": 3, "keep": 2, "scorer": "clip"}
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        ranked = r.json()["data"]
        assert [d["score"]["rank_by"] for d in ranked] == ["similarity"] * 2
        values = [d["score"]["value"] for d in ranked]
        assert values == sorted(values, reverse=True)
        for d in ranked:
            image = Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")
            ref = clip.score_pairs([image], ["a red car"])[0]
            assert d["score"]["scores"] == pytest.approx(ref.probs, rel=1e-4, abs=1e-5)
        assert_400(client.post("/v1/images/generations", json={**body, "rank_by": "pretty"}), "rank_by",
                   "similarity, aesthetic")
        stats = server.service.runtime.stats()["kinds"]
        assert stats["clip:text"]["requests"]["succeeded"] >= 2 and stats["clip"]["requests"]["succeeded"] >= 6
