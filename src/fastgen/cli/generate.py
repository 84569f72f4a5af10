"""``fastgen generate``: text-to-image / image-to-image on engines, PNGs and a results.json out.

``--out`` must be a new or empty folder, or a previous ``fastgen generate`` output (one holding
fastgen's ``results.json``): fastgen does not write into a folder of someone else's files. It is
checked before any work, and the folder (with any missing parent) is created at once with a hidden
staging folder inside, so a read-only or full disk fails in one line before the engines are built.

Files: ``<index>_seed<seed>.png`` per image and ``results.json`` (prompts, seeds, files, latencies,
scores), all written in the staging folder first, then moved in with ``results.json`` last, so a
reader that sees ``results.json`` sees every image it lists. A previous output is replaced: its
``results.json`` goes first, and the images it listed that this run did not write are removed (only
names fastgen gives images; other files in the folder are left alone). A failure before that leaves
the folder as it was, and a folder this run created is removed again.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from fastgen.cli.options import (
    dataclass_options,
    engine_cache,
    field_choices,
    nonempty,
    pop_config,
    printable,
    utf8_text,
    writable_dir,
)
from fastgen.core.config import field_docs
from fastgen.engines.config import BuildConfig
from fastgen.errors import InvalidArgumentError
from fastgen.pipelines.config import GenerateConfig

logger = logging.getLogger("fastgen.cli")

RESULTS_FILE = "results.json"
#: Most denoising steps: diffusion schedulers are trained on 1000 timesteps, and a step count beyond
#: them only makes a huge timestep table (10**11 steps asked for 745 GiB) and runs for ever.
MAX_STEPS = 1000
_DOCS = field_docs(GenerateConfig)
_STAGING = ".fastgen-staging-"
_IMAGE_NAME = re.compile(r"^[0-9]+_seed[0-9]+\.png$")
#: A results.json larger than this is not one fastgen wrote (it lists files, not pixels).
_MAX_RESULTS_BYTES = 64 << 20


def _choices(name: str) -> click.Choice:
    return click.Choice([str(c) for c in field_choices(BuildConfig, name) or ()])


def write_png(image: Any, path: Path) -> None:
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


def previous_images(out: Path) -> list[str] | None:
    """The images a previous ``fastgen generate`` listed in ``out/results.json``; None when there is no
    such file or it is not fastgen's (a link, a FIFO, too big, not JSON, not our layout). Only names
    fastgen gives images are returned, so a doctored list (``../x``, ``notes.txt``) deletes nothing."""
    path = out / RESULTS_FILE
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_RESULTS_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("files", "images", "seeds")):
        return None
    return [n for n in data["files"] if isinstance(n, str) and _IMAGE_NAME.match(n)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class OutputFolder:
    """``--out`` of one run: checked and created before the work (:meth:`prepare`), filled at the end in
    one step (:meth:`commit`), or left as it was (:meth:`discard`)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(os.path.abspath(out))
        self.created: list[Path] = []  # folders this run made, outermost first
        self.previous: list[str] = []
        self.staging: Path | None = None

    def prepare(self) -> OutputFolder:
        out = self.out
        allowed = "a new or empty folder, or a previous `fastgen generate` output"
        if os.path.lexists(out) and not out.is_dir():
            raise InvalidArgumentError("out", printable(out), allowed, reason="exists and is not a directory")
        writable_dir(out, "out")
        if out.is_dir():
            self._clean_stale_staging()
            if any(not name.startswith(_STAGING) for name in os.listdir(out)):
                previous = previous_images(out)
                if previous is None:
                    raise InvalidArgumentError("out", printable(out), allowed,
                                               reason=f"is not empty and holds no fastgen {RESULTS_FILE}; fastgen "
                                                      "does not overwrite files it did not write")
                self.previous = previous
        missing = []
        folder = out
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = folder.parent
        try:
            for folder in reversed(missing):
                os.mkdir(folder)
                self.created.append(folder)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=out))
        except OSError as exc:
            self.discard()
            raise InvalidArgumentError("out", printable(out), allowed,
                                       reason=f"cannot be written ({exc.strerror or exc})") from None
        return self

    def _clean_stale_staging(self) -> None:
        """Staging folders of runs that were killed (their process is gone) are removed."""
        for name in os.listdir(self.out):
            pid = name[len(_STAGING):].partition("-")[0]
            if name.startswith(_STAGING) and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(self.out / name, ignore_errors=True)

    def commit(self, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """PNGs (uint8 NHWC result) and results.json into the staging folder, then into ``out``."""
        from fastgen.core.fs import write_json_atomic
        from fastgen.pipelines.vae_images import to_pil

        assert self.staging is not None, "prepare() first"
        files: list[str] = []
        for index, (image, seed) in enumerate(zip(to_pil(result.images), result.seeds)):
            name = f"{index}_seed{seed}.png"
            write_png(image, self.staging / name)
            files.append(name)
        summary = result.to_dict()
        scores = summary.pop("scores")
        ranks = summary.pop("rank_values")
        images = [{"file": name, "prompt": result.prompts[i], "prompt_index": result.prompt_indices[i],
                   "seed": result.seeds[i], "scores": scores[i] if scores else None,
                   "rank_value": ranks[i] if ranks else None} for i, name in enumerate(files)]
        data = {**extra, **summary, "files": files, "scores": scores, "images": images}
        write_json_atomic(self.staging / RESULTS_FILE, data)
        for name in (*files, RESULTS_FILE):  # a folder in the way would fail the publishing half-way
            if os.path.lexists(self.out / name) and not stat.S_ISREG(os.lstat(self.out / name).st_mode):
                raise InvalidArgumentError("out", printable(self.out), reason=f"{name} in it is not a regular file; "
                                           "remove it or choose another folder")
        # Publish: the old results.json no longer describes the folder, so it goes first.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.out / RESULTS_FILE)
        for name in files:
            os.replace(self.staging / name, self.out / name)
        os.replace(self.staging / RESULTS_FILE, self.out / RESULTS_FILE)
        for name in set(self.previous) - set(files):
            with contextlib.suppress(OSError):  # best effort: the new output is complete already
                os.unlink(self.out / name)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        self.created = []
        return data

    def discard(self) -> None:
        """Remove the staging folder, and the folders this run created (if still empty)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self.created = []


def write_outputs(out: Path, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """PNGs (uint8 NHWC result) then results.json into ``out``, as :class:`OutputFolder` does; returns the JSON."""
    folder = OutputFolder(out).prepare()
    try:
        return folder.commit(result, extra)
    except BaseException:
        folder.discard()
        raise


def _check_image_count(config: GenerateConfig, prompts: int, candidates: int | None, gen: Any, image: Any) -> None:
    """The library's memory check (``check_image_memory``), before the engines are built."""
    from fastgen.pipelines.config import check_image_memory

    default = getattr(gen, "default_size", None) or (512, 512)
    height = config.height or (image.height if image is not None else default[0])
    width = config.width or (image.width if image is not None else default[1])
    per_prompt = candidates or config.num_images_per_prompt
    check_image_memory(prompts * per_prompt, height, width, per_prompt=per_prompt,
                       argument="candidates" if candidates else "num-images-per-prompt")


def _engine_folder(model: str) -> bool:
    """A folder of engine directories made by ``fastgen build --component all`` (needs no engine cache)."""
    return any((Path(model).expanduser() / unet / "manifest.json").is_file() for unet in ("unet", "unet-controlled"))


@click.command("generate")
@click.option("--model", "-m", required=True, callback=nonempty,
              help="A preset (tiny, tiny-sdxl, sd15, sdxl), a local diffusers pipeline folder, or a folder of "
                   "engine directories made by `fastgen build` (unet/, vae-decoder/, text-encoder/...).")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, callback=utf8_text,
              help="A prompt (repeat for several; the empty string is allowed). UTF-8 text: a prompt that is not "
                   "valid UTF-8 (a terminal in another encoding) is refused.")
