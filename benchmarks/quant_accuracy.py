"""Accuracy of quantized models, measured against fp32: what ``bench_quant.py --accuracy`` reports.

A benchmark module (``benchmarks/``), not part of the library: it drives the library from the top
(pipelines' denoising loops, ``fastgen.build`` for the ONNX Runtime engines).

- UNets: SQNR of one UNet output, and of the final latents after a full classifier-free-guided
  denoising loop with the model's own scheduler, against the fp32 UNet from the same seed and
  prompt embeddings; plus the per-layer sensitivity ranking (``fastgen.quant.sensitivity``).
- Diffusion transformers (SD3, FLUX, PixArt-Sigma): the same figures from each family's own loop
  (:func:`fastgen.pipelines.calibration.denoise`: its guidance and schedule), each config with
  ``DEFAULT_SKIP`` and with nothing skipped, and the sensitivity summarised per DiT layer role.
- Classifiers: top-1 agreement and the largest softmax-probability difference on a fixed input set.
- ONNX Runtime: the int8 QDQ classifier graph against the fp32 graph on the CPU (speed ratio,
  top-1 agreement, and which int8 kernels ORT's optimized graph actually runs).

Static and SmoothQuant configs are calibrated on different seeds (and prompts) than they are
measured on. Random-weight models lack the activation outliers of trained ones, so these figures
are an upper bound on what trained weights give (see the project report).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch

from fastgen.models.metadata import NEUTRAL_MEAN, NEUTRAL_STD
from fastgen.pipelines.calibration import denoise, loop_family, unet_calibration_loop, unet_conditioning
from fastgen.pipelines.config import GenerateConfig
from fastgen.quant.api import quantized_layers
from fastgen.quant.calibration import calibrate
from fastgen.quant.components import quantize_component
from fastgen.quant.config import QuantConfig
from fastgen.quant.layerwise import run_module, sensitivity, sqnr_db

logger = logging.getLogger(__name__)

#: Required SQNR (dB) of the final latents after the denoising loop, per config class.
FLOORS_DB = {"Int8WeightOnlyConfig": 30.0, "Int8DynamicConfig": 25.0, "Fp8DynamicConfig": 25.0}
#: The same for diffusion transformers with ``DEFAULT_SKIP``, per config name (``-no-skip`` variants have
#: none): the UNets' floors, static W8A8 (with or without SmoothQuant) held to W8A8's.
DIT_FLOORS_DB = {"int8-weight-only": 30.0, "w8a8-dynamic": 25.0, "w8a8-dynamic-smoothquant": 25.0,
                 "w8a8-static": 25.0, "w8a8-static-smoothquant": 25.0, "fp8-dynamic": 25.0}


def _db(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else round(value, 2)


# ------------------------------------------------------------------------------------------ UNets
def quantized_copy(comp: Any, config: QuantConfig, forward_loop: Any = None) -> Any:
    """A deep copy of ``comp`` with its model quantized (calibrated on ``forward_loop`` first when the
    config needs it): exactly what ``fastgen.build(..., quantization=config)`` builds from."""
    return quantize_component(comp, config, calibration=forward_loop)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def unet_accuracy(comp: Any, configs: dict[str, QuantConfig], *, height: int, width: int, steps: int = 20,
                  seed: int = 0, sensitivity_configs: tuple[str, ...] = (), sensitivity_layers: Any = None,
                  sensitivity_batch: int = 1, progress: bool = False, seq: int | None = None,
                  floors: dict[str, float] = FLOORS_DB, roles: tuple = ()) -> dict[str, Any]:
    """Per config: one-step UNet (or transformer) output SQNR, final-latent SQNR, layer counts, bytes.

    For the configs named in ``sensitivity_configs``, also every layer's sensitivity (``sensitivity``
    on one input batch of ``sensitivity_batch`` at the same size) and a summary per layer role
    (``roles``; default :data:`ROLES`, a UNet's). ``seq``: a transformer's text tokens (default its
    profile's opt). ``floors``: the final-latent floor per config name or class.
    """
    family = loop_family(comp)
    dims = {"batch": 2, "height": height, "width": width, **({"seq": seq} if seq is not None else {})}
    inputs = comp.spec.sample_inputs(dims, seed=seed + 1)
    args = tuple(inputs.values())
    ref_out = run_module(comp.module, args)
    ref_latents = denoise(comp.module, comp, height=height, width=width, steps=steps, seed=seed, seq=seq)
    loop = unet_calibration_loop(comp, height=height, width=width, steps=max(steps // 4, 2), seq=seq)
    settings = {"height": height, "width": width, "steps": steps,
                "guidance": GenerateConfig().resolved(family).guidance_scale,
                "scheduler": comp.metadata.scheduler.get("_class_name"), "seed": seed,
                "calibration": "2 denoising loops of steps/4 steps on seeds 101, 102"}
    if family != "sd":
        settings.update(family=family, seq=seq if seq is not None else comp.spec.profile.dims["seq"].opt)
    result: dict[str, Any] = {"settings": settings, "fp32_weight_bytes": weight_bytes(comp.module), "configs": {}}
    for name, config in configs.items():
        q = quantized_copy(comp, config, loop)
        latents = denoise(q.module, q, height=height, width=width, steps=steps, seed=seed, seq=seq)
        entry = {
            "config": config.to_dict(),
            "unet_output_sqnr_db": _db(sqnr_db(ref_out, run_module(q.module, args))),
            "final_latents_sqnr_db": _db(sqnr_db(ref_latents, latents)),
            "layers_quantized": len(quantized_layers(q.module)),
            "weight_bytes": weight_bytes(q.module),
        }
        if family != "sd":
            entry["quantized_weight_share"] = quantized_share(q.model)
        del q
        floor = floors.get(name, floors.get(type(config).__name__)) if config.skip is None else None
        if floor is not None:
            entry["floor_db"] = floor
            entry["meets_floor"] = entry["final_latents_sqnr_db"] is not None and entry["final_latents_sqnr_db"] >= floor
        result["configs"][name] = entry
        logger.info("unet %s: output %s dB, final latents %s dB", name, entry["unet_output_sqnr_db"],
                    entry["final_latents_sqnr_db"])
        if name in sensitivity_configs:
            small = tuple(a[:sensitivity_batch] for a in args)
            target = comp
            if config.needs_calibration:
                target = copy.deepcopy(comp)
                calibrate(target.module, loop)
            layers = sensitivity(target.module, small, config, layers=sensitivity_layers, progress=progress)
            entry["sensitivity"] = [r.to_dict() for r in layers]
            entry["sensitivity_by_role"] = summarize_roles(layers, roles or ROLES)
    return result


def quantized_share(model: torch.nn.Module) -> float:
    """Share of the eligible layers' weights (~ their multiply-adds per token) that is quantized."""
    from fastgen.quant.calibration import calibration_layers

    done = sum(layer.in_features * layer.out_features for layer in quantized_layers(model).values())
    left = sum(m.weight.numel() for _, m in calibration_layers(model))
    return round(done / max(done + left, 1), 4)


#: Layer roles in diffusers UNets (first matching pattern wins), for the sensitivity summary.
ROLES = (("time_embedding", r"time_embedding\."), ("add_embedding", r"add_embedding\."),
         ("time_emb_proj", r"time_emb_proj$"), ("conv_shortcut", r"conv_shortcut$"),
         ("proj_in", r"proj_in$"), ("proj_out", r"proj_out$"), ("attn_qkv", r"attn\d\.to_[qkv]$"),
         ("attn_out", r"attn\d\.to_out\.0$"), ("ff_in", r"ff\.net\.0\.proj$"), ("ff_out", r"ff\.net\.2$"))


#: Layer roles in diffusers' SD3 / FLUX / PixArt transformers (names under the component's wrapper,
#: ``model.`` first; first matching pattern wins).
DIT_ROLES = (("timestep_embedder", r"timestep_embedder\."), ("guidance_embedder", r"guidance_embedder\."),
             ("pooled_text_embedder", r"text_embedder\."), ("caption_projection", r"caption_projection\."),
             ("context_embedder", r"context_embedder$"), ("x_embedder", r"x_embedder$"),
             ("adaln_single", r"adaln_single\.linear$"), ("adaln_block", r"\.norm1(_context)?\.linear$"),
             ("adaln_single_block", r"single_transformer_blocks\.\d+\.norm\.linear$"),
             ("norm_out", r"norm_out\.linear$"), ("final_proj_out", r"(^|model\.)proj_out$"),
             ("single_proj_out", r"single_transformer_blocks\.\d+\.proj_out$"), ("single_proj_mlp", r"proj_mlp$"),
             ("attn_qkv", r"attn\d?\.(to_[qkv]|add_[qkv]_proj)$"), ("attn_out", r"attn\d?\.(to_out\.0|to_add_out)$"),
             ("ff_in", r"ff(_context)?\.net\.0\.proj$"), ("ff_out", r"ff(_context)?\.net\.2$"))


def layer_role(name: str, roles: tuple = ROLES) -> str:
    import re

    return next((role for role, pattern in roles if re.search(pattern, name)), "other")


def summarize_roles(layers: list, roles: tuple = ROLES) -> dict[str, dict[str, Any]]:
    """Per role: layer count, worst / median SQNR (dB), and the worst layer's name."""
    import statistics

    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(layer_role(r.name, roles), []).append(r)
    out = {}
    for role, rs in groups.items():
        finite = [r.sqnr_db for r in rs if math.isfinite(r.sqnr_db)] or [math.inf]
        worst = min(rs, key=lambda r: r.sqnr_db)
        out[role] = {"layers": len(rs), "worst_db": _db(min(finite)), "median_db": _db(statistics.median(finite)),
                     "worst_layer": worst.name}
    return dict(sorted(out.items(), key=lambda kv: kv[1]["worst_db"] if kv[1]["worst_db"] is not None else 1e9))


# ------------------------------------------------------------------------------------ classifiers
def image_set(n: int, size: int, *, seed: int = 0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """``n`` random-ish images (n, 3, size, size), normalized: smooth colour fields plus blobs and
    fine noise, so they have image-like spatial statistics rather than white noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    mid = torch.rand(n, 3, 16, 16, generator=gen)
    img = (0.6 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
           + 0.3 * torch.nn.functional.interpolate(mid, size=(size, size), mode="bilinear", align_corners=False)
           + 0.1 * torch.rand(n, 3, size, size, generator=gen))
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (img.clamp(0, 1) - m) / s


def classifier_inputs(comp: Any, n: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed input set for an image or text classifier component."""
    if comp.spec.inputs[0].name == "pixel_values":
        size = comp.spec.profile.dims["height"].opt
        meta = comp.metadata
        # unrecorded statistics: 0.5 per channel, as this report always used (not with_defaults' ImageNet)
        mean = meta.mean if meta.mean is not None else NEUTRAL_MEAN * 3
        std = meta.std if meta.std is not None else NEUTRAL_STD * 3
        return {"pixel_values": image_set(n, size, seed=seed, mean=mean, std=std)}
    return comp.spec.sample_inputs({"batch": n}, seed=seed)


def _logits(module: torch.nn.Module, comp: Any, inputs: dict[str, torch.Tensor], chunk: int = 32) -> torch.Tensor:
    n = next(iter(inputs.values())).shape[0]
    outs = []
    with torch.inference_mode():
        for i in range(0, n, chunk):
            outs.append(module(*(inputs[k][i:i + chunk] for k in comp.spec.input_names))[0].float())
    return torch.cat(outs)


def agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and the largest absolute softmax-probability difference."""
    top = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean()
    prob = (ref_logits.softmax(-1) - logits.softmax(-1)).abs().max()
    return {"top1_agreement": round(float(top), 4), "max_prob_diff": round(float(prob), 5),
            "logits_sqnr_db": _db(sqnr_db(ref_logits, logits))}


def classifier_accuracy(comp: Any, configs: dict[str, QuantConfig], *, n: int = 256, seed: int = 0) -> dict[str, Any]:
    """Per config: top-1 agreement / max probability difference against fp32 on ``n`` fixed inputs."""
    inputs = classifier_inputs(comp, n, seed=seed)
    calib = classifier_inputs(comp, 64, seed=seed + 1000)
    ref = _logits(comp.module, comp, inputs)
    out: dict[str, Any] = {"inputs": n, "configs": {}}
    for name, config in configs.items():
        loop = [tuple(calib[k][i:i + 16] for k in comp.spec.input_names) for i in range(0, 64, 16)]
        try:
            q = quantized_copy(comp, config, loop)
        except Exception as e:  # e.g. every layer skipped: report it, do not stop the report
            out["configs"][name] = {"error": str(e)}
            continue
        out["configs"][name] = {**agreement(ref, _logits(q.module, q, inputs)),
                                "layers_quantized": len(quantized_layers(q.module))}
    return out


# --------------------------------------------------------------------------- ONNX Runtime int8
def _engine_logits(engine: Any, comp: Any, inputs: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    n = next(iter(inputs.values())).shape[0]
    outs = [next(iter(engine({k: inputs[k][i:i + batch] for k in comp.spec.input_names}).values()))
            for i in range(0, n, batch)]
    return torch.cat(outs).float()


def ort_int8_comparison(comp: Any, configs: dict[str, QuantConfig], *, n: int = 256, batch: int = 32,
                        timing_batches: int = 2, repeats: int = 5, min_seconds: float = 0.5,
                        seed: int = 0) -> dict[str, Any]:
    """The quantized classifier's ONNX Runtime engine (``fastgen.build(..., quantization=config)``)
    against the fp32 engine, on the CPU.

    Per config: top-1 agreement and max probability difference against the fp32 engine on ``n``
    fixed inputs; the ORT-vs-PyTorch parity of the quantized graph (SQNR); the int8 kernels in ORT's
    optimized graph; and the speed ratio fp32 / int8 on ``timing_batches`` batches of ``batch``
    inputs (the engines timed alternately, ``repeats`` times, each from at least ``min_seconds`` of
    calls; the minimum is the figure least disturbed by other load, the median is reported too).
    Static configs are calibrated on 64 other inputs (``calibration=``).
    """
    import statistics
    import tempfile
    import time
    from pathlib import Path

    from fastgen import build
    from fastgen.export.config import ExportConfig
    from fastgen.quant.onnx import INT8_KERNELS, ort_optimized_ops

    inputs = classifier_inputs(comp, n, seed=seed)
    timing = {k: v[:batch * timing_batches] for k, v in inputs.items()}
    calib = classifier_inputs(comp, 64, seed=seed + 1000)
    loop = [tuple(calib[k][i:i + 16] for k in comp.spec.input_names) for i in range(0, 64, 16)]
    out: dict[str, Any] = {"inputs": n, "batch": batch, "timed_inputs": batch * timing_batches, "repeats": repeats,
                           "threads": "onnxruntime default", "configs": {}}

    def timed(engine: Any) -> float:
        """Seconds per timed input, from as many passes as fill ``min_seconds``."""
        passes, t0 = 0, time.perf_counter()
        while True:
            _engine_logits(engine, comp, timing, batch)
            passes += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return elapsed / passes / (batch * timing_batches)

    def size(engine: Any) -> int:
        return sum(f.stat().st_size for f in Path(engine.path).iterdir() if f.name.startswith("model.onnx"))

    with tempfile.TemporaryDirectory(prefix="fastgen-quant-ort-") as tmp:
        def engine_for(name: str, config: QuantConfig | None) -> Any:
            return build(comp, backend="onnxruntime", device="cpu", quantization=config or "none",
                         calibration=loop if config is not None and config.needs_calibration else None,
                         cache=False, out=Path(tmp) / name, export=ExportConfig(verify="opt"))

        fp32 = engine_for("fp32", None)
        ref = _engine_logits(fp32, comp, inputs, batch)
        out["fp32_onnx_bytes"] = size(fp32)
        for name, config in configs.items():
            engine = engine_for(name, config)
            logits = _engine_logits(engine, comp, inputs, batch)
            q = quantized_copy(comp, config, loop)
            torch_q = _logits(q.module, q, inputs)
            times_fp32, times_q = [], []
            for _ in range(repeats):
                times_fp32.append(timed(fp32))
                times_q.append(timed(engine))
            ops = ort_optimized_ops(Path(engine.path) / "model.onnx")
            out["configs"][name] = {
                **agreement(ref, logits),
                "parity_sqnr_db": _db(sqnr_db(torch_q, logits)),
                "torch_top1_agreement": agreement(ref, torch_q)["top1_agreement"],
                "fp32_ms_per_input": round(min(times_fp32) * 1e3, 3),
                "int8_ms_per_input": round(min(times_q) * 1e3, 3),
                "speed_ratio": round(min(times_fp32) / min(times_q), 3),
                "speed_ratio_median": round(statistics.median(times_fp32) / statistics.median(times_q), 3),
                "layers_quantized": len(quantized_layers(q.module)),
                "ort_int8_kernels": {k: v for k, v in ops.items() if k in INT8_KERNELS},
                "onnx_bytes": size(engine),
            }
            logger.info("ort %s: speed x%.2f, top-1 %.3f", name, out["configs"][name]["speed_ratio"],
                        out["configs"][name]["top1_agreement"])
            engine.close()
        fp32.close()
    return out


def environment() -> dict[str, Any]:
    """Device, library versions and date for a results file."""
    import datetime
    import platform

    import onnxruntime

    import fastgen

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"fastgen": fastgen.__version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    for lib in ("diffusers", "transformers", "onnx"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    return {"device": {"cpu": cpu, "torch_threads": torch.get_num_threads(),
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


__all__ = ["DIT_FLOORS_DB", "DIT_ROLES", "FLOORS_DB", "ROLES", "agreement", "classifier_accuracy", "classifier_inputs", "denoise", "environment",
           "image_set", "layer_role", "ort_int8_comparison", "quantized_copy", "quantized_share", "summarize_roles", "unet_accuracy",
           "unet_calibration_loop", "unet_conditioning", "weight_bytes"]
