"""``fastgen generate``: text-to-image / image-to-image on engines, PNGs and a results.json out.

Files: ``<index>_seed<seed>.png`` per image (written under a temporary name, then renamed) and
``results.json`` last (prompts, seeds, files, latencies, scores), so a reader that sees
``results.json`` sees every image it lists. Generation finishes before anything is written: a
failure leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from fastgen.cli.options import dataclass_options, field_choices, pop_config
from fastgen.core.config import field_docs
from fastgen.engines.config import BuildConfig
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig

logger = logging.getLogger("fastgen.cli")

RESULTS_FILE = "results.json"
_DOCS = field_docs(GenerateConfig)


def _choices(name: str) -> click.Choice:
    return click.Choice([str(c) for c in field_choices(BuildConfig, name) or ()])


def _write_png(image: Any, path: Path) -> None:
    """Save a PIL image as PNG under a temporary name in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load_scorer(model: str, backend: str, device: str) -> Any:
    """``fastgen.pipelines.scorer.Scorer.from_pretrained(MODEL)``, imported only when asked for."""
    from fastgen.pipelines.scorer import Scorer

    accepted = inspect.signature(Scorer.from_pretrained).parameters
    options = {k: v for k, v in (("backend", backend), ("device", device)) if k in accepted}
    return Scorer.from_pretrained(model, **options)


def _score_dict(score: Any) -> dict[str, Any]:
    return score.to_dict() if hasattr(score, "to_dict") else {"probs": dict(score.probs)}


def write_outputs(out: Path, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """PNGs (uint8 NHWC result) then results.json into ``out``; returns the JSON written."""
    from fastgen.core.fs import write_json_atomic
    from fastgen.pipelines.vae_images import to_pil

    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    try:
        for index, (image, seed) in enumerate(zip(to_pil(result.images), result.seeds)):
            name = f"{index}_seed{seed}.png"
            _write_png(image, out / name)
            files.append(name)
        summary = result.to_dict()
        scores = summary.pop("scores")
        ranks = summary.pop("rank_values")
        images = []
        for i, name in enumerate(files):
            images.append({"file": name, "prompt": result.prompts[i], "prompt_index": result.prompt_indices[i],
                           "seed": result.seeds[i], "scores": scores[i] if scores else None,
                           "rank_value": ranks[i] if ranks else None})
        data = {**extra, **summary, "files": files, "scores": scores, "images": images}
        write_json_atomic(out / RESULTS_FILE, data)
    except BaseException:
        for name in files:  # no results.json: do not leave this run's images behind half-reported
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
        raise
    return data


@click.command("generate")
@click.option("--model", "-m", required=True,
              help="A preset (tiny, tiny-sdxl, sd15, sdxl), a local diffusers pipeline folder, or a folder of "
                   "engine directories made by `fastgen build` (unet/, vae-decoder/, text-encoder/...).")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="A prompt (repeat for several; the empty string is allowed).")
@click.option("-n", "--num-images-per-prompt", type=int, default=None,
              help=f"{_DOCS['num_images_per_prompt']} [default: 1]")