@click.option("-n", "--num-images-per-prompt", type=int, default=None,
              help=f"{_DOCS['num_images_per_prompt']} [default: 1]")
@click.option("--negative-prompt", default=None, callback=utf8_text, help=_DOCS["negative_prompt"])
@click.option("--image", "image_path", default=None, callback=nonempty,
              help="Image-to-image: the input image file (see --strength).")
@click.option("--mask", "mask_path", default=None, callback=nonempty,
              help="Inpainting of --image: a mask file of the image's size, white where to regenerate, black where "
                   "to keep (see --strength, --mask-blur, --padding-mask-crop).")
@click.option("--out", "-o", default="fastgen-out/generate", show_default=True, type=click.Path(file_okay=False),
              callback=nonempty, help="Folder for the PNGs and results.json: a new or empty folder, or a previous "
              "`fastgen generate` output (whose images are replaced; other folders are refused).")
@click.option("--backend", type=_choices("backend"), default="onnxruntime", show_default=True,
              help="Engine backend (ignored for a folder of engine directories).")
@click.option("--device", type=_choices("device"), default="auto", show_default=True, help="Where the engines run.")
@click.option("--precision", type=_choices("precision"), default="fp32", show_default=True,
              help="Engine precision (ignored for a folder of engine directories).")
@click.option("--profile", help="Shape ranges for the engines, e.g. batch=1:2:8,height=256:512:1024.")
@click.option("--quantization", type=_choices("quantization"), default="none", show_default=True,
              help="Quantize the UNet (fastgen.quant preset; text encoders and VAE stay in float).")
