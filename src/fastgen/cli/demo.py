"""``fastgen demo``: the main job on the embedded ``tiny`` preset.

With each backend (torch, onnxruntime): build the tiny engines (cached), generate images for a handful
of ad-style prompts, score them with the image classifier and the ad copy with the text classifier,
and run best-of-N (several candidates per prompt, keep the best). Writes the onnxruntime images as
PNGs, ``summary.json``, and prints stage latencies side by side with the agreement of the backends.
"""

from __future__ import annotations

import datetime
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from fastgen.core.fs import write_json_atomic
from fastgen.version import __version__

logger = logging.getLogger(__name__)

PRESET = "tiny"
BACKENDS = ("torch", "onnxruntime")
PROMPTS = (
    "a red sports car on a mountain road at sunset, product shot",
    "minimalist poster of a running shoe, bold typography, summer sale",
    "fresh orange juice bottle on a kitchen counter, bright morning light",
    "luxury watch on black marble, dramatic shadows, premium advert",
)
COPY = ("Summer sale: fifty percent off every running shoe", "Buy now, free shipping, best price guaranteed")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _save_png(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _run_backend(backend: str, cache, steps: int, candidates: int) -> dict[str, Any]:
    from fastgen.pipelines.generator import Generator
    from fastgen.pipelines.scorer import Scorer

    row: dict[str, Any] = {"backend": backend}
    t0 = time.perf_counter()
    gen = Generator.from_pretrained(PRESET, backend=backend, device="cpu", cache=cache)
    scorer = Scorer.from_pretrained(PRESET, "classifier", backend=backend, device="cpu", cache=cache)
    moderator = Scorer.from_pretrained(PRESET, "text-classifier", backend=backend, device="cpu", cache=cache)
    row["setup_s"] = time.perf_counter() - t0
    # Warm-up at the measured shapes so the table shows steady-state latencies: onnxruntime plans
    # memory per new input shape on its first run.
    gen.generate(list(PROMPTS), steps=1, seed=0, progress=False)
    moderator.score_texts(list(COPY))

    result = gen.generate(list(PROMPTS), steps=steps, seed=1234, output_type="np", progress=False)
    lat = result.latencies
    row.update(text_encoding_ms=lat.text_encoding_ms, unet_step_ms=float(np.median(lat.denoising_step_ms)),
               denoising_ms=lat.denoising_ms, vae_decode_ms=lat.vae_decode_ms, total_ms=lat.total_ms)
    row["images"] = result.images
    # The torch UNet's intra-op threads: timed on its first call (ThreadPolicy), None for onnxruntime.
    policy = getattr(gen.unet, "thread_policy", None)
    row["unet_threads"] = policy.threads if policy is not None else None
    row["seeds"] = result.seeds
    t0 = time.perf_counter()
    pil = [_to_pil(img) for img in result.images]
    scores = scorer.score_images(pil)
    row["image_scoring_ms"] = (time.perf_counter() - t0) * 1e3
    row["image_scores"] = [s.to_dict() for s in scores]
    t0 = time.perf_counter()
    row["copy_scores"] = [s.to_dict() for s in moderator.score_texts(list(COPY))]
    row["text_scoring_ms"] = (time.perf_counter() - t0) * 1e3

    best = gen.generate(list(PROMPTS), steps=steps, seed=1234, candidates=candidates, keep=1,
                        scorer=scorer, rank_by=scorer.labels[0], progress=False)
    row["best_of_n_ms"] = best.latencies.total_ms
    row["best"] = [{"prompt": p, "seed": s, "score": v} for p, s, v in zip(best.prompts, best.seeds, best.rank_values)]
    row["best_images"] = best.images
    return row


def _threads(torch_row: dict[str, Any]) -> str:
    """The table title's thread counts: torch's pool, and what the torch UNet chose to run on."""
    chosen = torch_row.get("unet_threads")
    return f"{torch.get_num_threads()} threads" + (f", torch UNet on {chosen}" if chosen else "")


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))