@click.option("--negative-prompt", default=None, help=_DOCS["negative_prompt"])
@click.option("--image", "image_path", default=None, help="Image-to-image: the input image file (see --strength).")
@click.option("--out", "-o", default="fastgen-out/generate", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the PNGs and results.json.")
@click.option("--backend", type=_choices("backend"), default="onnxruntime", show_default=True,
              help="Engine backend (ignored for a folder of engine directories).")
@click.option("--device", type=_choices("device"), default="auto", show_default=True, help="Where the engines run.")
@click.option("--precision", type=_choices("precision"), default="fp32", show_default=True,
              help="Engine precision (ignored for a folder of engine directories).")
@click.option("--profile", help="Shape ranges for the engines, e.g. batch=1:2:8,height=256:512:1024.")
@click.option("--quantization", type=_choices("quantization"), default="none", show_default=True,
              help="Quantize the UNet (fastgen.quant preset; text encoders and VAE stay in float).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Engine cache root.")
@click.option("--candidates", type=click.IntRange(1), default=None,
              help="Best-of-N: generate N variants per prompt (seeds seed..seed+N-1) and keep the best (needs --scorer).")
@click.option("--keep", type=click.IntRange(1), default=1, show_default=True, help="Best-of-N: images kept per prompt.")
@click.option("--scorer", "scorer_model", default=None,
              help="Classifier MODEL that scores the images (with --candidates: ranks them).")
@click.option("--rank-by", default=None, help="Best-of-N: the scorer label to maximise (default: its first label).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@dataclass_options(GenerateConfig, exclude=("num_images_per_prompt", "negative_prompt", "output_type"))
def generate(model: str, prompts: tuple[str, ...], num_images_per_prompt: int | None, negative_prompt: str | None,
             image_path: str | None, out: str, backend: str, device: str, precision: str, profile: str | None,
             quantization: str, cache_dir: str | None, candidates: int | None, keep: int, scorer_model: str | None,
             rank_by: str | None, progress: bool, **kwargs: Any) -> None:
    """Generate images from prompts (or from an image with --image) and write PNGs and results.json to --out."""
    from fastgen.engines.cache import EngineCache
    from fastgen.pipelines import vae_images as imaging
    from fastgen.pipelines.generator import Generator

    # Everything the user typed is checked before any engine is built.
    config = pop_config(GenerateConfig, kwargs, num_images_per_prompt=num_images_per_prompt,
                        negative_prompt=negative_prompt, output_type="uint8")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError("out", str(out_dir), reason="exists and is not a directory")
    if candidates is not None and scorer_model is None:
        raise InvalidArgumentError("scorer", None, reason="--candidates needs --scorer MODEL to rank the variants")
    if candidates is not None and config.num_images_per_prompt != 1:
        raise InvalidArgumentError("num-images-per-prompt", config.num_images_per_prompt,
                                   reason="with --candidates, choose how many images to keep with --keep")
    if candidates is not None and keep > candidates:
        raise InvalidArgumentError("keep", keep, f"1 to --candidates ({candidates})")
    if rank_by is not None and candidates is None:
        raise InvalidArgumentError("rank-by", rank_by, reason="only used with --candidates")
    image = imaging.load_image(image_path) if image_path is not None else None

    scorer = _load_scorer(scorer_model, backend, device) if scorer_model else None
    gen = Generator.from_pretrained(model, backend=backend, device=device, precision=precision,
                                    cache=EngineCache(cache_dir) if cache_dir else None, profile=profile,
                                    quantization=quantization, progress=progress)
    result = gen.generate(list(prompts), image=image, config=config, progress=progress, candidates=candidates,
                          scorer=scorer if candidates else None, keep=keep, rank_by=rank_by)
    if scorer is not None and candidates is None:  # score every image, rank nothing
        result.scores = list(scorer.score_images(imaging.to_pil(result.images)))
    extra = {"model": str(model), "backend": getattr(gen.unet, "backend", backend),
             "device": str(getattr(gen.unet, "device", device)), "precision": getattr(gen.unet, "precision", precision),
             "scorer": scorer_model}
    data = write_outputs(out_dir, result, extra)
    _report(data, out_dir)


def _report(data: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
    table = Table(title=f"{len(data['files'])} images in {out}")
    for column in ("file", "seed", "prompt", "score"):
        table.add_column(column)
    for row in data["images"]:
        score = "" if row["rank_value"] is None else f"{row['rank_value']:.4f}"
        if not score and row["scores"]:
            score = ", ".join(f"{k} {v:.3f}" for k, v in list(row["scores"]["probs"].items())[:3])
        table.add_row(row["file"], str(row["seed"]), row["prompt"][:60], score)
    console.print(table)
    lat = data["latencies"]
    steps = lat["denoising_step_ms"]
    per_step = sum(steps) / len(steps) if steps else 0.0
    console.print(f"text encoding {lat['text_encoding_ms']:.1f} ms, denoising {lat['denoising_ms']:.1f} ms "
                  f"({len(steps)} steps, {per_step:.1f} ms/step), VAE decode {lat['vae_decode_ms']:.1f} ms, "
                  f"total {lat['total_ms']:.1f} ms")