@click.option("--cache-dir", type=click.Path(file_okay=False), callback=nonempty, help="Engine cache root.")
@click.option("--candidates", type=click.IntRange(1), default=None,
              help="Best-of-N: generate N variants per prompt (seeds seed..seed+N-1) and keep the best (needs --scorer).")
@click.option("--keep", type=click.IntRange(1), default=1, show_default=True, help="Best-of-N: images kept per prompt.")
@click.option("--scorer", "scorer_model", default=None, callback=nonempty,
              help="Classifier MODEL that scores the images (with --candidates: ranks them).")
@click.option("--rank-by", default=None, callback=utf8_text,
              help="Best-of-N: the scorer label to maximise (default: its first label).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@click.option("--lora", "loras", multiple=True, callback=nonempty,
              help="A LoRA to apply, PATH[:SCALE] (a .safetensors file in diffusers/PEFT or kohya format, or a folder "
                   "as diffusers saves it; scale 1 by default). Repeat for several.")
@click.option("--control-image", "control_paths", multiple=True, callback=nonempty,
              help="ControlNet condition image file (edges, depth, pose... as an image); repeat for one per "
                   "ControlNet (with one net: one, or one per prompt). See docs/controlnet.md.")
@click.option("--controlnet", "controlnets", multiple=True, callback=nonempty,
              help="A ControlNet: a preset or diffusers folder with a controlnet component, or a built engine folder; "
                   "repeat for several (default: the model's own, e.g. tiny-controlnet's).")
@click.option("--controlnet-scale", "control_scales", multiple=True, type=float,
              help=f"{_DOCS['controlnet_conditioning_scale']} Repeat for one per net. [default: 1.0]")
@click.option("--control-guidance-start", "control_starts", multiple=True, type=float,
              help=f"{_DOCS['control_guidance_start']} [default: 0.0]")
@click.option("--control-guidance-end", "control_ends", multiple=True, type=float,
              help=f"{_DOCS['control_guidance_end']} [default: 1.0]")
@click.option("--canny", is_flag=True, default=False,
              help="Run the model-free Canny edge detector (thresholds 100, 200) on each --control-image first.")
@dataclass_options(GenerateConfig, exclude=("num_images_per_prompt", "negative_prompt", "output_type",
                                            "controlnet_conditioning_scale", "control_guidance_start",
                                            "control_guidance_end"))
