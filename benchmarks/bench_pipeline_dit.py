"""Diffusion transformers end to end: fastgen's torch backend against diffusers' own pipeline.

    python benchmarks/bench_pipeline_dit.py --preset tiny-flux                         # CPU, seconds
    python benchmarks/bench_pipeline_dit.py --preset flux-dev --device cuda --precision bf16 --height 1024 --steps 28
    python benchmarks/bench_pipeline_dit.py --preset sd35-medium --device cuda --precision bf16 --height 1024 --steps 28

SD3.5 (``StableDiffusion3Pipeline``), FLUX.1 (``FluxPipeline``) and PixArt-Sigma (``PixArtSigmaPipeline``)
run on the very modules fastgen's torch engines hold: FLUX.1-dev is 12B + 4.7B (T5) parameters, and
two copies would not fit a 128 GB host while the random weights are made. diffusers runs them with their
original attention processors (``fastgen.optimize(..., None)`` restores them for its rounds, and fastgen's
rounds route them through ``fastgen.ops.attention`` again), so each side runs its own attention. Same
scheduler (the model's flow-matching one, or PixArt's DPM-Solver), prompts, guidance (each family's
diffusers default) and per-image seeds. Rounds alternate the two sides; round 0 warms up. Reports the
median of each stage (text encoding, transformer step, VAE decode), the end-to-end ratio against
diffusers and the PSNR of fastgen's images against diffusers'. JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import StageTimer, device_name, sync

import fastgen
from fastgen.cli.demo import PROMPTS, psnr
from fastgen.pipelines.config import DEFAULT_GUIDANCE
from fastgen.pipelines.generator import Generator
from fastgen.pipelines.sampling import make_scheduler


def _model(module: torch.nn.Module) -> torch.nn.Module:
    """The diffusers / transformers model inside a fastgen component wrapper."""
    return getattr(module, "model", module)


def diffusers_pipeline(gen: Generator):
    """diffusers' pipeline of ``gen``'s family over the modules of its torch engines (shared, not copied)."""
    import diffusers

    mods = {name: _model(m) for name, m in gen.torch_modules().items() if m is not None}
    common = dict(transformer=mods["unet"], vae=mods["vae_decoder"],
                  scheduler=make_scheduler(None, gen.scheduler_config), text_encoder=mods["text_encoder"],
                  tokenizer=gen.text_encoder.tokenizer)
    if gen.pipeline == "sd3":
        t5 = gen.text_encoder_3
        pipe = diffusers.StableDiffusion3Pipeline(
            text_encoder_2=mods["text_encoder_2"], tokenizer_2=gen.text_encoder_2.tokenizer,
            text_encoder_3=mods.get("text_encoder_3"), tokenizer_3=t5.tokenizer if t5 is not None else None, **common)
    elif gen.pipeline == "flux":
        pipe = diffusers.FluxPipeline(text_encoder_2=mods["text_encoder_2"], tokenizer_2=gen.text_encoder_2.tokenizer,
                                      **common)
    elif gen.pipeline == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(**common)
    else:
        raise SystemExit(f"{gen.pipeline}: not a diffusion transformer (use bench_pipeline.py)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def optimize(target, attention):
    """``fastgen.optimize``, imported when first used: importing it imports the Triton kernels, which must
    not happen before the test suite's kernel tests set ``TRITON_INTERPRET`` (this module is imported
    at collection)."""
    from fastgen.ops.optimize import optimize as apply

    return apply(target, attention)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-flux")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--attention", default="triton", help="fastgen's attention backend on the torch engines")
    ap.add_argument("--steps", type=int, default=8, choices=range(1, 1001), metavar="1..1000")
    ap.add_argument("--height", type=int, default=None, help="pixels, square (default: the preset's opt)")
    ap.add_argument("--iters", type=int, default=2, choices=range(1, 1001), metavar="1..1000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    build = fastgen.BuildConfig(execution=fastgen.ExecutionOptions(attention=args.attention))
    gen = Generator.from_pretrained(args.preset, backend="torch", device=args.device, precision=args.precision,
                                    build_config=build)
    setup_s = time.perf_counter() - t0
    height = args.height or gen.default_size[0]
    guidance = DEFAULT_GUIDANCE[gen.pipeline]
    pipe = diffusers_pipeline(gen)
    hooked = {"text_encoding": pipe.text_encoder, "transformer": pipe.transformer, "vae_decode": pipe.vae.decoder}
    for i, name in ((2, "text_encoder_2"), (3, "text_encoder_3")):
        if getattr(pipe, name, None) is not None:
            hooked[f"text_encoding_{i}"] = getattr(pipe, name)
    timer = StageTimer(args.device, **hooked)
    prompts, seeds = [PROMPTS[0]], [1000]
    extra = {"use_resolution_binning": False} if gen.pipeline == "pixart" else {}

    def run_diffusers() -> tuple[float, dict, np.ndarray]:
        report = optimize(gen, None)  # diffusers' own attention processors for its rounds
        timer.enabled = True
        timer.reset()
        sync(args.device)
        start = time.perf_counter()
        out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance, height=height, width=height,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **extra)
        sync(args.device)
        timer.enabled = False
        del report
        return (time.perf_counter() - start) * 1e3, dict(timer.totals), out.images

    def run_fastgen():
        if args.attention != "default":
            optimize(gen, args.attention)
        return gen.generate(prompts, seeds=seeds, steps=args.steps, guidance_scale=guidance, height=height,
                            width=height, output_type="np", progress=False)

    diff_runs, fast_runs = [], []
    for i in range(args.iters + 1):
        d, f = run_diffusers(), run_fastgen()
        if i:
            diff_runs.append(d)
            fast_runs.append(f)
    stage = lambda key: statistics.median(r[1].get(key, 0.0) for r in diff_runs)  # noqa: E731
    rows = {"diffusers": {"total_ms": statistics.median(r[0] for r in diff_runs),
                          "text_encoding_ms": sum(stage(k) for k in hooked if k.startswith("text_encoding")),
                          "transformer_step_ms": stage("transformer") / args.steps,
                          "vae_decode_ms": stage("vae_decode")}}
    lat = [r.latencies for r in fast_runs]
    rows["torch"] = {"setup_s": setup_s, "attention": args.attention,
                     "total_ms": statistics.median(x.total_ms for x in lat),
                     "text_encoding_ms": statistics.median(x.text_encoding_ms for x in lat),
                     "transformer_step_ms": statistics.median(s for x in lat for s in x.denoising_step_ms),
                     "vae_decode_ms": statistics.median(x.vae_decode_ms for x in lat)}
    rows["torch"]["psnr_vs_diffusers_db"] = min(psnr(a, b) for a, b in zip(fast_runs[-1].images, diff_runs[-1][2]))
    rows["torch"]["speedup_vs_diffusers"] = rows["diffusers"]["total_ms"] / rows["torch"]["total_ms"]
    print(f"diffusers {rows['diffusers']['total_ms']:.1f} ms, fastgen torch {rows['torch']['total_ms']:.1f} ms "
          f"({rows['torch']['speedup_vs_diffusers']:.2f}x), PSNR {rows['torch']['psnr_vs_diffusers_db']:.1f} dB")
    result = {
        "benchmark": "pipeline_dit", "preset": args.preset, "pipeline": gen.pipeline, "device": device_name(args.device),
        "precision": args.precision, "steps": args.steps, "height": height, "width": height, "guidance": guidance,
        "prompts": len(prompts), "iters": args.iters, "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "versions": {"fastgen": fastgen.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "diffusers": __import__("diffusers").__version__},
        "results": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"pipeline_{args.preset}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
