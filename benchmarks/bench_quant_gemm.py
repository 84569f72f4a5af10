"""fastgen's quantized GEMM kernels against cuBLAS bf16 and torch's fp8 / int8 GEMMs, on SD UNet linears (CUDA).

    python benchmarks/bench_quant_gemm.py                     # JSON to benchmarks/results/quant_gemm_<gpu>.json
    python benchmarks/bench_quant_gemm.py --autotune --json /tmp/q.json

Shapes (``y = x @ W.T``, x ``(M, K)``, W ``(N, K)``): the Stable Diffusion UNet's transformer linears
at hidden sizes c = 320 / 640 / 1280 -- attention projections (K = c, N = c), GEGLU feed-forward in
(K = c, N = 8c) and out (K = 4c, N = c) -- at M = 2048 (2 x 1024 tokens), 8192 (2 x 4096) and 16384
tokens. For each: TFLOP/s (2 M N K flops) of

- ``bf16``: torch.nn.functional.linear in bf16 (cuBLAS), the baseline of every ratio;
- ``int8`` / ``int8+quant``: fastgen W8A8 GEMM (bf16 out) alone / with ``quantize_per_token`` of the
  bf16 activations in front (what a quantized Linear runs); ``torch_int_mm``: torch._int_mm (cuBLAS
  int8 -> int32) plus the same scale epilogue in torch, when available;
- ``fp8`` / ``fp8_fast`` / ``fp8+quant`` (sm_89+): fastgen fp8 GEMM with fp32 promotion per K step /
  with Hopper fast accumulation / with fp8 per-token quantization in front; ``scaled_mm`` /
  ``scaled_mm_fast``: torch._scaled_mm with row-wise scales (bf16 out, use_fast_accum False / True);
- ``w8`` / ``w4``: fastgen weight-only GEMMs, int8 per channel / int4 in groups of 128 (64 where K is
  not a multiple of 128, i.e. K = 320); not meant for this M, and also timed at small M on
  text-encoder shapes (``weight_only``).

Every result carries its SQNR (dB) against an fp32 matmul of the same bf16 inputs (a broken kernel
shows up as a low number rather than a fast one) and its speed ratio to bf16 (``<name>_vs_bf16`` > 1
is faster). The fastgen kernels are called through their launchers (no dispatch overhead).
A method that fails is recorded as ``failed (...)`` and the run goes on. Without CUDA (or triton) it
prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

HIDDEN = (320, 640, 1280)
TOKENS = (2048, 8192, 16384)
# Weight-only: small M (batch x 77 text tokens, single rows) on CLIP-L / OpenCLIP-bigG text encoder linears.
WO_TOKENS = (1, 16, 154)
WO_SHAPES = (("clip-l proj", 768, 768), ("clip-l mlp in", 768, 3072), ("clip-l mlp out", 3072, 768),
             ("bigG mlp in", 1280, 5120), ("bigG mlp out", 5120, 1280))


def unet_shapes() -> list[tuple[str, int, int]]:
    """(name, K, N) of the UNet transformer linears."""
    out = []
    for c in HIDDEN:
        out += [(f"c{c} attn proj", c, c), (f"c{c} ff in (geglu)", c, 8 * c), (f"c{c} ff out", 4 * c, c)]
    return out


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.float() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def _fail(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return f"failed ({type(e).__name__}: {lines[0][:120]})"


def _methods(x, w, autotune: bool, fp8_ok: bool) -> dict[str, object]:
    """name -> zero-arg callable producing the (M, N) output, for one x (M, K) bf16 and W (N, K) bf16."""
    from fastgen.kernels.gemm_fp8 import fp8_gemm_fwd
    from fastgen.kernels.gemm_int8 import int8_gemm_fwd
    from fastgen.kernels.gemm_weight_only import weight_only_gemm_fwd
    from fastgen.kernels.quantize_per_token import quantize_per_token_fwd
    from fastgen.ops.quant import quantize_per_token_reference, quantize_weight

    bf16 = torch.bfloat16
    m: dict[str, object] = {"bf16": lambda: torch.nn.functional.linear(x, w)}
    # Operands are prepared with the PyTorch references, so a failing quantize kernel only fails "+quant".
    wq, ws = quantize_weight(w, dtype="int8")
    xq, xs = quantize_per_token_reference(x)
    m["int8"] = lambda: int8_gemm_fwd(xq, xs, wq, ws, out_dtype=bf16, autotune=autotune)

    def int8_quant():
        q, s = quantize_per_token_fwd(x, autotune=autotune)
        return int8_gemm_fwd(q, s, wq, ws, out_dtype=bf16, autotune=autotune)

    m["int8+quant"] = int8_quant
    if hasattr(torch, "_int_mm"):
        wq_t = wq.t()  # (K, N) column-major, the layout cuBLAS int8 wants
        m["torch_int_mm"] = lambda: (torch._int_mm(xq, wq_t).float() * xs[:, None] * ws[None, :]).to(bf16)
    if fp8_ok:
        wf, wfs = quantize_weight(w, dtype="fp8")
        xf, xfs = quantize_per_token_reference(x, dtype="fp8")
        m["fp8"] = lambda: fp8_gemm_fwd(xf, xfs, wf, wfs, out_dtype=bf16, autotune=autotune)
        m["fp8_fast"] = lambda: fp8_gemm_fwd(xf, xfs, wf, wfs, out_dtype=bf16, autotune=autotune, fast_accum=True)

        def fp8_quant():
            q, s = quantize_per_token_fwd(x, fp8=True, autotune=autotune)
            return fp8_gemm_fwd(q, s, wf, wfs, out_dtype=bf16, autotune=autotune)

        m["fp8+quant"] = fp8_quant
        if hasattr(torch, "_scaled_mm"):
            sa, sb, wf_t = xfs[:, None].contiguous(), wfs[None, :].contiguous(), wf.t()  # row-wise scales
            m["scaled_mm"] = lambda: torch._scaled_mm(xf, wf_t, scale_a=sa, scale_b=sb, out_dtype=bf16)
            m["scaled_mm_fast"] = lambda: torch._scaled_mm(xf, wf_t, scale_a=sa, scale_b=sb, out_dtype=bf16,
                                                           use_fast_accum=True)
    w8, s8 = wq, ws
    group = next(gs for gs in (128, 64, 32) if w.shape[1] % gs == 0)  # K = 320 allows 64, not 128
    w4, s4 = quantize_weight(w, dtype="int4", group_size=group)
    m["w8"] = lambda: weight_only_gemm_fwd(x, w8, s8, bits=8, autotune=autotune)
    m["w4"] = lambda: weight_only_gemm_fwd(x, w4, s4, bits=4, group_size=group, autotune=autotune)
    return m


def bench_one(name: str, mm: int, k: int, n: int, methods: list[str] | None, autotune: bool, fp8_ok: bool,
              do_bench) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(mm, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k**-0.5
    ref = x.float() @ w.float().T  # (M, N) fp32 oracle of the same bf16 inputs
    flops = 2 * mm * n * k
    res: dict[str, object] = {"shape": name, "M": mm, "K": k, "N": n}
    try:
        fns = _methods(x, w, autotune, fp8_ok)
    except Exception as e:  # noqa: BLE001 - e.g. a kernel failing to compile: record it, go on
        res["setup"] = _fail(e)
        return res
    for meth, fn in fns.items():
        if methods is not None and meth not in methods and meth != "bf16":
            continue
        try:
            db = sqnr_db(fn(), ref)  # first call: compiles (and autotunes) outside the timing
            ms = do_bench(fn)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
            res[meth] = _fail(e)
            continue
        res[f"{meth}_ms"] = ms
        res[f"{meth}_tflops"] = flops / (ms * 1e-3) / 1e12
        res[f"{meth}_sqnr_db"] = db
    base = res.get("bf16_ms")
    for meth in fns:
        if base and f"{meth}_ms" in res and meth != "bf16":
            res[f"{meth}_vs_bf16"] = base / res[f"{meth}_ms"]
    del x, w, ref
    return res


def _line(r: dict, methods: tuple[str, ...]) -> str:
    cells = []
    for meth in methods:
        if f"{meth}_tflops" in r:
            ratio = f" {r[f'{meth}_vs_bf16']:.2f}x" if f"{meth}_vs_bf16" in r else ""
            cells.append(f"{meth} {r[f'{meth}_tflops']:6.1f}{ratio} ({r[f'{meth}_sqnr_db']:.0f} dB)")
        elif meth in r:
            cells.append(f"{meth} FAILED")
    return f"{r['shape']:18s} M={r['M']:<6d} K={r['K']:<5d} N={r['N']:<6d} " + " | ".join(cells)


def _bench_fn(do_bench):
    def bench(fn) -> float:
        try:
            return do_bench(fn, warmup=10, rep=40, return_mode="median")
        except TypeError:  # older triton without return_mode
            return do_bench(fn, warmup=10, rep=40)
    return bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autotune", action="store_true", help="tune the fastgen kernels' tiles per shape first")
    p.add_argument("--only", default="", help="substring filter on shape names")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated M values (UNet shapes)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/quant_gemm_<gpu>.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant_gemm: needs a CUDA GPU; nothing to do on this machine")
        return 0
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        print("bench_quant_gemm: needs triton; nothing to do")
        return 0

    bench = _bench_fn(do_bench)
    device = torch.cuda.get_device_name()
    cap = torch.cuda.get_device_capability()
    fp8_ok = cap >= (8, 9) and hasattr(torch, "float8_e4m3fn")
    print(f"{device} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, triton {triton.__version__}, "
          f"autotune={args.autotune}, fp8={'yes' if fp8_ok else 'no'}")
    tokens = tuple(int(t) for t in args.tokens.split(",") if t.strip())
    shown = ("bf16", "int8", "int8+quant", "torch_int_mm", "fp8", "fp8+quant", "scaled_mm", "w8")
    unet = []
    for mm in tokens:
        for name, k, n in unet_shapes():
            if args.only in name:
                r = bench_one(name, mm, k, n, None, args.autotune, fp8_ok, bench)
                unet.append(r)
                print(_line(r, shown), flush=True)
    wo = []
    print("weight-only at small M (TFLOP/s, ratio to bf16):")
    for mm in WO_TOKENS:
        for name, k, n in WO_SHAPES:
            if args.only in name:
                r = bench_one(name, mm, k, n, ["w8", "w4"], args.autotune, fp8_ok, bench)
                wo.append(r)
                print(_line(r, ("bf16", "w8", "w4")), flush=True)
    report = {"benchmark": "quant_gemm", "device": device, "capability": f"{cap[0]}.{cap[1]}",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "autotune": args.autotune, "flops": "2 * M * N * K", "output_dtype": "bfloat16",
              "unet": unet, "weight_only": wo, "summary": summarize(unet, wo)}
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    path = args.json or Path(__file__).parent / "results" / f"quant_gemm_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written result file
    print("summary (geometric-mean speed ratio to bf16):",
          ", ".join(f"{k} {v:.2f}x" for k, v in report["summary"].items()))
    print(f"wrote {path}")
    return 0


def summarize(unet: list[dict], wo: list[dict]) -> dict[str, float]:
    """Geometric mean of each method's ratio to bf16 over the shapes it ran on."""
    out = {}
    for prefix, rows in (("unet", unet), ("small_m", wo)):
        names = sorted({k[: -len("_vs_bf16")] for r in rows for k in r if k.endswith("_vs_bf16")})
        for meth in names:
            vals = [r[f"{meth}_vs_bf16"] for r in rows if f"{meth}_vs_bf16" in r]
            out[f"{prefix} {meth}"] = math.exp(sum(math.log(v) for v in vals) / len(vals))
    return out


if __name__ == "__main__":
    sys.exit(main())
