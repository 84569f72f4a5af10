"""Quantization: accuracy against fp32 on the CPU, and SD1.5 UNet step latency per config on a GPU.

    python benchmarks/bench_quant.py --accuracy            # CPU, JSON to benchmarks/results/quant_accuracy_cpu.json
    python benchmarks/bench_quant.py --accuracy --quick    # tiny models only (a couple of minutes)
    python benchmarks/bench_quant.py --accuracy --parts dit   # DiTs, JSON to .../quant_accuracy_dit_cpu.json
    python benchmarks/bench_quant.py --gpu                 # CUDA, JSON to benchmarks/results/quant_latency_cuda.json

``--accuracy`` (random weights throughout; nothing is downloaded):

- UNets ``tiny`` (64x64) and ``sd15`` (256x256): SQNR of one UNet output and of the final latents
  after a 20-step classifier-free-guided loop (guidance 7.5, the model's PNDM scheduler) against the
  fp32 UNet from the same seed, per config (with ``DEFAULT_SKIP``); per-layer sensitivity (every
  nn.Linear / 1x1 conv quantized alone, skip list ignored) for W8A8 and fp8 (and int8 weight-only on
  tiny), summarised per layer role: the evidence for ``DEFAULT_SKIP``. Static and SmoothQuant configs
  are calibrated on two other seeds' loops. int4 uses group 32 on tiny, 64 on sd15.
- Classifiers (tiny ResNet, tiny BERT, and a random ViT-S/16 with 10 labels, where almost all compute
  is in Linear layers): top-1 agreement and max softmax-probability difference on 256 fixed inputs,
  also with the classifier head quantized (the evidence for skipping heads).
- ONNX Runtime on the CPU: each int8 graph (W8A8 dynamic = MatMulInteger, static = QDQ, int8
  weight-only = DQ -> MatMulNBits) against the fp32 graph: speed ratio, top-1 agreement, and the int8
  kernels in ORT's optimized graph.

``--parts dit`` (its own JSON file): diffusion transformers, tiny-sd3 / tiny-flux / tiny-pixart at
64x64 (20 steps, the profile's T5 length) and one larger shape per family (width 384, 6 blocks, 256x256,
10 steps, 128 T5 tokens; random weights: :data:`LARGER_DITS`): final-latent and one-call SQNR per config
with ``DEFAULT_SKIP`` and with nothing skipped (``-no-skip``), each family's own loop (SD3 / PixArt
classifier-free guidance, FLUX distilled guidance, the family's scheduler), and the per-layer
sensitivity for W8A8 and fp8 summarised per DiT layer role: the evidence for the DiT entries of
``DEFAULT_SKIP``.

``--gpu`` (CUDA; prints one line and exits 0 without it): SD1.5 UNet forward latency at 512x512,
batch 2 (one classifier-free-guided step), fp16 baseline and every config side by side in one run
(CUDA events, median of ``--iters`` after ``--warmup``), with each config's output SQNR against the
fp16 UNet as a correctness check. Results are written after every config, so a failure part-way keeps
what was measured; a config that fails records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import fastgen
from fastgen.core.fs import write_json_atomic
from fastgen.quant import (
    Fp8DynamicConfig,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
    Int8WeightOnlyConfig,
    calibrate,
    quantize_,
    quantized_layers,
    sqnr_db,
)

RESULTS = Path(__file__).resolve().parent / "results"


def unet_configs(group_size: int) -> dict:
    return {
        "int8-weight-only": Int8WeightOnlyConfig(),
        f"int4-weight-only-g{group_size}": Int4WeightOnlyConfig(group_size=group_size),
        "w8a8-dynamic": Int8DynamicConfig(),
        "w8a8-dynamic-smoothquant": Int8DynamicConfig(smoothquant=True),
        "w8a8-static": Int8StaticConfig(),
        "w8a8-static-smoothquant": Int8StaticConfig(smoothquant=True),
        "fp8-dynamic": Fp8DynamicConfig(),
    }


CLASSIFIER_CONFIGS = {
    "int8-weight-only": Int8WeightOnlyConfig(),
    "w8a8-dynamic": Int8DynamicConfig(),
    "w8a8-static": Int8StaticConfig(),
    "w8a8-static-smoothquant": Int8StaticConfig(smoothquant=True),
    "fp8-dynamic": Fp8DynamicConfig(),
    # The evidence for DEFAULT_SKIP's "*classifier" entries: the same configs with the head quantized.
    "w8a8-dynamic-head-quantized": Int8DynamicConfig(skip=()),
    "fp8-dynamic-head-quantized": Fp8DynamicConfig(skip=()),
}
ORT_CONFIGS = {k: CLASSIFIER_CONFIGS[k] for k in ("w8a8-dynamic", "w8a8-static", "int8-weight-only")}
SENSITIVITY = {"tiny": ("int8-weight-only", "w8a8-dynamic", "fp8-dynamic"), "sd15": ("w8a8-dynamic", "fp8-dynamic")}


def dit_configs() -> dict:
    """Every DiT config with DEFAULT_SKIP, and the same with nothing skipped (``-no-skip``)."""
    base = {
        "int8-weight-only": Int8WeightOnlyConfig(),
        "w8a8-dynamic": Int8DynamicConfig(),
        "w8a8-dynamic-smoothquant": Int8DynamicConfig(smoothquant=True),
        "w8a8-static": Int8StaticConfig(),
        "w8a8-static-smoothquant": Int8StaticConfig(smoothquant=True),
        "fp8-dynamic": Fp8DynamicConfig(),
    }
    return {**base, **{f"{name}-no-skip": dataclasses.replace(c, skip=()) for name, c in base.items()}}


#: One larger shape per DiT family (random weights, seed 0): width 384 and 6 blocks, run at 256x256 px.
#: Each keeps its family's features (SD3.5's dual attention and RMS q/k norm, FLUX.1-dev's guidance
#: embedding and 128-wide rotary heads, PixArt-Sigma's learned sigma); text widths are cut to 512
#: (the random conditioning's width changes nothing but the cost).
LARGER_DITS = {
    "sd3": ("SD3Transformer2DModel", {
        "attention_head_dim": 64, "num_attention_heads": 6, "num_layers": 6, "dual_attention_layers": [0, 1, 2],
        "caption_projection_dim": 384, "in_channels": 16, "out_channels": 16, "joint_attention_dim": 512,
        "pooled_projection_dim": 512, "patch_size": 2, "pos_embed_max_size": 64, "qk_norm": "rms_norm",
        "sample_size": 32}),
    "flux": ("FluxTransformer2DModel", {
        "attention_head_dim": 128, "num_attention_heads": 3, "num_layers": 2, "num_single_layers": 4,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 512,
        "pooled_projection_dim": 256, "patch_size": 1}),
    "pixart": ("PixArtTransformer2DModel", {
        "attention_head_dim": 64, "num_attention_heads": 6, "num_layers": 6, "cross_attention_dim": 384,
        "caption_channels": 512, "in_channels": 4, "out_channels": 8, "patch_size": 2, "sample_size": 32,
        "activation_fn": "gelu-approximate", "attention_bias": True, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "num_embeds_ada_norm": 1000,
        "interpolation_scale": 2, "use_additional_conditions": False}),
}
#: (image side, steps, T5 tokens) of the larger shapes.
LARGER_DIT_RUN = (256, 10, 128)


def larger_dit(family: str):
    """The larger shape of ``family`` as a transformer component with its family's metadata."""
    import diffusers

    from fastgen.models.metadata import UNetMetadata
    from fastgen.models.presets_dit import DIT_FAMILIES

    cls_name, config = LARGER_DITS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, cls_name)(**config).eval()
    comp = fastgen.adapt(model, "transformer", image_size=LARGER_DIT_RUN[0])
    comp.metadata = UNetMetadata(scheduler=dict(DIT_FAMILIES[cls_name][1]), pipeline=DIT_FAMILIES[cls_name][0])
    return comp


