"""End-to-end generation latency per stage: fastgen (each backend) against diffusers' own pipeline.

    python benchmarks/bench_pipeline.py --preset tiny                                  # CPU
    python benchmarks/bench_pipeline.py --preset sd15 --steps 1 --height 512 --iters 1  # CPU, one step
    python benchmarks/bench_pipeline.py --preset sd15 --device cuda --precision fp16 --steps 50 --height 512
    python benchmarks/bench_pipeline.py --preset sdxl --device cuda --precision fp16 --steps 30 --height 1024

Both sides use the same weights (diffusers' pipeline is assembled from the very modules fastgen builds
its engines from), the same scheduler, prompts and per-image seeds, in the same process. Reports the
median of each stage (text encoding, UNet step, VAE decode, and image scoring when the preset has a
classifier), the end-to-end ratio against diffusers, and the PSNR of fastgen's images against
diffusers'. JSON goes to benchmarks/results/ naming the device, versions and date.
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

import fastgen
from fastgen.cli.demo import PROMPTS, psnr
from fastgen.pipelines.generator import Generator
from fastgen.pipelines.sampling import make_scheduler


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(0)}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StageTimer:
    """Forward hooks that add up the wall time spent in each diffusers sub-module."""

    def __init__(self, device: str, **modules: torch.nn.Module) -> None:
        self.device, self.totals, self._t0 = device, dict.fromkeys(modules, 0.0), {}
        self.enabled = True  # off while another contender runs the same modules
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, a, name=name: self._start(name))
            module.register_forward_hook(lambda m, a, o, name=name: self._stop(name))

    def _start(self, name: str) -> None:
        if not self.enabled:
            return
        sync(self.device)
        self._t0[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        if not self.enabled:
            return
        sync(self.device)
        self.totals[name] += (time.perf_counter() - self._t0[name]) * 1e3

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def diffusers_pipeline(preset: str, scheduler: str | None, device: str, dtype: torch.dtype):
    """diffusers' own pipeline from the same modules (and tokenizers, scheduler) fastgen exports."""
    from fastgen.models import load_component, model_components

    comps = {name: load_component(preset, name) for name in model_components(preset)
             if name in ("unet", "vae-decoder", "text-encoder", "text-encoder-2")}
    unet = comps["unet"]
    sched = make_scheduler(scheduler, unet.metadata.scheduler)
    kwargs = dict(unet=unet.model, vae=comps["vae-decoder"].model, text_encoder=comps["text-encoder"].model,
                  tokenizer=comps["text-encoder"].tokenizer, scheduler=sched)
    if unet.metadata.pipeline == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(text_encoder_2=comps["text-encoder-2"].model,
                                         tokenizer_2=comps["text-encoder-2"].tokenizer, **kwargs)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--height", type=int, default=None, help="pixels (default: the preset's opt)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per call (each with guidance: batch 2x)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--verify", default="opt", choices=["none", "opt", "profile"],
                    help="export verification of the onnxruntime engines (opt: at the benchmarked shape)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    seeds = [1000 + i for i in range(len(prompts))]
    rows, images = {}, {}

    pipe = diffusers_pipeline(args.preset, args.scheduler, args.device, dtype)
    height = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    hooked = dict(text_encoding=pipe.text_encoder, unet=pipe.unet, vae_decode=pipe.vae.decoder)
    if getattr(pipe, "text_encoder_2", None) is not None:
        hooked["text_encoding_2"] = pipe.text_encoder_2
    timer = StageTimer(args.device, **hooked)
    backends = [b for b in args.backends.split(",") if b]
    gens, setup = {}, {}
    for backend in backends:
        t0 = time.perf_counter()
        gens[backend] = Generator.from_pretrained(
            args.preset, backend=backend, device=args.device, precision=args.precision,
            profile=f"batch=1:{2 * len(prompts)}:{2 * len(prompts)},height={height},width={height}",
            build_config=fastgen.BuildConfig(export=fastgen.ExportConfig(verify=args.verify)))
        setup[backend] = time.perf_counter() - t0

    def run_diffusers() -> tuple[float, dict, np.ndarray]:
        timer.reset()
        sync(args.device)
        t0 = time.perf_counter()
        out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, height=height, width=height,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")
        sync(args.device)
        return (time.perf_counter() - t0) * 1e3, dict(timer.totals), out.images

    def run_fastgen(backend: str):
        return gens[backend].generate(prompts, seeds=seeds, steps=args.steps, guidance_scale=7.5, height=height,
                                      width=height, scheduler=args.scheduler, output_type="np", progress=False)

    # Rounds interleave the contenders, so a noisy machine (shared cores, turbo) hits them alike;
    # round 0 warms up.
    diff_runs, fast_runs = [], {b: [] for b in backends}
    for i in range(args.iters + 1):
        d = run_diffusers()
        runs = {b: run_fastgen(b) for b in backends}
        if i:
            diff_runs.append(d)
            for b in backends:
                fast_runs[b].append(runs[b])
    images["diffusers"] = diff_runs[-1][2]
    stage = lambda key: statistics.median(r[1].get(key, 0.0) for r in diff_runs)  # noqa: E731
    rows["diffusers"] = {"total_ms": statistics.median(r[0] for r in diff_runs),
                         "text_encoding_ms": stage("text_encoding") + stage("text_encoding_2"),
                         "unet_step_ms": stage("unet") / args.steps, "vae_decode_ms": stage("vae_decode")}
    print(f"diffusers: {rows['diffusers']['total_ms']:.1f} ms", flush=True)
    for backend in backends:
        lat = [r.latencies for r in fast_runs[backend]]
        rows[backend] = {"setup_s": setup[backend], "total_ms": statistics.median(x.total_ms for x in lat),
                         "text_encoding_ms": statistics.median(x.text_encoding_ms for x in lat),
                         "unet_step_ms": statistics.median(s for x in lat for s in x.denoising_step_ms),
                         "vae_decode_ms": statistics.median(x.vae_decode_ms for x in lat)}
        images[backend] = fast_runs[backend][-1].images
        rows[backend]["psnr_vs_diffusers_db"] = min(psnr(a, b) for a, b in zip(images[backend], images["diffusers"]))
        rows[backend]["speedup_vs_diffusers"] = rows["diffusers"]["total_ms"] / rows[backend]["total_ms"]
        print(f"{backend}: {rows[backend]['total_ms']:.1f} ms ({rows[backend]['speedup_vs_diffusers']:.2f}x diffusers), "
              f"PSNR {rows[backend]['psnr_vs_diffusers_db']:.1f} dB", flush=True)

    if "classifier" in fastgen.models.model_components(args.preset):
        from fastgen.pipelines.scorer import Scorer

        pil = [np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in images["diffusers"]]
        for backend in backends:
            scorer = Scorer.from_pretrained(args.preset, "classifier", backend=backend, device=args.device)
            scorer.score_images(pil)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                scorer.score_images(pil)
            rows[backend]["image_scoring_ms"] = (time.perf_counter() - t0) * 1e3 / args.iters

    import onnxruntime

    result = {
        "benchmark": "pipeline", "preset": args.preset, "device": device_name(args.device),
        "precision": args.precision, "scheduler": args.scheduler, "steps": args.steps, "height": height,
        "width": height, "prompts": len(prompts), "guidance": 7.5, "iters": args.iters,
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "versions": {"fastgen": fastgen.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                     "diffusers": __import__("diffusers").__version__},
        "results": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"pipeline_{args.preset}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
