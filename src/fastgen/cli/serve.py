"""``fastgen serve``: an HTTP server (FastAPI on uvicorn) over one batched runtime.

Bound to the loopback interface unless ``--host`` says otherwise. The arguments, the models' names
and the engine cache are checked before the server starts (one line, exit 2); the engines then load
in the background while ``/healthz`` already answers, and ``/readyz`` answers 200 once they are warm.
A model that fails to load stops the server with its one-line error. SIGTERM or Ctrl-C: no new
connections, the requests in flight finish (up to ``--drain-timeout-s``), exit 0.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any

import click

from fastgen.cli.generate import _engine_folder
from fastgen.cli.options import dataclass_options, engine_cache, nonempty, pop_config, printable
from fastgen.core.config import field_docs
from fastgen.errors import InvalidArgumentError, UnsupportedError
from fastgen.runtime.config import RuntimeConfig
from fastgen.serve.config import SCORER_COMPONENTS, ServeConfig, split_scorer
from fastgen.serve.ray import RayOptions

logger = logging.getLogger("fastgen.cli")

_DOCS = field_docs(ServeConfig)
#: The serve extra's modules: without them `fastgen serve` says what to install, in one line.
#: (modules, any of which will do; the package that provides them).
REQUIRED = ((("fastapi",), "fastapi"), (("uvicorn",), "uvicorn"),
            (("python_multipart", "multipart"), "python-multipart"))  # multipart: its name before 0.0.13
_OWN_FLAGS = ("model", "scorers", "loras", "model_name", "profile", "cache_dir", "api_key", "runtime")


def check_serve_extra() -> None:
    """Refuse, in one line, to start without fastapi, uvicorn and python-multipart."""
    for modules, package in REQUIRED:
        for module in modules:
            try:
                importlib.import_module(module)  # imported for real: a broken install counts as missing too
                break
            except ImportError:
                continue
        else:
            raise UnsupportedError(f"fastgen serve needs {package}, which is not installed: "
                                   "pip install 'fastgen[serve]'")


def _engine_path(model: str) -> bool:
    path = Path(model).expanduser()
    return (path / "manifest.json").is_file() or (path.is_file() and path.suffix.lower() == ".onnx")


def check_models(config: ServeConfig) -> None:
    """What can be checked without building anything: each model exists and has what is asked of it."""
    from fastgen.lora.config import parse_lora_arg
    from fastgen.models import model_components

    for text in config.loras:
        path = parse_lora_arg(text)[0]
        if not Path(path).expanduser().exists():
            raise InvalidArgumentError("lora", printable(path), reason="no such file or folder")

    if config.model is not None and not _engine_folder(config.model):
        components = model_components(config.model)
        if "unet" not in components:
            raise InvalidArgumentError("model", printable(config.model), reason=f"has no unet to generate with "
                                       f"(its components: {', '.join(components)}); pass it as --scorer")
    for spec in config.scorers:
        model, component = split_scorer(spec)
        if _engine_path(model):
            continue
        components = model_components(model)
        wanted = component or "classifier"
        if wanted not in components:
            have = [c for c in components if c in SCORER_COMPONENTS]
            raise InvalidArgumentError("scorer", printable(spec), [f"{model}:{c}" for c in have] or None,
                                       reason=f"{model} has no {wanted}")


@click.command("serve")
@click.argument("model", required=False, callback=nonempty)
@click.option("--scorer", "scorers", multiple=True, callback=nonempty,
              help="A scorer to serve: [NAME=]MODEL[:COMPONENT] (component classifier, text-classifier, "
                   "text-encoder or image-encoder; a two-tower CLIP / SigLIP model or a detector .onnx needs none); "
                   "repeatable, any number when named (NAME is what requests pass as model / scorer, and the "
                   "metrics label; unnamed: text or image, one of each). The only image classifier, or the "
                   "one a request names, ranks best-of-N candidates.")
@click.option("--lora", "loras", multiple=True, callback=nonempty, help=_DOCS["loras"] + " Repeatable.")
@click.option("--model-name", callback=nonempty, help=_DOCS["model_name"])
@click.option("--profile", callback=nonempty, help=_DOCS["profile"])
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty,
              help="Engine cache root (default: $FASTGEN_CACHE_DIR or ~/.cache/fastgen/engines).")
@click.option("--api-key", callback=nonempty, help="Clients must send Authorization: Bearer KEY (default: "
              "$FASTGEN_API_KEY; neither: no key). Prefer the variable: arguments are visible to other users.")
@dataclass_options(ServeConfig, exclude=_OWN_FLAGS)
@dataclass_options(RuntimeConfig)
@click.option("--ray", "use_ray", is_flag=True, default=False,
              help="Serve on Ray Serve (fastgen.serve.ray): replicas, autoscaling, a separate scorer deployment, "
                   "a cluster; needs pip install 'fastgen[ray]'. The options below apply with --ray only.")
@dataclass_options(RayOptions)
def serve(model: str | None, scorers: tuple[str, ...], loras: tuple[str, ...], model_name: str | None,
          profile: str | None, cache_dir: str | None, api_key: str | None, use_ray: bool, **kwargs: Any) -> None:
    """Serve MODEL (a preset such as tiny, a diffusers folder, or a folder of engine directories) and
    classifiers over HTTP: an OpenAI-style Images API (/v1/images/generations, /v1/images/edits), /v1/score,
    /v1/models, /healthz, /readyz, /metrics, and a playground page at /.

    Example: fastgen serve tiny --scorer tiny --port 8000, then
    curl localhost:8000/v1/images/generations -H 'content-type: application/json' -d '{"prompt": "a red car"}'
    """
    check_serve_extra()
    ray_flags = [f.name for f in dataclasses.fields(RayOptions) if kwargs.get(f.name) is not None]
    if ray_flags and not use_ray:
        name = ray_flags[0]
        raise InvalidArgumentError(name.replace("_", "-"), kwargs[name], reason="a Ray Serve option: add --ray")
    ray_options = pop_config(RayOptions, kwargs)
    runtime = pop_config(RuntimeConfig, kwargs)
    config = pop_config(ServeConfig, kwargs, model=model, scorers=scorers or None, loras=loras or None,
                        model_name=model_name, profile=profile, api_key=api_key, runtime=runtime)
    if config.model is None and not config.scorers:
        raise InvalidArgumentError("model", None, reason="give a generator MODEL, a --scorer, or both "
                                   "(e.g. fastgen serve tiny --scorer tiny)")
    if profile:
        from fastgen.models.spec import ShapeProfile

        ShapeProfile.parse(profile)  # its syntax now, not after the server started
    if cache_dir or any(not _engine_path(m) for m, _ in config.scorer_specs()) or (
            config.model is not None and not _engine_folder(config.model)):
        config = config.replace(cache_dir=str(engine_cache(cache_dir).root))
    check_models(config)
    if use_ray:
        from fastgen.serve.ray import run as run_on_ray

        run_on_ray(config, ray_options, blocking=True, on_ready=lambda url: click.echo(
            f"fastgen serve: ready on Ray Serve at {url}", err=True))
        return

    from fastgen.serve.server import bind, run

    sock = bind(config.host, config.port)  # a port in use fails here, in one line
    run(config, sock=sock, on_listening=lambda url: click.echo(
        f"fastgen serve: listening on {url} (engines loading: GET {url}/readyz answers 200 when ready)", err=True),
        on_ready=lambda: click.echo("fastgen serve: ready (engines loaded and warm)", err=True))


__all__ = ["check_models", "check_serve_extra", "serve"]