def run_dit(args: argparse.Namespace) -> None:
    import quant_accuracy as report  # benchmarks/quant_accuracy.py, next to this script

    out_path = Path(args.dit_out or RESULTS / "quant_accuracy_dit_cpu.json")
    result = {**report.environment(), "floors_db": report.DIT_FLOORS_DB, "dit": {}}
    t0 = time.perf_counter()
    models = [(f"tiny-{f}", lambda f=f: fastgen.load_component(f"tiny-{f}", "transformer"), 64, args.steps, None)
              for f in ("sd3", "flux", "pixart")]
    if not args.quick:
        side, steps, seq = LARGER_DIT_RUN
        models += [(f"{f}-w384-d6", lambda f=f: larger_dit(f), side, steps, seq) for f in LARGER_DITS]
    for name, make, side, steps, seq in models:
        comp = make()
        result["dit"][name] = report.unet_accuracy(
            comp, dit_configs(), height=side, width=side, steps=steps, seq=seq, sensitivity_batch=2,
            sensitivity_configs=("w8a8-dynamic-no-skip", "fp8-dynamic-no-skip"), floors=report.DIT_FLOORS_DB,
            roles=report.DIT_ROLES, progress=args.progress)
        result["dit"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(out_path, result)
        print(f"{name}: " + ", ".join(f"{k} {v['final_latents_sqnr_db']}" for k, v in
                                      result["dit"][name]["configs"].items()), flush=True)
        del comp
        gc.collect()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out_path, result)
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")


