"""The representative launches the compile gate and the static GPU report compile.

Each :class:`Case` builds its launches through the launcher's own ``plan_<op>(..., arch=...)`` with
CPU tensors of a real model's shapes (SD 1.5 / SDXL attention, CLIP and UNet linears), so argument
building and config choice are exactly what a GPU launch would do. ``config=None`` takes the
launcher's default for the target (its default table); the report passes each candidate config.

:func:`cases` covers every shape class of the default tables at least once; ``gate=True`` marks the
subset the CI gate compiles for every target (``tests/kernels/test_compile_gate.py``, a few minutes
on two cores); ``benchmarks/static_gpu_report.py`` sweeps them all with every autotune candidate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastgen.kernels.launch import KernelLaunch, arch_capability
from fastgen.kernels.launch_configs import GATE_ARCHS

__all__ = ["Case", "case_by_id", "cases", "gate_pairs"]

BATCH, SEQ, CROSS_SEQ = 2, 4096, 77  # SD's 64x64 latents self-attention; cross-attention over 77 tokens
HEADS = {16: 8, 32: 8, 40: 8, 64: 10, 72: 16, 80: 8, 96: 12, 128: 16, 144: 8, 160: 8, 192: 8, 256: 8}
_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One representative call of a kernel family."""

    id: str
    """``"<family>/<label>"``, unique."""
    family: str
    """The launch-config table: ``attention``, ``attention_tma``, ``attention_int8``, ``quantize_per_token``,
    ``gemm_int8``, ``gemm_fp8``, ``gemm_weight_only``."""
    shape_class: str
    """Its class in the default tables."""
    make: Callable[[str, dict | None], list[KernelLaunch]]
    """``(arch, config or None) -> launches``, through the launcher's plan function."""
    main: str
    """Name of the launch the case is about (the others are helpers, e.g. quantizers)."""
    mma: tuple[str, ...] = ()
    """Tensor-core operand classes the main launch must use (``f16``, ``int8``, ``fp8``)."""
    wide_loads: bool = False
    """Whether the main launch's loads must be 128-bit cp.async or TMA."""
    min_arch: str = "sm80"
    """Oldest target the launcher accepts it on (fp8: sm89)."""
    gate: bool = False
    """Part of the CI gate's set."""

    def build(self, arch: str, config: dict | None = None) -> list[KernelLaunch]:
        return self.make(arch, config)

    def role(self, launch: KernelLaunch) -> str:
        return "main" if launch.name == self.main else "aux"

    def archs(self) -> tuple[str, ...]:
        floor = arch_capability(self.min_arch)
        return tuple(a for a in GATE_ARCHS if arch_capability(a) >= floor)


def _qkv(hd: int, dtype: torch.dtype, seq_k: int = SEQ):
    h = HEADS[hd]
    q = torch.empty(BATCH, SEQ, h, hd, dtype=dtype)
    k = torch.empty(BATCH, seq_k, h, hd, dtype=dtype)
    return q, k, torch.empty_like(k)


def _attention(hd, dt, mask, causal, seq_k, tma, arch, config):
    from fastgen.kernels.attention import plan_attention

    q, k, v = _qkv(hd, _DT[dt], seq_k)
    m = torch.ones(BATCH, seq_k, dtype=torch.bool) if mask else None
    return plan_attention(q, k, v, arch=arch, mask=m, causal=causal, config=config, tma=tma)[1]


def _attention_int8(hd, pv, arch, config):
    from fastgen.kernels.attention_int8 import plan_attention_int8

    q, k, v = _qkv(hd, torch.float16)
    return plan_attention_int8(q, k, v, arch=arch, pv=pv, config=config)[1]


def _quantize(k, fp8, arch, config):
    from fastgen.kernels.quantize_per_token import plan_quantize_per_token

    x = torch.empty(BATCH, SEQ, k, dtype=torch.float16)
    return plan_quantize_per_token(x, arch=arch, fp8=fp8, config=config)[1]


def _scaled_gemm(fp8, m, act, bias, arch, config):
    n = k = 1280  # SD 1.5's 1280-wide UNet linears
    qdtype = torch.float8_e4m3fn if fp8 else torch.int8
    xq, wq = torch.empty(m, k, dtype=qdtype), torch.empty(n, k, dtype=qdtype)
    xs, ws = torch.empty(m), torch.empty(n)
    b = torch.empty(n, dtype=torch.bfloat16) if bias else None
    if fp8:
        from fastgen.kernels.gemm_fp8 import plan_fp8_gemm as plan
    else:
        from fastgen.kernels.gemm_int8 import plan_int8_gemm as plan
    return plan(xq, xs, wq, ws, arch=arch, bias=b, activation=act, out_dtype=torch.bfloat16, config=config)[1]