def generate(model: str, prompts: tuple[str, ...], num_images_per_prompt: int | None, negative_prompt: str | None,
             image_path: str | None, out: str, backend: str, device: str, precision: str, profile: str | None,
             quantization: str, cache_dir: str | None, candidates: int | None, keep: int, scorer_model: str | None,
             rank_by: str | None, progress: bool, loras: tuple[str, ...] = (), mask_path: str | None = None,
             control_paths: tuple[str, ...] = (), controlnets: tuple[str, ...] = (), control_scales: tuple = (),
             control_starts: tuple = (), control_ends: tuple = (), canny: bool = False, **kwargs: Any) -> None:
    """Generate images from prompts (or from an image with --image) and write PNGs and results.json to --out."""
    from fastgen.models.spec import ShapeProfile
    from fastgen.pipelines import vae_images as imaging
    from fastgen.pipelines.generator import Generator
    from fastgen.pipelines.inpaint import load_mask

    # Everything the user typed is checked before any engine is built.
    control = {name: None if not values else values[0] if len(values) == 1 else tuple(values) for name, values in (
        ("controlnet_conditioning_scale", control_scales), ("control_guidance_start", control_starts),
        ("control_guidance_end", control_ends))}
    config = pop_config(GenerateConfig, kwargs, num_images_per_prompt=num_images_per_prompt,
                        negative_prompt=negative_prompt, output_type="uint8", **control)
    _check_control_flags(control_paths, controlnets, canny, config)
    if config.steps > MAX_STEPS:
        raise InvalidArgumentError("steps", config.steps, f"1 to {MAX_STEPS}",
                                   reason="diffusion schedulers are trained on 1000 timesteps")
    if candidates is not None and scorer_model is None:
        raise InvalidArgumentError("scorer", None, reason="--candidates needs --scorer MODEL to rank the variants")
    if candidates is not None and config.num_images_per_prompt != 1:
        raise InvalidArgumentError("num-images-per-prompt", config.num_images_per_prompt,
                                   reason="with --candidates, choose how many images to keep with --keep")
    if candidates is not None and keep > candidates:
        raise InvalidArgumentError("keep", keep, f"1 to --candidates ({candidates})")
    if rank_by is not None and candidates is None:
        raise InvalidArgumentError("rank-by", rank_by, reason="only used with --candidates")
    if mask_path is not None and image_path is None:
        raise InvalidArgumentError("mask", mask_path, reason="inpainting needs the input image too: pass --image")
    if profile:
        ShapeProfile.parse(profile)  # syntax now; each engine checks its dims and sizes
    from fastgen.lora import parse_lora_arg

    lora_args = [parse_lora_arg(text) for text in loras]
    for path, _ in lora_args:
        if not Path(path).expanduser().exists():
            raise InvalidArgumentError("lora", path, reason="no such file or folder")
    output = OutputFolder(out).prepare()  # may it be written? before the work, not after
    try:
        cache = engine_cache(cache_dir) if cache_dir or not _engine_folder(model) else None
        image = imaging.load_image(image_path) if image_path is not None else None
        mask = load_mask(mask_path) if mask_path is not None else None
        control_images = _control_images(control_paths, canny)
        scorer = _load_scorer(scorer_model, backend, device) if scorer_model else None
        gen = Generator.from_pretrained(model, backend=backend, device=device, precision=precision, cache=cache,
                                        profile=profile, quantization=quantization, progress=progress,
                                        **({"controlnet": list(controlnets)} if controlnets else {}))
        for i, (path, scale) in enumerate(lora_args):
            gen.load_lora(path, name=f"lora{i}", weight=scale)
        _check_image_count(config, len(prompts), candidates, gen, image)
        result = gen.generate(list(prompts), image=image, mask_image=mask, config=config, progress=progress,
                              control_image=control_images,
                              candidates=candidates,
                              scorer=scorer if candidates else None, keep=keep, rank_by=rank_by)
        if scorer is not None and candidates is None:  # score every image, rank nothing
            result.scores = list(scorer.score_images(imaging.to_pil(result.images)))
        extra = {"model": str(model), "backend": getattr(gen.unet, "backend", backend),
                 "device": str(getattr(gen.unet, "device", device)),
                 "precision": getattr(gen.unet, "precision", precision), "scorer": scorer_model}
        if lora_args:
            extra["loras"] = [{"path": path, "scale": scale} for path, scale in lora_args]
        if control_paths:
            extra.update(control_images=list(control_paths), controlnets=list(controlnets) or None, canny=canny)
        data = output.commit(result, extra)
    except BaseException:
        output.discard()
        raise
    _report(data, output.out)


def _check_control_flags(paths: tuple[str, ...], controlnets: tuple[str, ...], canny: bool,
                         config: GenerateConfig) -> None:
    """The ControlNet flags need --control-image (a net without its condition image steers nothing)."""
    used = [flag for flag, on in (("controlnet", controlnets), ("canny", canny), ("guess-mode", config.guess_mode))
            if on]
    defaults = GenerateConfig()
    used += [name.replace("_", "-").replace("conditioning-", "") for name in
             ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")
             if getattr(config, name) != getattr(defaults, name)]
    if used and not paths:
        raise InvalidArgumentError(used[0], "given", reason="ControlNet options need --control-image PATH")


def _control_images(paths: tuple[str, ...], canny: bool) -> list[Any] | None:
    """The --control-image files read (a bad one fails in one line), Canny edges taken when asked."""
    from fastgen.pipelines.control_images import canny_image, load_map

    images = [load_map(p) for p in paths]
    images = [canny_image(i) for i in images] if canny else images
    return (images[0] if len(images) == 1 else images) if images else None


def _report(data: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
    table = Table(title=f"{len(data['files'])} images in {printable(out)}")
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