def vit_classifier():
    """A ViT-S/16 (224 px, 12 layers, width 384) with 10 labels and random weights, as a component."""
    from transformers import ViTConfig, ViTForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ViTForImageClassification(ViTConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
            image_size=224, patch_size=16, num_labels=10)).eval()
    return fastgen.adapt(model)


def run_accuracy(args: argparse.Namespace) -> int:
    import quant_accuracy as report  # benchmarks/quant_accuracy.py, next to this script

    out_path = Path(args.out or RESULTS / "quant_accuracy_cpu.json")
    parts = set(args.parts.split(","))
    unknown = parts - {"unet", "classifiers", "dit"}
    if unknown:
        raise SystemExit(f"error: invalid --parts {sorted(unknown)[0]!r} (allowed: unet, classifiers, dit)")
    if "dit" in parts:  # its own results file
        run_dit(args)
        parts.discard("dit")
        if not parts:
            return 0
    result = {**report.environment(), "unet": {}, "classifiers": {}, "onnxruntime_int8": {}}
    if parts != {"unet", "classifiers"} and out_path.exists():
        # Carry the sections this run does not measure over from the last run, saying when they were.
        old = json.loads(out_path.read_text())
        carried = {"date": old.get("date"), "versions": old.get("versions")}
        keep = ("unet",) if "unet" not in parts else ("classifiers", "onnxruntime_int8")
        for section in keep:
            result[section] = old.get(section, {})
        result["carried_over"] = {section: carried for section in keep}

    def save() -> None:
        write_json_atomic(out_path, result)

    t0 = time.perf_counter()
    # int4 groups: tiny's layers are 32/64 wide; sd15's narrowest are 320 wide, which 128 does not divide.
    unets = [("tiny", 64, 32)] + ([] if args.quick else [("sd15", 256, 64)])
    for model, size, group in unets if "unet" in parts else ():
        comp = fastgen.load_component(model, "unet")
        sens = SENSITIVITY[model] if (model == "tiny" or args.sd15_sensitivity) else ()
        result["unet"][model] = report.unet_accuracy(
            comp, unet_configs(group), height=size, width=size, steps=args.steps, sensitivity_configs=sens,
            progress=args.progress)
        result["unet"][model]["seconds"] = round(time.perf_counter() - t0, 1)
        save()
        del comp
        gc.collect()

    classifiers = [("tiny/classifier", lambda: fastgen.load_component("tiny", "classifier")),
                   ("tiny/text-classifier", lambda: fastgen.load_component("tiny", "text-classifier"))]
    if not args.quick:
        classifiers.append(("vit-s16-random", vit_classifier))
    for name, make in classifiers if "classifiers" in parts else ():
        comp = make()
        result["classifiers"][name] = report.classifier_accuracy(comp, CLASSIFIER_CONFIGS, n=args.inputs)
        save()
        result["onnxruntime_int8"][name] = report.ort_int8_comparison(comp, ORT_CONFIGS, n=args.inputs,
                                                                      repeats=args.repeats)
        save()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")
    return 0