def _weight_only(m, bits, group, dt, arch, config):
    from fastgen.kernels.gemm_weight_only import plan_weight_only_gemm

    n, k = 3072, 768  # CLIP-L's MLP in
    x = torch.empty(m, k, dtype=_DT[dt])
    wq = torch.empty(n, k // 2, dtype=torch.uint8) if bits == 4 else torch.empty(n, k, dtype=torch.int8)
    ws = torch.empty(n, k // group) if group else torch.empty(n)
    return plan_weight_only_gemm(x, wq, ws, arch=arch, bits=bits, group_size=group, bias=torch.empty(n, dtype=_DT[dt]),
                                 config=config)[1]


def _cases() -> list[Case]:
    from fastgen.kernels.attention_int8_reference import int8_shape_class
    from fastgen.kernels.attention_reference import attention_shape_class
    from fastgen.kernels.gemm_weight_only import weight_only_shape_class

    out = []
    # Attention: SD 1.5 (40, 80, 160), SDXL / SD 2 (64), Flux / SD3 (128) and each class's widest member.
    gate_hd = {32, 40, 64, 80, 96, 128, 160, 256}
    # The pointer kernel (every target; on sm90+ it serves layouts TMA cannot take) and the TMA kernel
    # (sm90+, what contiguous fp16/bf16 attention runs there).
    for tma in (False, True):
        fam, main = ("attention_tma", "_attn_fwd_tma_kernel") if tma else ("attention", "_attn_fwd_kernel")
        for dt in ("fp16", "bf16") if tma else ("fp16", "bf16", "fp32"):
            for hd in sorted(HEADS):
                if dt != "fp16" and hd not in (64, 128, 256):
                    continue
                gate = ((dt == "fp16" and hd in gate_hd) or (dt == "bf16" and hd == 128 and not tma)
                        or (dt == "fp32" and hd in (64, 256)))
                f16 = dt != "fp32"
                out.append(Case(f"{fam}/{dt}-hd{hd}", fam, attention_shape_class(hd, _DT[dt]),
                                functools.partial(_attention, hd, dt, False, False, SEQ, tma), main,
                                ("f16",) if f16 else (), f16, min_arch="sm90" if tma else "sm80", gate=gate))
        for label, hd, mask, causal, seq_k in (("mask-causal", 64, True, True, SEQ), ("cross77", 80, False, False, CROSS_SEQ),
                                               ("mask-causal", 160, True, True, SEQ)):
            out.append(Case(f"{fam}/fp16-hd{hd}-{label}", fam, attention_shape_class(hd, torch.float16),
                            functools.partial(_attention, hd, "fp16", mask, causal, seq_k, tma), main,
                            ("f16",), True, min_arch="sm90" if tma else "sm80", gate=hd != 160))
    for pv in ("fp8", "fp16"):
        for hd in (40, 64, 80, 128, 160, 256):
            out.append(Case(f"attention_int8/pv{pv}-hd{hd}", "attention_int8", int8_shape_class(hd, pv),
                            functools.partial(_attention_int8, hd, pv), "_attn_int8_fwd_kernel",
                            ("int8", "fp8" if pv == "fp8" else "f16"), False,
                            min_arch="sm89" if pv == "fp8" else "sm80", gate=hd in (64, 128, 256)))
    for k in (320, 1280, 5120, 14336):  # 14336 > 8192: the two-read path
        for fp8 in (False, True):
            out.append(Case(f"quantize_per_token/k{k}-{'fp8' if fp8 else 'int8'}", "quantize_per_token",
                            f"k{k}", functools.partial(_quantize, k, fp8), "_quantize_per_token_kernel",
                            min_arch="sm89" if fp8 else "sm80", gate=(k, fp8) in ((320, False), (5120, True),
                                                                                  (14336, False))))
    for fp8 in (False, True):
        fam = "gemm_fp8" if fp8 else "gemm_int8"
        for m, act, bias in ((64, None, False), (64, "gelu_tanh", True), (8192, None, False), (8192, "gelu", False),
                             (8192, "silu", True)):
            out.append(Case(f"{fam}/m{m}-{act or 'none'}{'-bias' if bias else ''}", fam,
                            "m<=64" if m <= 64 else "m>64", functools.partial(_scaled_gemm, fp8, m, act, bias),
                            "_fp8_gemm_kernel" if fp8 else "_int8_gemm_kernel", ("fp8" if fp8 else "int8",), True,
                            min_arch="sm89" if fp8 else "sm80", gate=(m, act) != (8192, None)))
    for dt in ("fp16", "fp32"):
        for m in (1, 32, 64, 154):
            for bits, group in ((8, None), (4, 128), (4, 32)):
                gate = (dt, m, bits, group) in (("fp16", 1, 4, 128), ("fp16", 32, 8, None), ("fp16", 64, 4, 128),
                                                ("fp16", 154, 8, None), ("fp32", 64, 4, 128), ("fp32", 154, 8, None))
                out.append(Case(f"gemm_weight_only/{dt}-m{m}-int{bits}-g{group or 'ch'}", "gemm_weight_only",
                                weight_only_shape_class(m, _DT[dt]),
                                functools.partial(_weight_only, m, bits, group, dt), "_weight_only_gemm_kernel",
                                ("f16-any",) if dt == "fp16" else (), False, gate=gate))
    return out


@functools.cache
def _registry() -> dict[str, Case]:
    return {c.id: c for c in _cases()}


def cases() -> list[Case]:
    return list(_registry().values())


def case_by_id(case_id: str) -> Case:
    return _registry()[case_id]


def gate_pairs() -> list[tuple[str, str]]:
    """``(case id, arch)`` of the CI gate: every gate case on every target that accepts it."""
    return [(c.id, a) for c in cases() if c.gate for a in c.archs()]
