"""The compile gate for diffusion transformers' attention: SD3.5 (head dim 64) and FLUX (head dim 128), 24 heads,
4096 image + 512 text tokens (a 1024x1024 image), in fp16 and bf16, compiled for A100 (sm80) and H100 (sm90).

The main gate (``test_compile_gate.py``) compiles each shape class at SD's shapes (10 or 16 heads, 4096 tokens);
this adds what DiTs launch besides: bf16 at head dim 64 and the TMA kernel in bf16 (what FLUX / SD3.5 run on
Hopper, their q/k/v being contiguous after the rotary embedding / concatenation), and 24 heads, which Triton
specializes differently from 16 (an int argument divisible by 16 compiles to other code). The launches come from
``plan_attention(..., arch=...)``, as on a GPU, and are compiled on the CPU in a subprocess without
``TRITON_INTERPRET`` (the kernels must be decorated for the GPU), held to the gate's rules (``aot.problems``):
it compiles, fits shared memory, does not spill, uses wgmma on Hopper / mma.sync elsewhere, loads through 128-bit
cp.async or TMA, and ptxas did not serialize its wgmma.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastgen.kernels.launch_configs import GATE_ARCHS


def _have_ptxas() -> bool:
    try:
        from triton import knobs

        return os.path.exists(knobs.nvidia.ptxas.path) and os.path.exists(knobs.nvidia.cuobjdump.path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this Triton build
        return False


pytestmark = pytest.mark.skipif(not _have_ptxas(), reason="this Triton build ships no ptxas / cuobjdump")

SEQ = 4096 + 512  # 1024x1024 px: 64x64 patches of 2x2 latents, plus 512 T5 tokens (SD3.5 / FLUX)
HEADS = 24
ARCHS = ("sm80", "sm90")
# (label, head_dim, dtype, tma): tma None = the launcher's choice (TMA on sm90 for these layouts), False = the
# pointer kernel (what a non-TMA-able layout runs on Hopper).
CASES = [(f"{model}-{dt}{'-pointer' if tma is False else ''}", hd, dt, tma)
         for model, hd in (("sd35", 64), ("flux", 128)) for dt in ("fp16", "bf16") for tma in (None, False)]
PAIRS = [(label, arch) for label, _, _, tma in CASES for arch in ARCHS if not (tma is False and arch != "sm90")]

_WORKER = r"""
import json, sys
import torch
from fastgen.kernels import aot
from fastgen.kernels.attention import plan_attention

seq, heads, jobs = json.loads(sys.argv[1])
out = []
for label, hd, dt, tma, arch in jobs:
    q = torch.empty(1, seq, heads, hd, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dt]))
    _, launches = plan_attention(q, torch.empty_like(q), torch.empty_like(q), arch=arch, tma=tma)
    for launch in launches:
        fig = aot.compile_launch(launch, arch)
        tma_kernel = launch.name == "_attn_fwd_tma_kernel"
        problems = aot.problems(fig, expect_mma=("f16",), expect_wide_loads=True, expect_tma=tma_kernel)
        out.append({"label": label, "arch": arch, "kernel": launch.name, "problems": problems,
                    "smem": fig.smem, "regs": fig.regs, "mma": fig.mma_kind})
print("RESULT " + json.dumps(out))
"""


def _compile(jobs: list) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps([SEQ, HEADS, jobs])], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def dit_records() -> dict[tuple[str, str], list[dict]]:
    """Every DiT launch compiled, in two subprocesses (one per core)."""
    from concurrent.futures import ThreadPoolExecutor

    by_label = {label: (hd, dt, tma) for label, hd, dt, tma in CASES}
    jobs = [(label, *by_label[label], arch) for label, arch in PAIRS]
    halves = [jobs[0::2], jobs[1::2]]
    with ThreadPoolExecutor(2) as pool:
        records = [r for part in pool.map(_compile, halves) for r in part]
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["label"], r["arch"]), []).append(r)
    return out


@pytest.mark.parametrize(("label", "arch"), PAIRS, ids=[f"{c}@{a}" for c, a in PAIRS])
def test_dit_attention_compiles_and_fits(dit_records, label, arch):
    recs = dit_records.get((label, arch))
    assert recs, f"{label} on {arch}: nothing compiled"
    problems = [p for r in recs for p in r["problems"]]
    assert not problems, "\n".join(problems)
    kernels = {r["kernel"] for r in recs}
    # Hopper runs these contiguous fp16 / bf16 layouts on the TMA kernel unless told otherwise.
    tma = arch == "sm90" and not label.endswith("-pointer")
    assert kernels == ({"_attn_fwd_tma_kernel"} if tma else {"_attn_fwd_kernel"}), kernels


def test_dit_gate_targets_are_gate_archs():
    assert set(ARCHS) <= set(GATE_ARCHS)