# ------------------------------------------------------------------------------------------- GPU
def call_times_ms(fn, warmup: int, iters: int, cuda: bool) -> list[float]:
    """Per-call milliseconds: CUDA events on a GPU, perf_counter on the CPU (the --device cpu dry run)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_gpu(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_quant --gpu: no CUDA device; nothing measured")
        return 0
    import quant_accuracy as report  # benchmarks/quant_accuracy.py, next to this script

    out_path = Path(args.out or RESULTS / ("quant_latency_cuda.json" if cuda else "quant_latency_cpu_dryrun.json"))
    env = report.environment()
    try:
        import triton

        env["versions"]["triton"] = triton.__version__
    except ImportError:
        env["versions"]["triton"] = None
    if cuda:
        env["device"]["capability"] = list(torch.cuda.get_device_capability(0))
    side = args.size // 8
    result = {**env, "settings": {"model": args.model, "height": args.size, "width": args.size, "batch": args.batch,
                                  "dtype": "float16", "device": args.device, "warmup": args.warmup,
                                  "iters": args.iters, "what": "one UNet forward (= one CFG step at batch 2)"},
              "configs": {}}

    comp = fastgen.load_component(args.model, "unet")  # fp32 on the CPU; each config gets its own copy
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch, 4, side, side, generator=gen),
              torch.full((args.batch,), 500.0),
              torch.randn(args.batch, 77, comp.spec.inputs[2].shape[-1], generator=gen))
    # fp16 latents and text states, fp32 timesteps (as the exported spec and diffusers take them)
    dev_inputs = tuple(x.to(args.device, torch.float16) if x.dim() > 1 else x.to(args.device) for x in inputs)
    calib = [tuple(torch.randn_like(x) if x.dim() > 1 else x for x in dev_inputs) for _ in range(2)]
    baseline_out = None

    def measure(name: str, config) -> None:
        nonlocal baseline_out
        entry: dict = {"config": config.to_dict() if config is not None else None}
        result["configs"][name] = entry
        module = None
        try:
            module = copy.deepcopy(comp.module).to(args.device, torch.float16).eval()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if config is not None:
                t = time.perf_counter()
                if config.needs_calibration:
                    calibrate(module, calib)  # random inputs: enough for timing, not for accuracy
                quantize_(module, config)
                if cuda:
                    torch.cuda.synchronize()
                entry["quantize_seconds"] = round(time.perf_counter() - t, 2)
                entry["layers_quantized"] = len(quantized_layers(module))
            with torch.inference_mode():
                out = module(*dev_inputs)[0].float()
                times = call_times_ms(lambda: module(*dev_inputs), args.warmup, args.iters, cuda)
            entry.update({"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                          "weight_bytes": report.weight_bytes(module)})
            if cuda:
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if baseline_out is None:
                baseline_out = out
            else:
                entry["output_sqnr_vs_fp16_db"] = round(sqnr_db(baseline_out, out), 2)
                entry["speedup_vs_fp16"] = round(result["configs"]["fp16"]["median_ms"] / entry["median_ms"], 3)
            print(f"{name:34s} {entry['median_ms']:9.2f} ms  {entry.get('speedup_vs_fp16', 1.0):5.2f}x  "
                  f"sqnr {entry.get('output_sqnr_vs_fp16_db', '-')}", flush=True)
        except Exception as e:  # record and go on: one broken config must not lose the others
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=6)
            print(f"{name:34s} FAILED: {entry['error']}", flush=True)
        finally:
            module = None  # drop this config's copy before the next one is made
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            write_json_atomic(out_path, result)

    measure("fp16", None)
    if baseline_out is None:
        print("fp16 baseline failed; see", out_path)
        return 1
    for name, config in unet_configs(args.group_size).items():
        measure(name, config)
    print(f"wrote {out_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accuracy", action="store_true", help="CPU accuracy report")
    parser.add_argument("--gpu", action="store_true", help="CUDA UNet latency per config")
    parser.add_argument("--quick", action="store_true", help="accuracy: tiny models only")
    parser.add_argument("--parts", default="unet,classifiers",
                        help="accuracy: what to measure (unet, classifiers, dit); the others of unet and "
                             "classifiers are carried over from --out (dit has its own file, --dit-out)")
    parser.add_argument("--dit-out", help="accuracy: JSON path of the dit part "
                                          "(default benchmarks/results/quant_accuracy_dit_cpu.json)")
    parser.add_argument("--steps", type=int, default=20, help="accuracy: denoising steps")
    parser.add_argument("--inputs", type=int, default=256, help="accuracy: classifier inputs")
    parser.add_argument("--repeats", type=int, default=5, help="accuracy: ORT timing repeats")
    parser.add_argument("--no-sd15-sensitivity", dest="sd15_sensitivity", action="store_false",
                        help="accuracy: skip sd15's per-layer sensitivity (the longest part)")
    parser.add_argument("--size", type=int, default=512, help="gpu: image size in pixels")
    parser.add_argument("--model", default="sd15", help="gpu: preset whose UNet is timed")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="gpu: cpu is a dry run of the same code path (fp16 on the CPU, slow)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="gpu: int4 group size (64 divides every SD1.5 width; 128 leaves the 320-wide layers in float)")
    parser.add_argument("--batch", type=int, default=2, help="gpu: batch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not (args.accuracy or args.gpu):
        parser.error("choose --accuracy and/or --gpu")
    rc = 0
    if args.gpu:
        rc |= run_gpu(args)
    if args.accuracy:
        rc |= run_accuracy(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