def check_demo_out(out: Path) -> None:
    """Refuse, before the demo runs, an ``out`` it could not write or should not: a file, a folder this
    user cannot write in, or a non-empty folder that is not a previous demo's (its ``summary.json``):
    the demo overwrites its own PNGs, never someone else's files."""
    import json

    from fastgen.cli.options import printable, writable_dir
    from fastgen.errors import InvalidArgumentError

    allowed = "a new or empty folder, or a previous demo's output"
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError("out", printable(out), allowed, reason="exists and is not a directory")
    writable_dir(out, "out")
    if out.is_dir() and any(out.iterdir()):
        summary = out / "summary.json"
        try:
            data = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or "backends" not in data or data.get("preset") != PRESET:
            raise InvalidArgumentError("out", printable(out), allowed,
                                       reason="is not empty and holds no demo summary.json; the demo does not "
                                              "overwrite files it did not write")


def run_demo(out: Path, *, cache_dir: str | None, steps: int = 20, candidates: int = 4, console) -> dict[str, Any]:
    from rich.progress import Progress

    from fastgen.engines.cache import EngineCache

    check_demo_out(out)  # before minutes of work, not after
    cache = EngineCache(cache_dir)
    started = time.perf_counter()
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=len(BACKENDS))
        for backend in BACKENDS:
            progress.update(task, description=f"{backend}: building engines, generating, scoring")
            rows.append(_run_backend(backend, cache, steps, candidates))
            progress.advance(task)
    total = time.perf_counter() - started
    agreement = min(psnr(a, b) for a, b in zip(rows[0]["images"], rows[1]["images"]))

    out.mkdir(parents=True, exist_ok=True)
    files = []
    ort = rows[1]
    for i, (image, seed) in enumerate(zip(ort["images"], ort["seeds"])):
        path = out / f"prompt{i}_seed{seed}.png"
        _save_png(_to_pil(image), path)
        files.append(path.name)
    for i, (image, best) in enumerate(zip(ort["best_images"], ort["best"])):
        path = out / f"prompt{i}_best_seed{best['seed']}.png"
        _save_png(image, path)
        files.append(path.name)

    table = Table(title=f"fastgen demo: preset '{PRESET}', {len(PROMPTS)} prompts, {steps} steps, "
                        f"{platform.machine()} CPU ({_threads(rows[0])}), {total:.1f} s in all")
    table.add_column("stage")
    for backend in BACKENDS:
        table.add_column(f"{backend} ms", justify="right")
    table.add_column("onnxruntime speed-up", justify="right")
    stages = [("text encoding", "text_encoding_ms"), ("UNet step (median)", "unet_step_ms"),
              ("denoising loop", "denoising_ms"), ("VAE decode", "vae_decode_ms"), ("generate, total", "total_ms"),
              ("image scoring", "image_scoring_ms"), ("text scoring (ad copy)", "text_scoring_ms"),
              (f"best-of-{candidates}, total", "best_of_n_ms")]
    for label, key in stages:
        a, b = rows[0][key], rows[1][key]
        table.add_row(label, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x" if b else "-")
    console.print(table)
    console.print(f"torch vs onnxruntime images: PSNR {agreement:.1f} dB (worst of {len(PROMPTS)})")
    for best in ort["best"]:
        console.print(f"  best of {candidates}: seed {best['seed']} ({best['score']:.3f}) for {best['prompt']!r}")
    for text, score in zip(COPY, ort["copy_scores"]):
        console.print(f"  ad copy {text!r}: {score['top'][0]['label']} {score['top'][0]['prob']:.3f}")

    summary = {
        "preset": PRESET, "prompts": list(PROMPTS), "steps": steps, "candidates": candidates,
        "fastgen_version": __version__, "torch_version": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "torch_unet_threads": rows[0].get("unet_threads"), "date": datetime.date.today().isoformat(),
        "total_seconds": total, "psnr_torch_vs_onnxruntime_db": agreement, "files": files,
        "backends": [{k: v for k, v in r.items() if k not in ("images", "best_images")} for r in rows],
    }
    write_json_atomic(out / "summary.json", summary)
    console.print(f"{len(files)} PNGs and summary.json written to {out}")
    return summary
