"""``fastgen serve --lora PATH[:SCALE]``: adapters loaded into the served generator at start, named
after their files, applied to every generation; bad ones refused in one line before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fastgen.errors import InvalidArgumentError
from fastgen.serve.config import ServeConfig, lora_name
from fastgen.serve.service import Service

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lora"))


def test_names_and_config_checks():
    assert lora_name("styles/ink.safetensors") == "ink" and lora_name("styles/film/") == "film"
    assert ServeConfig(model="tiny", loras="a.safetensors:0.5").loras == ("a.safetensors:0.5",)
    with pytest.raises(InvalidArgumentError, match="lora.*need a generator"):
        ServeConfig(scorers=("tiny",), loras=("a.safetensors",))
    with pytest.raises(InvalidArgumentError, match="two adapters of that name"):
        ServeConfig(model="tiny", loras=("x/a.safetensors", "y/a.safetensors:2"))
    with pytest.raises(InvalidArgumentError, match="lora"):
        ServeConfig(model="tiny", loras=("a.safetensors:inf",))


def test_the_service_generates_with_the_adapters(tmp_path):
    from lora_files import save_diffusers_lora

    from fastgen.models import load_component
    from fastgen.pipelines.generator import Generator

    models = {name: load_component("tiny", name).model for name in ("unet", "text-encoder")}
    path = save_diffusers_lora(tmp_path / "ink", models, rank=4, alpha=4.0, seed=3)
    config = ServeConfig(model="tiny", loras=(f"{path}:0.7",), backend="torch", device="cpu",
                         cache_dir=str(tmp_path / "cache"), warmup=False, intra_op_threads=1)
    service = Service(config)
    try:
        service.load()
        assert service.generator.active_adapters == {"pytorch_lora_weights": 0.7}
        served = service.generator.generate("a red car", seed=5, steps=3, output_type="np", progress=False).images
        plain = Generator.from_pretrained("tiny", backend="torch", device="cpu", cache=None)
        base = plain.generate("a red car", seed=5, steps=3, output_type="np", progress=False).images
        plain.load_lora(path, name="ink", weight=0.7)
        adapted = plain.generate("a red car", seed=5, steps=3, output_type="np", progress=False).images
    finally:
        service.close(5)
    assert np.abs(served - adapted).max() < 1e-4 and np.abs(served - base).max() > 1e-3


def test_per_request_adapters_over_http(tmp_path, live_server):
    from lora_files import save_diffusers_lora

    from fastgen.models import load_component
    from fastgen.serve import create_app

    models = {name: load_component("tiny", name).model for name in ("unet", "text-encoder")}
    ink = save_diffusers_lora(tmp_path / "a", models, rank=4, alpha=4.0, seed=3)
    film = save_diffusers_lora(tmp_path / "b", models, rank=4, alpha=4.0, seed=9)
    (tmp_path / "ink.safetensors").write_bytes(ink.read_bytes())
    (tmp_path / "film.safetensors").write_bytes(film.read_bytes())
    config = ServeConfig(model="tiny", loras=(f"{tmp_path / 'ink.safetensors'}:0.7", str(tmp_path / "film.safetensors")),
                         backend="torch", device="cpu", cache_dir=str(tmp_path / "cache"), intra_op_threads=1)
    server = live_server(create_app(config)).wait_ready()
    body = {"prompt": "a red car", "steps": 3, "seed": 5}

    def image(extra: dict) -> str:
        r = client.post("/v1/images/generations", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    with server.client() as client:
        models_listed = client.get("/v1/models").json()["data"]
        assert models_listed[0]["adapters"] == {"ink": 0.7, "film": 1.0}
        default = image({})
        assert image({"adapters": {"ink": 0.7, "film": 1.0}}) == default  # absent: the server's own
        assert image({"adapters": {}}) != default and image({"adapters": {"ink": 0.2}}) != default
        r = client.post("/v1/images/generations", json={**body, "adapters": {"nope": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapters"
        r = client.post("/v1/images/generations", json={**body, "adapters": {"ink": "high"}})
        assert r.status_code == 400
